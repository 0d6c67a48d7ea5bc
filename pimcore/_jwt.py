"""Reading a token's claims: PyJWT, but a number of more digits than Python
reads as an int is kept as a :class:`~pimcore.ids.LongNumber`.

Light (PyJWT and :mod:`pimcore.ids` only): ``pimcore chat`` reads the token
it is given with it, and must not load the store (as :mod:`pimcore.auth`,
which the broker checks tokens with, does).
"""

from __future__ import annotations

import json
from typing import Any, Union

import jwt

from .ids import LongNumber

__all__ = ["JWT", "read_claims"]


def _json_int(text: str) -> object:
    try:
        return int(text)
    except ValueError:  # (more digits than Python reads: sys.get_int_max_str_digits())
        return LongNumber(text)


class _PyJWT(jwt.PyJWT):
    """PyJWT that reads a number of more digits than Python converts (a
    hand-signed claim of 10**5000, say) as a LongNumber: PyJWT's own
    reading fails the whole token with Python's advice to call
    ``sys.set_int_max_str_digits()``, which names no claim."""

    def _decode_payload(self, decoded: dict[str, Any]) -> Any:
        try:
            payload = json.loads(decoded["payload"], parse_int=_json_int)
        except (ValueError, RecursionError) as exc:
            raise jwt.DecodeError(f"Invalid payload string: {exc}") from exc
        if not isinstance(payload, dict):
            raise jwt.DecodeError("Invalid payload string: must be a json object")
        return payload


#: ``JWT.decode(...)``: as ``jwt.decode``.
JWT = _PyJWT()


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
