"""How a presented token is checked: by digest, in constant time, never compared or hashed as a raw string."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from ccm_wsgi.config import User
from ccm_wsgi.errors import ProxyError
from ccm_wsgi.http import auth as auth_mod
from tests.support.constants import ALICE, BOB


class RawToken(str):
    """A configured token that fails the test the moment anything compares or hashes it as a string."""

    def _refuse(self, *args: Any) -> Any:
        raise AssertionError("a raw token was compared or hashed")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = __contains__ = _refuse  # type: ignore
    startswith = endswith = find = index = _refuse  # type: ignore


def test_token_lookup_is_by_digest_and_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """What makes the check independent of how much of a guess is right: the presented token is hashed
    (SHA-256) and looked up by digest; the one comparison is hmac.compare_digest of two digests."""
    compared: list[tuple[bytes, bytes]] = []
    real_compare = auth_mod.hmac.compare_digest

    def compare(a: bytes, b: bytes) -> bool:
        assert isinstance(a, bytes) and isinstance(b, bytes) and len(a) == len(b) == 32
        compared.append((a, b))
        return real_compare(a, b)

    monkeypatch.setattr(auth_mod.hmac, "compare_digest", compare)
    hashed = "ak-ccm-hashed-user-token-000"
    users = [User(name="alice", token=RawToken(ALICE)),
             User(name="carol", token_sha256=hashlib.sha256(hashed.encode()).hexdigest())]
    authn = auth_mod.Authenticator(users, admin_tokens=[RawToken(BOB)])
    assert all(isinstance(k, bytes) and len(k) == 32 for k in authn._users)  # keys are digests
    assert authn.authenticate({"HTTP_AUTHORIZATION": "Bearer " + ALICE}).name == "alice"
    assert authn.authenticate({"HTTP_X_API_KEY": hashed}).name == "carol"
    assert len(compared) == 2
    for i in range(len(ALICE) + 1):
        guess = ALICE[:i] + "x" * (len(ALICE) - i)
        if guess == ALICE:
            continue
        with pytest.raises(ProxyError) as err:
            authn.authenticate({"HTTP_AUTHORIZATION": "Bearer " + guess})
        assert err.value.status == 401 and guess not in err.value.message
    assert len(compared) == 2  # a wrong guess is a dictionary miss on its digest: nothing to compare
    assert authn.is_admin({"HTTP_AUTHORIZATION": "Bearer " + BOB})
    assert not authn.is_admin({"HTTP_AUTHORIZATION": "Bearer " + BOB[:-1]})
