"""API keys for inference calls: read once from the config (a key, a file of keys), compared in constant time."""

from __future__ import annotations

import hmac
from pathlib import Path


class ApiKeys:
    """The accepted keys; empty means inference is open. Never logged, never in a repr."""

    def __init__(self, keys: frozenset[str] = frozenset()) -> None:
        self._digests = tuple(key.encode() for key in sorted(keys))

    @classmethod
    def from_config(cls, api_key: str, api_key_file: str) -> ApiKeys:
        keys = {api_key.strip()} if api_key.strip() else set()
        if api_key_file:
            text = Path(api_key_file).read_text(encoding="utf-8")
            keys |= {line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")}
            if not keys:
                raise ValueError(f"--api-key-file {api_key_file} holds no key")
        return cls(frozenset(keys))

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def allows(self, authorization: str | None) -> bool:
        """Whether an 'authorization' value ('Bearer <key>') carries an accepted key; every key is compared, so the
        time taken does not depend on which key (if any) matched."""
        if not self.required:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        matched = False
        for key in self._digests:
            matched |= hmac.compare_digest(given, key)
        return matched

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._digests)} keys)"
