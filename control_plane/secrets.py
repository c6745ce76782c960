"""Environment variable values encrypted at rest (Fernet: AES-128-CBC + HMAC-SHA256).

The key comes from ``FASTAPI_DEPLOY_SECRET_KEY`` (a Fernet key; several comma-separated keys allow
rotation: the first encrypts, all decrypt), else from ``<data_dir>/secret.key``, created on first start
with mode 0600. Values are stored as ``fernet:<token>``; anything else is read as plain text (a value
written before encryption existed).
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

_PREFIX = "fernet:"


class SecretBox:
    def __init__(self, keys: list[bytes]) -> None:
        self._fernet = MultiFernet([Fernet(k) for k in keys])
        self.key_count = len(keys)

    @classmethod
    def from_config(cls, data_dir: Path, env_keys: str = "") -> SecretBox:
        if env_keys.strip():
            return cls([k.strip().encode() for k in env_keys.split(",") if k.strip()])
        path = data_dir / "secret.key"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
        return cls([path.read_bytes().strip()])

    def encrypt(self, value: str) -> str:
        return _PREFIX + self._fernet.encrypt(value.encode()).decode()

    def rotate(self, stored: str) -> str:
        """``stored`` re-encrypted with the first key (a plain-text legacy value gets encrypted).

        Key rotation: configure ``NEW,OLD``, rotate every stored value, then drop ``OLD``."""
        if not stored.startswith(_PREFIX):
            return self.encrypt(stored)
        try:
            return _PREFIX + self._fernet.rotate(stored[len(_PREFIX) :].encode()).decode()
        except InvalidToken as exc:
            raise ValueError("an environment variable cannot be decrypted with the configured keys") from exc

    def decrypt(self, stored: str) -> str:
        if not stored.startswith(_PREFIX):
            return stored
        try:
            return self._fernet.decrypt(stored[len(_PREFIX) :].encode()).decode()
        except InvalidToken as exc:
            raise ValueError("an environment variable cannot be decrypted with the configured keys") from exc
