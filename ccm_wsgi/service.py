"""One ccm service at run time: the config turned into live objects, and their start and stop."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import config, files
from .accounting.pricing import Pricing
from .accounting.reading import apply
from .accounting.store import SAVE_INTERVAL, UsageStore
from .credentials.oauth import OAuthCredential
from .credentials.peer import PeerCredential
from .credentials.store import credential_store
from .http import tls
from .http.auth import Authenticator
from .http.drain import Drain
from .http.proxy import Proxy, ProxySettings
from .limits.counters import Counters, MemoryCounters
from .limits.engine import Limits
from .observe import refusals
from .observe.metrics import Metrics, enabled
from .observe.state import ServiceState
from .pool import poller
from .pool.balancer import Balancer, aggregate_status
from .pool.providers import Account, PoolProvider, SingleProvider
from .pool.quota import caps
from .pool.sessions import Pins, SessionPins
from .state.connection import SharedState
from .state.counters import RedisCounters
from .state.credentials import SharedCredential
from .state.pool import SharedQuota
from .state.sessions import SharedPins
from .state.usage import SharedUsage, stream_name
from .upstream.outbounds import Outbounds

log = logging.getLogger("ccm_wsgi.service")

# What a running service takes from a re-read config, for the requests that start after it. Everything
# else (listener, TLS, credentials and their files, upstream, outbounds, pricing) keeps running as it was
# started and changes at the next restart.
LIVE = ("users", "admin_tokens", "limits", "overage", "headers", "max_request_body_size", "response_timeout",
        "stream_idle_timeout")


class ReloadRefused(Exception):
    """A re-read config that this running service cannot take; `problems` say why, one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class Service:
    def __init__(self, cfg: config.Service, outbounds: Outbounds, save_interval: float = SAVE_INTERVAL,
                 counters: Counters | None = None, shared: str | None = None):
        self.cfg = cfg
        self.shared = shared  # the directory shared with the other workers of a gunicorn master (status page)
        self.save_interval = save_interval
        self.tag = cfg.tag
        self.outbounds = outbounds
        self.drain = Drain()  # requests in flight, for a graceful stop
        self.pricing = Pricing(cfg.pricing, log)
        self.auth = Authenticator(cfg.users, cfg.admin_tokens)
        # several nodes: credentials, usage, limits, quota and sessions shared through Redis (which then
        # counts the limits for every process of every node: no host-wide `counters` is given)
        self.state = SharedState(cfg.state, cfg.tag) if cfg.state is not None else None
        if self.state is not None:
            assert counters is None, "a service with shared state counts its limits on it"
            counters = RedisCounters(self.state)
        # the certificate this service serves (its expiry is a metric): built here for `serve` and gunicorn alike
        self.tls = tls.server_context(cfg.tls) if cfg.tls is not None else None
        tags = [c.tag for c in cfg.effective_credentials if isinstance(c, config.DefaultCredential)]
        self.metrics = Metrics(self.pricing, tags) if enabled() else None
        self.refusals = refusals.recent(shared)
        self._private: dict[str, UsageStore] = {}  # shared state without usages_path: by runtime path
        accounts = self._accounts(cfg.effective_credentials)
        self.accounts = list(accounts.values())
        self.providers: dict[str, PoolProvider] = {}
        self.default_provider: SingleProvider | PoolProvider
        if cfg.pooled:
            self.providers = self._providers(cfg.credentials, accounts)
            self.default_provider = self.providers[cfg.credentials[0].tag]
        else:  # one credential; its answers (429s included) pass through
            self.default_provider = SingleProvider(self.accounts[0])
        # every account's own one-member balancer: its view of the account is the admin status's
        self.own = {a.tag: p.balancer for a in self.accounts if (p := self.providers.get(a.tag)) is not None}
        for account in self.accounts:
            self.own.setdefault(account.tag, Balancer(account.tag, [account], "fallback"))
        self.limits = Limits(cfg, counters or MemoryCounters(), lambda: self.accounts)
        self.proxy = Proxy(self.auth, self.provider_for, self.pricing, ProxySettings.of(cfg), self.drain, self.limits,
                           self.refusals, self.metrics,
                           self.state.batch if self.state is not None else contextlib.nullcontext)
        if self.metrics is not None:
            self.metrics.watch(ServiceState(self))
        self._greenlets: list[Any] = []
        self.quota = SharedQuota(self.state, self.accounts) if self.state is not None else None

    def _accounts(self, credentials: tuple[config.Credential, ...]) -> dict[str, Account]:
        """An account per default or external credential, by tag."""
        accounts: dict[str, Account] = {}
        for c in credentials:
            match c:
                case config.DefaultCredential():
                    accounts[c.tag] = self._default_account(c)
                case config.ExternalCredential():
                    accounts[c.tag] = self._external_account(c)
                case config.BalancerCredential():
                    pass  # a choice among the accounts, see _providers
        return accounts

    def _providers(self, credentials: tuple[config.Credential, ...],
                   accounts: dict[str, Account]) -> dict[str, PoolProvider]:
        """A provider per credential tag: a balancer's over its members, a one-member pool for the others."""
        providers: dict[str, PoolProvider] = {}
        for c in credentials:
            match c:
                case config.BalancerCredential():
                    members = [accounts[t] for t in c.credentials]
                    for member in members:
                        member.poll_interval = min(member.poll_interval, c.poll_interval)
                    balancer = Balancer(c.tag, members, c.strategy, c.rebalance_threshold, pins=self._pins(c.tag))
                case config.DefaultCredential() | config.ExternalCredential():
                    balancer = Balancer(c.tag, [accounts[c.tag]], "fallback")
            providers[c.tag] = PoolProvider(balancer)
        return providers

    def _pins(self, pool: str) -> Callable[[SessionPins], Pins] | None:
        """With shared state, a pool's session pins are the cluster's."""
        state = self.state
        return None if state is None else lambda own: SharedPins(state, pool, own)

    def _default_account(self, c: config.DefaultCredential) -> Account:
        route = self.outbounds.route(c.detour, self.cfg.connect_timeout)
        store = credential_store(c.credential_path)
        shared = SharedCredential(self.state, c.tag, store.path) if self.state is not None else None
        credential = OAuthCredential(c.tag, store, self.cfg.token_url, route, shared,
                                     self.metrics.refreshed if self.metrics is not None else None)
        cap_5h, cap_weekly = caps(c.reserve_5h, c.reserve_weekly, c.limit_5h, c.limit_weekly)
        return Account(c.tag, credential, route, self.cfg.upstream_url, self._usage(c.usages_path),
                       cap_5h=cap_5h, cap_weekly=cap_weekly, poll_interval=self.cfg.default_poll_interval)

    def _external_account(self, c: config.ExternalCredential) -> Account:
        route = self.outbounds.route(c.detour, self.cfg.connect_timeout)
        return Account(c.tag, PeerCredential(c.tag, c.token), route, c.url, self._usage(c.usages_path),
                       external=True, poll_interval=c.poll_interval)

    def _usage(self, path: str) -> UsageStore | None:
        save_failed = self.metrics.save_failed if self.metrics is not None else None
        if self.state is None:
            return UsageStore(os.path.abspath(path), self.pricing, log, self.save_interval,
                              on_save_failure=save_failed) if path else None
        name = stream_name(self.cfg, path)
        shared = SharedUsage(self.state, name, lambda ledger, rec, t_ns: apply(ledger, self.pricing, rec, t_ns))
        if not path:  # budgets and shares still need the records: journaled in this host's private runtime dir
            digest = hashlib.sha256(f"{self.state.url}\0{self.state.prefix}\0{name}".encode()).hexdigest()[:16]
            path = os.path.join(files.runtime_dir(), f"usage-{digest}.json")
            if path not in self._private:  # credentials without a usage file share it (and their stream)
                self._private[path] = UsageStore(path, self.pricing, log, self.save_interval, shared, save_failed)
            return self._private[path]
        return UsageStore(os.path.abspath(path), self.pricing, log, self.save_interval, shared, save_failed)

    def reload(self, new: config.Service, where: str) -> list[str]:
        """Take the settings of `new` that apply at once (`LIVE`): requests already running keep the user and
        limits they started with. Returns the other settings that differ (they wait for a restart); raises
        ReloadRefused, changing nothing, when a user of `new` needs a credential or usage file that is not
        running. `where` is the service's JSON path, for the problems."""
        merged = self.check_reload(new, where)
        later = [name for name in type(new).model_fields
                 if name not in LIVE and getattr(new, name) != getattr(self.cfg, name)]
        self.cfg = merged
        self.auth = self.proxy.auth = Authenticator(merged.users, merged.admin_tokens)
        self.proxy.settings = ProxySettings.of(merged)
        self.limits.reload(merged)
        return later

    def check_reload(self, new: config.Service, where: str) -> config.Service:
        """The config this service would run with after taking `new`; raises ReloadRefused."""
        merged = self.cfg.model_copy(update={name: getattr(new, name) for name in LIVE})
        problems = list(self._unservable(merged, where))
        if problems:
            raise ReloadRefused(problems)
        return merged

    def _unservable(self, cfg: config.Service, where: str) -> Iterator[str]:
        for index, user in enumerate(cfg.users):
            if user.credential and user.credential not in self.providers:
                yield (f"{where}.users[{index}].credential: {user.credential} is not a running credential "
                       "(a new credential needs a restart)")
                continue
            limits = cfg.limits_for(user)
            if limits is not None and limits.needs_ledger:
                bare = [a.tag for a in self.provider_for(user).accounts if a.usage is None]
                if bare:
                    yield (f"{where}.users[{index}]: budget and window_share need a usages_path on credential "
                           f"{', '.join(bare)} (a new usage file needs a restart)")

    def provider_for(self, user: config.User | None) -> SingleProvider | PoolProvider:
        if user is not None and user.credential:
            return self.providers[user.credential]
        return self.default_provider

    def status(self, user: config.User | None) -> dict[str, float]:
        """The caller's view of its pool: remaining headroom as utilisation, and plan weight."""
        accounts = self.provider_for(user).accounts
        exclude = user.external_credential if user is not None else ""
        allow_external = user.allow_external_usage if user is not None else True
        return aggregate_status(accounts, time.time(), exclude_tag=exclude, allow_external=allow_external)

    def admin_status(self) -> dict[str, Any]:
        """Every credential's quota, state and sticky sessions, for `admin_tokens`."""
        credentials = []
        for account in self.accounts:
            state = self.own[account.tag].member_status(account)
            state.update(account.credential.info())
            state["sessions"] = sum(p.balancer.sessions_on(account.tag) for p in self.providers.values())
            credentials.append(state)
        pools = {
            tag: {"strategy": p.balancer.strategy, "members": [m.tag for m in p.balancer.members],
                  "usable": [m.tag for m in p.balancer.usable_members()], "sessions": p.balancer.sessions()}
            for tag, p in self.providers.items() if isinstance(p, PoolProvider)
        }
        users = {user.name: self.limits.view(user) for user in self.cfg.users}
        found: dict[str, Any] = {"credentials": credentials, "pools": pools, "users": users}
        if self.state is not None:
            found["state"] = self.state.status()
        return found

    def usage_stores(self) -> list[UsageStore]:
        """Each usage store once (with shared state, credentials without a usage file share one)."""
        return list({id(a.usage): a.usage for a in self.accounts if a.usage is not None}.values())

    def start(self) -> None:
        if self.state is not None:
            self._join_cluster()
            self.state.on_recovery(self._join_cluster)
        for store in self.usage_stores():
            store.open()
            store.start()
        self._greenlets = poller.start(self.accounts)
        if self.quota is not None:
            self.quota.start()
        if self.tls is not None:
            self.tls.watch()
        if self.auth.open and not is_loopback(self.cfg.listen):
            log.warning(
                "service %s listens on %s with no users: anyone who can reach it uses the subscription",
                self.tag, self.cfg.listen,
            )

    def close(self) -> None:
        for greenlet in self._greenlets:
            greenlet.kill(block=False)
        for store in self.usage_stores():
            try:
                store.close()
            except Exception:
                log.exception("saving usage of service %s failed", self.tag)
        if self.quota is not None:
            self.quota.stop()
        if self.state is not None:
            if isinstance(self.limits.counters, RedisCounters):
                self.limits.counters.close()
            for account in self.accounts:
                if isinstance(account.credential, OAuthCredential):
                    account.credential.leave_cluster()
            self.state.close()

    def _join_cluster(self) -> None:
        """Each subscription login agrees with Redis's (at start, and whenever Redis is back)."""
        for account in self.accounts:
            if isinstance(account.credential, OAuthCredential):
                account.credential.join_cluster()


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
