"""Bearer tokens to grants. A token is configured as its SHA-256 (`api.tokens`), bound to one
namespace or, as `'*'`, to all; the token itself is never stored or logged."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from sink.config import ApiToken

ALL = "*"


@dataclass(frozen=True)
class Grant:
    """What one request may read: one namespace, or every namespace (`namespace is None`)."""

    namespace: str | None

    @property
    def operator(self) -> bool:
        return self.namespace is None


def digest(token: str) -> str:
    """The hex SHA-256 of a token, as `api.tokens[].sha256` holds it."""
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    def __init__(self, tokens: Sequence[ApiToken]) -> None:
        self._grants = [
            (t.sha256.encode(), Grant(None if t.namespace == ALL else t.namespace)) for t in tokens
        ]

    def __bool__(self) -> bool:
        return bool(self._grants)

    def grant(self, authorization: str | None) -> Grant | None:
        """The grant of an `Authorization` header value, or None (no token, a wrong one, or
        another scheme). Every configured digest is compared, in constant time each."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        presented = digest(token).encode()
        found = None
        for known, grant in self._grants:
            if hmac.compare_digest(known, presented):
                found = grant
        return found
