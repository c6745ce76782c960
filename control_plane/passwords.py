"""Passwords at rest: argon2id through ``argon2-cffi``.

Why argon2id rather than the standard library's ``hashlib.scrypt``: it is OWASP's first recommendation
for password storage, memory-hard like scrypt, and argon2-cffi's encoded hashes carry their own
parameters, so :func:`needs_rehash` can upgrade old hashes at the next login when the defaults move.
API tokens do not go through here: they are 256-bit random (``security.py`` stores their SHA-256).
"""

from __future__ import annotations

import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_LENGTH = 8
MAX_LENGTH = 1024  # hashing is deliberately expensive: do not let a request hash megabytes

_hasher = PasswordHasher()  # argon2id, RFC 9106's second recommended parameter set (64 MiB, t=3, p=4)
# Verified when the email is unknown, so "no such user" takes as long as "wrong password".
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """True when ``password`` matches ``stored``; False for a mismatch or no password set.

    Costs one hash either way (timing says nothing about whether the account exists)."""
    try:
        return _hasher.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    return _hasher.check_needs_rehash(stored)


def check_strength(password: str) -> None:
    """Raise ValueError when ``password`` is unacceptable (length only: NIST SP 800-63B)."""
    if len(password) < MIN_LENGTH:
        raise ValueError(f"the password must have at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise ValueError(f"the password must have at most {MAX_LENGTH} characters")


def generate_password() -> str:
    """A random password for a new or reset account, shown once to the admin."""
    return secrets.token_urlsafe(15)
