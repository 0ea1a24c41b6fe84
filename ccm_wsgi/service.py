"""One ccm service at run time: the config turned into live objects, and their start and stop."""

from __future__ import annotations

import ipaddress
import logging
import os
from typing import Any

from . import keychain
from .auth import Authenticator
from .config import Service as ServiceConfig
from .credentials import CredentialStore, OAuthCredential, default_path
from .outbounds import Outbounds
from .pricing import Pricing
from .providers import Account, SingleProvider
from .proxy import Proxy
from .usage import UsageStore

log = logging.getLogger("ccm_wsgi.service")


def credential_store(path: str) -> CredentialStore:
    """An explicit path means that file; no path means Claude Code's own location (keychain first on macOS)."""
    if path:
        return CredentialStore(os.path.abspath(os.path.expanduser(path)))
    store_path = default_path()
    chain = None
    if keychain.enabled():
        from .credentials import real_home

        chain = keychain.Keychain(keychain.service_name(os.environ.get("CLAUDE_CONFIG_DIR"), real_home()))
    return CredentialStore(store_path, chain)


class Service:
    def __init__(self, cfg: ServiceConfig, outbounds: Outbounds):
        self.cfg = cfg
        self.tag = cfg.tag
        self.outbounds = outbounds
        self.active = 0  # requests in flight, for graceful shutdown
        self.pricing = Pricing(cfg.pricing, log)
        self.auth = Authenticator(cfg.users, cfg.admin_tokens)
        self.provider = SingleProvider(self._account("default", cfg.credential_path, cfg.usages_path, cfg.detour))
        self.proxy = Proxy(self)

    def _account(self, tag: str, credential_path: str, usages_path: str, detour: str) -> Account:
        pool = self.outbounds.pool(detour)
        credential = OAuthCredential(tag, credential_store(credential_path), self.cfg.token_url, pool)
        usage = UsageStore(os.path.abspath(usages_path), self.pricing, log) if usages_path else None
        return Account(tag, credential, pool, self.cfg.upstream_url, detour, usage)

    def usage_stores(self) -> list[Any]:
        return [a.usage for a in self.provider.accounts if a.usage is not None]

    def start(self) -> None:
        for store in self.usage_stores():
            store.open()
            store.start()
        if self.auth.open and not is_loopback(self.cfg.listen):
            log.warning(
                "service %s listens on %s with no users: anyone who can reach it uses the subscription",
                self.tag, self.cfg.listen,
            )

    def close(self) -> None:
        for store in self.usage_stores():
            try:
                store.close()
            except Exception:
                log.exception("saving usage of service %s failed", self.tag)


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
