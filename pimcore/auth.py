"""Token authentication: JWT (HS256) issued by the backend that fronts pimcore.

The backend that owns users (the embedding application) signs a short-lived
token with a secret it shares with the broker; the client presents it in
``Login``.  Claims::

    sub   user id (required)
    dev   device id (optional; when present the token is bound to that device)
    exp   expiry, seconds since the epoch (required)
    iat   issue time
    aud   "pimcore"

Verification is sans-IO like the core: ``now`` is passed in, so expiry is
checked against the broker's clock, not read inside PyJWT.
"""

from __future__ import annotations

import math
import os
import secrets
import time
from pathlib import Path
from typing import Optional, Union

import jwt

from ._jwt import STRICT_JWT
from .core import Identity
from .errors import AuthError
from .ids import id_problem

__all__ = ["AUDIENCE", "issue_token", "JwtAuthenticator", "load_or_create_secret", "read_kept_secret", "SECRET_FILE"]

AUDIENCE = "pimcore"
ALGORITHM = "HS256"
SECRET_FILE = "secret"
#: HS256 keys shorter than this are refused: they are guessable offline.
MIN_SECRET_BYTES = 32
#: A token's exp and iat (seconds) must be within this of 1970 (2**62 µs,
#: ~146,000 years): made µs (plus the leeway) they must fit the signed 64-bit
#: µs times they become (Identity.expires / issued_at: the broker's timers,
#: next_deadline, revocation times).
_MAX_TOKEN_SECONDS = (1 << 62) // 1_000_000


def _key(secret: Union[str, bytes]) -> bytes:
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"the token secret must be at least {MIN_SECRET_BYTES} bytes")
    return key


def issue_token(
    secret: Union[str, bytes],
    user: str,
    device: Optional[str] = None,
    *,
    ttl: float = 3600.0,
    now: Optional[float] = None,
) -> str:
    """A signed token for ``user`` (bound to ``device`` if given), valid for
    ``ttl`` seconds from ``now`` (seconds since the epoch; default: now) --
    at least: its ``exp`` is a whole second, rounded up.

    ValueError for a secret under 32 bytes, or a user or device id outside
    the grammar of :mod:`pimcore.ids` (the broker would refuse its login)."""
    for value, what in ((user, "user"), (device, "device")):
        problem = None if value is None and what == "device" else id_problem(value, what)
        if problem is not None:
            raise ValueError(f"cannot issue a token: {problem}")
    issued = time.time() if now is None else now
    # iat to the µs (RFC 7519 allows a fractional NumericDate): revocation
    # (Pimcore.revoke) compares it with the revoke time, and a token issued
    # right after a revoke must not fall into the same whole second.
    iat: object = int(issued) if float(issued).is_integer() else round(float(issued), 6)
    # exp rounded up: cut down to a whole second below a µs iat + ttl, a
    # token lived less than its ttl -- 0.66 s for ttl=1.5, under 1 s for
    # ttl=1 (a new user's trial).  It lives at least ttl.
    claims: dict[str, object] = {"sub": user, "aud": AUDIENCE, "iat": iat, "exp": math.ceil(issued + ttl)}
    if device is not None:
        claims["dev"] = device
    return jwt.encode(claims, _key(secret), algorithm=ALGORITHM)


class JwtAuthenticator:
    """``Broker`` authenticator: ``(token, now_us) -> Identity`` or AuthError.

    ``leeway`` (seconds) tolerates small clock differences between the
    backend that issued the token and the broker, at its expiry.
    ``iat_leeway`` (seconds, at most ``leeway``): how far its issue time may
    be ahead of the broker's clock.  Revocations refuse tokens by issue
    time, so a token stamped ahead by an issuer whose clock runs fast, and
    not in use at a revocation up to now, logs in after it while its issue
    time is ahead of the revocation: this bounds that window (a new user's
    trial found 30 s too wide).
    """

    __slots__ = ("_key", "_leeway", "_iat_leeway")

    def __init__(self, secret: Union[str, bytes], *, leeway: float = 30.0, iat_leeway: float = 5.0) -> None:
        self._key = _key(secret)
        for name, value in (("leeway", leeway), ("iat_leeway", iat_leeway)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < _MAX_TOKEN_SECONDS:
                raise ValueError(f"the token {name} must be a number of seconds from 0 to {_MAX_TOKEN_SECONDS},"
                                 f" not {value!r}")
        # (µs, an int: added to a token's expiry made µs, exactly.)
        self._leeway = int(leeway * 1_000_000)
        self._iat_leeway = min(self._leeway, int(iat_leeway * 1_000_000))

    def __call__(self, token: bytes, now: int) -> Identity:
        try:
            # (STRICT_JWT: jwt.decode, but a number of more digits than
            # Python reads is refused naming its claim, not with Python's
            # advice to call sys.set_int_max_str_digits().)
            claims = STRICT_JWT.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],  # never "none", never a key-confused RS256
                audience=AUDIENCE,
                # exp is checked below against the broker's clock (sans-IO).
                options={"require": ["sub", "exp"], "verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.InvalidSignatureError:
            raise AuthError("token signature is invalid") from None
        except jwt.DecodeError as exc:
            if str(exc).startswith(_CLAIMS_UNREADABLE):  # (signed with our secret: its claims are bad)
                raise AuthError(f"token is invalid: {exc}") from None
            raise AuthError(_not_a_jwt(token, exc)) from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"token is invalid: {exc}") from None
        exp = claims["exp"]
        if not isinstance(exp, (int, float)) or isinstance(exp, bool):
            raise AuthError("token expiry is not a number")
        if exp < -_MAX_TOKEN_SECONDS:  # (-inf, -1e308: long past)
            raise AuthError("token has expired")
        expires = _token_us(exp, "token expiry") + self._leeway
        if now > expires:
            raise AuthError("token has expired")
        user = claims["sub"]
        device = claims.get("dev")
        if not isinstance(user, str) or (device is not None and not isinstance(device, str)):
            raise AuthError("token claims have the wrong types")
        iat = claims.get("iat")
        if iat is not None and (not isinstance(iat, (int, float)) or isinstance(iat, bool)):
            raise AuthError("token issue time is not a number")
        # A token without iat counts as issued at 0: any revocation ends it.
        issued_at = _token_us(iat, "token issue time", rounded=True) if iat is not None else 0
        if issued_at > now + self._iat_leeway:
            # Revocations and purges refuse tokens issued up to their time:
            # one stamped later by an issuer whose clock runs ahead would
            # survive them (a new user's trial), as RFC 7519 lets a
            # recipient refuse (PyJWT: ImmatureSignatureError).
            raise AuthError(f"token was issued in the future: its iat is {_seconds(issued_at - now)} s ahead of the"
                            f" broker's clock (leeway {_seconds(self._iat_leeway)} s); the issuer's clock is ahead")
        return Identity(user, device, expires=expires, issued_at=issued_at)



#: The DecodeErrors PyJWT raises for the claims, after the signature
#: verified (pimcore._jwt): the token is well-formed and signed with the
#: broker's secret; any other DecodeError is about the token's shape.
_CLAIMS_UNREADABLE = ("Invalid payload string", "its claim ")


def _not_a_jwt(token: Union[bytes, str], exc: Exception) -> str:
    """Why ``token`` is no JWT at all, in words (PyJWT says "Not enough
    segments", "Invalid header string: 'utf-8' codec can't decode byte
    0xb7..."), PyJWT's words at the end only when they say more."""
    raw = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else bytes(token)
    what = "token is not a pimcore token: "
    issued = " (a JWT as pimcore token issues)"
    parts = raw.split(b".")
    if len(parts) != 3:
        return f"{what}a JWT has three parts separated by dots, this has {len(parts)}{issued}"
    try:
        jwt.get_unverified_header(raw)
    except jwt.InvalidTokenError:
        return f"{what}its three parts are not a JWT's (base64url JSON header, claims, signature){issued}"
    return f"{what}its parts are not a JWT's{issued}: {exc}"


def _seconds(us: int) -> str:
    """µs as seconds: whole ("300"), or to the µs without trailing zeros
    ("299.999", "96475000.5")."""
    whole, frac = divmod(abs(us), 1_000_000)
    return ("-" if us < 0 else "") + (str(whole) if not frac else f"{whole}.{frac:06d}".rstrip("0"))


def _token_us(seconds: Union[int, float], what: str, *, rounded: bool = False) -> int:
    """A token's time (exp, iat: seconds since 1970) as µs; AuthError in words
    for NaN or an infinity (PyJWT reads them in a token's JSON) and for a time
    further from 1970 than _MAX_TOKEN_SECONDS (made µs it overflowed, or left
    the 64-bit µs it is kept in).  ``rounded``: to the nearest µs (iat), else
    truncated (exp)."""
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise AuthError(f"{what} is not a finite number of seconds")
    if not -_MAX_TOKEN_SECONDS < seconds < _MAX_TOKEN_SECONDS:
        raise AuthError(f"{what} is out of range: {seconds:.6g} seconds since 1970"
                        f" (it must be within {_MAX_TOKEN_SECONDS} of 1970, ~146,000 years)")
    if isinstance(seconds, int):
        return seconds * 1_000_000
    return int(round(seconds * 1_000_000)) if rounded else int(seconds * 1_000_000)


#: How a refusal names each file load_or_create_secret keeps.
_KEPT_AS = {SECRET_FILE: "token secret", "api-key": "HTTP API key", "webhook-secret": "webhook secret"}


def read_kept_secret(data_dir: Union[str, Path], name: str = SECRET_FILE) -> bytes:
    """The secret kept in ``data_dir/name`` (as :func:`load_or_create_secret`
    makes it), never made: FileNotFoundError if it is not there; ValueError
    in words for a file that is there but cannot be used ("the HTTP API key
    file d/api-key is not UTF-8 text", "...: Is a directory", "... is
    empty")."""
    path = Path(data_dir) / name
    what = f"the {_KEPT_AS.get(name, name)} file {path}"
    try:
        text = path.read_text().strip()
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 text") from None
    except FileNotFoundError:
        raise
    except OSError as exc:  # a directory, no permission...
        raise ValueError(f"{what}: {exc.strerror or exc}") from None
    if not text:
        raise ValueError(f"{what} is empty")
    return text.encode()


def load_or_create_secret(data_dir: Union[str, Path], name: str = SECRET_FILE) -> bytes:
    """The broker's token secret, kept in ``data_dir/secret`` (mode 0600);
    created with 32 random bytes on first use so a first run needs no setup.
    ``name``: another file made the same way (the HTTP API key, ``api-key``).

    Raises ValueError in words for a file that is there but cannot be used
    (:func:`read_kept_secret`), and for one that cannot be made ("cannot
    make the token secret file d/secret: Read-only file system"; it was
    Python's bare "[Errno 30] ..."), or whose data directory cannot be made
    ("cannot make the data directory d: Permission denied")."""
    try:
        return read_kept_secret(data_dir, name)
    except FileNotFoundError:
        pass
    path = Path(data_dir) / name
    text = secrets.token_hex(32)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # (private: it will hold the store)
    except OSError as exc:  # said as the data directory's, not the file's: it is made first
        raise ValueError(f"cannot make the data directory {path.parent}: {exc.strerror or exc}") from None
    try:
        # O_EXCL: two processes racing to create it cannot both win.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_secret(data_dir, name)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # (no space...): no empty file left to be refused as such next time
            path.unlink(missing_ok=True)
            raise
    except OSError as exc:  # a read-only file system, no permission, no space...
        raise ValueError(f"cannot make the {_KEPT_AS.get(name, name)} file {path}: {exc.strerror or exc}") from None
    return text.encode()
