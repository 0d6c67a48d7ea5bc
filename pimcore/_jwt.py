"""Reading a token's claims: PyJWT, but a number of more digits than Python
reads as an int is kept as a :class:`~pimcore.ids.LongNumber`.

Light (PyJWT and :mod:`pimcore.ids` only): ``pimcore chat`` reads the token
it is given with it, and must not load the store (as :mod:`pimcore.auth`,
which the broker checks tokens with, does).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional, Union

import jwt

from .ids import LongNumber, _show

__all__ = ["JWT", "STRICT_JWT", "read_claims"]


def _json_int(text: str) -> object:
    try:
        return int(text)
    except ValueError:  # (more digits than Python reads: sys.get_int_max_str_digits())
        return LongNumber(text)


def _long_number(value: object) -> Optional[LongNumber]:
    """The first LongNumber in a claim's value, at any depth, or None."""
    if isinstance(value, LongNumber):
        return value
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        found = _long_number(item)
        if found is not None:
            return found
    return None


class _PyJWT(jwt.PyJWT):
    """PyJWT that reads a number of more digits than Python converts (a
    hand-signed claim of 10**5000, say) as a LongNumber: PyJWT's own
    reading fails the whole token with Python's advice to call
    ``sys.set_int_max_str_digits()``, which names no claim.  ``strict``:
    such a number in any claim is a DecodeError that names the claim
    (before PyJWT checks the claims: the same for each)."""

    def __init__(self, *, strict: bool = False) -> None:
        super().__init__()
        self._strict = strict

    def _decode_payload(self, decoded: dict[str, Any]) -> Any:
        try:
            payload = json.loads(decoded["payload"], parse_int=_json_int)
        except (ValueError, RecursionError) as exc:
            raise jwt.DecodeError(f"Invalid payload string: {exc}") from exc
        if not isinstance(payload, dict):
            raise jwt.DecodeError("Invalid payload string: must be a json object")
        for name, value in payload.items() if self._strict else ():
            found = _long_number(value)
            if found is not None:
                raise jwt.DecodeError(
                    f"its claim {_show(name)} {'is' if found is value else 'holds'} a number of {found.digits:,} digits"
                    f" (at most {sys.get_int_max_str_digits():,} are read)")
        return payload


#: ``JWT.decode(...)``: as ``jwt.decode``.
JWT = _PyJWT()
#: As JWT, but a token with a LongNumber in its claims is a DecodeError
#: ("its claim 'dev' is a number of 5,001 digits (at most 4,300 are
#: read)"): the broker's (pimcore.auth.JwtAuthenticator).
STRICT_JWT = _PyJWT(strict=True)


def read_claims(token: Union[str, bytes]) -> dict[str, object]:
    """The claims of ``token`` read WITHOUT checking it (its signature,
    expiry, audience): to say what a token is for before using it (``pimcore
    chat`` takes the device it is bound to); only the broker's
    :class:`~pimcore.auth.JwtAuthenticator` decides whether it is good.
    Empty if it is no JWT."""
    try:
        claims = JWT.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return {}
    return claims if isinstance(claims, dict) else {}
