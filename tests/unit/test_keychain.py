"""Which keychain item holds Claude Code's login, and when the keychain is used at all (no process; the
keychain path through a real `ccm-wsgi serve` is tests/test_keychain.py)."""

from __future__ import annotations

import hashlib
import sys

from ccm_wsgi.credentials import keychain


def test_service_name_rule():
    home = "/Users/alice"
    assert keychain.service_name(None, home) == "Claude Code-credentials"
    assert keychain.service_name("", home) == "Claude Code-credentials"
    assert keychain.service_name("/Users/alice/.claude", home) == "Claude Code-credentials"
    # the reference's example, and the rule: first 8 hex of sha256 of the string exactly as given
    assert keychain.service_name("/Users/alice/.claude-work", home) == "Claude Code-credentials-be865d75"
    for odd in ("/Users/alice/.claude/", "/Users/alice/../alice/.claude", "~/.claude"):
        suffix = hashlib.sha256(odd.encode()).hexdigest()[:8]
        assert keychain.service_name(odd, home) == "Claude Code-credentials-" + suffix


def test_enabled_on_macos_or_when_forced(monkeypatch):
    monkeypatch.delenv("CCM_KEYCHAIN", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert not keychain.enabled()
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keychain.enabled()
    monkeypatch.setenv("CCM_KEYCHAIN", "0")
    assert not keychain.enabled()
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("CCM_KEYCHAIN", "1")
    assert keychain.enabled()
