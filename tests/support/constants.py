"""Tokens, users and the model the whole suite shares.

The tokens are fake but shaped like real ones (the secret scan in tests/test_secrets.py also looks for
these shapes); each of TOKENS is checked against every log and error body of the session.
"""

from __future__ import annotations

ACCESS = "sk-ant-oat01-test-access-aaaaaaaaaaaa"
REFRESH = "sk-ant-ort01-test-refresh-bbbbbbbbbbb"
ALICE = "ak-ccm-alice-0123456789abcdef"
BOB = "ak-ccm-bob-0123456789abcdef00"
TOKENS = (ACCESS, REFRESH, ALICE, BOB)

MODEL = "claude-sonnet-4-6"
USERS = [{"name": "alice", "token": ALICE}, {"name": "bob", "token": BOB}]
