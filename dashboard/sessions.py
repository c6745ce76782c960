"""Browser sessions: a signed cookie backed by a revocable user token, and the CSRF tokens bound to it.

A session is an :class:`~control_plane.models.ApiToken` row (``kind="user"``, named
:data:`SESSION_NAME`), so everything that ends a user's tokens ends their sessions too: logout, an
admin's password reset or disabling the account, expiry, ``DELETE /api/v1/tokens/{id}``. Access is then
decided by ``security.authenticate`` and ``security.get_app``/``get_team`` exactly as for the API.

    cookie  = RAW "." SIG            RAW: 256 random bits; SIG = HMAC(k_cookie, RAW)
    bearer  = "fdps_" HMAC(k_bearer, RAW)     what the token row stores (as SHA-256, like every token)
    csrf    = HMAC(k_csrf, token id)          one per session, in every form and fetch

The cookie is not itself an API token: the row holds the hash of a value derived from it with a key
only the control plane knows, so a leaked token table or a copied cookie alone yields no bearer token.
The keys are derived from one random secret kept in the ``Setting`` table (``dashboard_key``), shared by
every control-plane replica.

Before there is a session (the login form) CSRF is a double-submit: a random nonce in a cookie, its
HMAC under ``k_login`` in the form.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from control_plane.db import Database
from control_plane.errors import Unauthorized
from control_plane.models import ApiToken, Setting, User, utcnow
from control_plane.security import Principal, authenticate, hash_token

SESSION_NAME = "dashboard session"
SESSION_TTL = timedelta(days=7)
"""How long a browser session lives, whatever its activity (then the user signs in again)."""
KEY_SETTING = "dashboard_key"
BEARER_PREFIX = "fdps_"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _mac(key: bytes, message: str) -> str:
    return _b64(hmac.new(key, message.encode(), hashlib.sha256).digest())


@dataclass(frozen=True)
class Keys:
    """The dashboard's keys, each derived from the platform's dashboard secret for one purpose."""

    cookie: bytes
    bearer: bytes
    csrf: bytes
    login: bytes

    @classmethod
    def derive(cls, secret: bytes) -> Keys:
        def sub(label: str) -> bytes:
            return hmac.new(secret, f"fastapi-deploy dashboard {label} v1".encode(), hashlib.sha256).digest()

        return cls(cookie=sub("cookie"), bearer=sub("bearer"), csrf=sub("csrf"), login=sub("login"))


def load_keys(db: Database) -> Keys:
    """The keys, from the ``dashboard_key`` setting (created on first use; two replicas starting at once
    both end up reading the one row that won the insert)."""
    for _ in range(2):
        with db.session() as s:
            row = s.get(Setting, KEY_SETTING)
            if row is not None:
                return Keys.derive(bytes.fromhex(row.value))
            s.add(Setting(key=KEY_SETTING, value=secrets.token_hex(32)))
            try:
                s.commit()
            except IntegrityError:
                continue
    with db.session() as s:
        row = s.get(Setting, KEY_SETTING)
        if row is None:
            raise RuntimeError("the dashboard key could not be stored")
        return Keys.derive(bytes.fromhex(row.value))


def _bearer(keys: Keys, raw: str) -> str:
    return BEARER_PREFIX + _mac(keys.bearer, raw)


def unsign(keys: Keys, cookie: str | None) -> str | None:
    """The session's random part when ``cookie`` carries a valid signature, else None."""
    if not cookie or cookie.count(".") != 1:
        return None
    raw, sig = cookie.split(".")
    if not raw or not hmac.compare_digest(sig, _mac(keys.cookie, raw)):
        return None
    return raw


def create(session: Session, keys: Keys, user: User, ttl: timedelta = SESSION_TTL) -> tuple[str, ApiToken]:
    """A new session for ``user`` (committed): the cookie value and its token row."""
    raw = secrets.token_urlsafe(32)
    row = ApiToken(
        token_hash=hash_token(_bearer(keys, raw)),
        kind="user",
        user_id=user.id,
        name=SESSION_NAME,
        expires_at=utcnow() + ttl,
    )
    session.add(row)
    session.commit()
    return f"{raw}.{_mac(keys.cookie, raw)}", row


def resolve(session: Session, keys: Keys, cookie: str | None) -> Principal:
    """The principal of a session cookie; :class:`Unauthorized` when it is missing, forged, expired or
    revoked, or its user is disabled (``security.authenticate``'s own checks)."""
    raw = unsign(keys, cookie)
    if raw is None:
        raise Unauthorized("Sign in to use the dashboard.", title="Not signed in")
    principal = authenticate(session, f"Bearer {_bearer(keys, raw)}")
    if principal.user is None:  # only user tokens are ever stored for a session
        raise Unauthorized("Sign in to use the dashboard.", title="Not signed in")
    return principal


def revoke(session: Session, token: ApiToken) -> None:
    """End the session (committed): its token is refused from now on, on every replica."""
    row = session.get(ApiToken, token.id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        session.add(row)
        session.commit()


def csrf_token(keys: Keys, token_id: str) -> str:
    """The CSRF token of the session whose token row is ``token_id``."""
    return _mac(keys.csrf, token_id)


def check_csrf(keys: Keys, token_id: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(str(given), csrf_token(keys, token_id))


def login_nonce() -> str:
    """The login form's double-submit nonce (its cookie)."""
    return secrets.token_urlsafe(24)


def login_csrf(keys: Keys, nonce: str) -> str:
    """The login form's CSRF field for ``nonce``."""
    return _mac(keys.login, nonce)


def check_login_csrf(keys: Keys, nonce: str | None, given: str | None) -> bool:
    return bool(nonce) and bool(given) and hmac.compare_digest(str(given), login_csrf(keys, str(nonce)))
