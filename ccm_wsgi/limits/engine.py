"""Sharing one subscription fairly: each user's limits, checked before anything is sent upstream.

For every request of a user, in this order (cheapest first, and a refusal never uses up another limit):

1. disabled, expired, the model (fnmatch patterns);
2. budgets: USD spent in the current UTC day / week / month, from the usage ledger (priced as the usage
   file prices it). Requests already running when a budget is reached may finish: a user can overspend by
   at most what their requests in flight cost (with `max_concurrent`, at most that many requests);
3. concurrency: a lease among `max_concurrent`, waited for (first come, first served) up to QUEUE_WAIT,
   then refused with a short `retry-after`; given back exactly once when the response ends;
4. rate: the sliding minute, counted only for admitted requests.

Window shares and the overage guard depend on the credential, so they are screened per credential: a
pool moves on to another credential, a single credential refuses. Open services (no users) have no limits.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from ..accounting.periods import ADJECTIVE, day_of, ends, first_days
from ..pool.balancer import aggregate_status
from . import refusals
from .counters import Counters, Lease
from .headers import BUDGET_WARNINGS, BudgetStanding, Standing, standing_headers
from .refusals import Refusal

if TYPE_CHECKING:
    from ..accounting.ledger import Ledger
    from ..accounting.store import UsageStore
    from ..config import Limits as LimitsConfig
    from ..config import Service as ServiceConfig
    from ..config import User
    from ..config.limits import Budget
    from ..pool.providers import Account

QUEUE_WAIT = 10.0  # seconds a request over max_concurrent waits for a slot before it is refused
QUEUE_WAIT_ENV = "CCM_QUEUE_WAIT"  # the same in seconds, from the environment (tests, unusual clients)
BUSY_RETRY = 2.0  # the retry-after then
ANSWERS_KEPT = 256  # model names whose answer (allowed or not) a user's rules keep


def _no_check() -> None:
    """The budget check of limits without a budget."""


@dataclass(frozen=True, slots=True)
class Rules:
    """One user's limits as every request of theirs reads them: plain values taken from the config once per
    config (an attribute of a config object costs several times a plain one to read)."""

    user: User  # the config object they were taken from
    name: str
    disabled: bool
    expires: float | None  # epoch seconds
    limits: LimitsConfig | None
    needs_ledger: bool = False
    budgets: tuple[Budget, ...] = ()
    periods: tuple[str, ...] = ()  # the budgets' periods and USD, in their order
    amounts: tuple[float, ...] = ()
    most: int | None = None  # max_concurrent
    per_minute: int | None = None  # requests_per_minute
    windows: tuple[tuple[int, str, float], ...] = ()  # the window shares: (place in the ledger, window, percent)
    pattern: re.Pattern[str] | None = None  # the models allowed (None: any)
    answers: dict[str, bool] = field(default_factory=dict)  # by model name (clients ask for a few, again and again)

    @classmethod
    def of(cls, user: User, limits: LimitsConfig | None) -> Rules:
        expires = user.expires.timestamp() if user.expires is not None else None
        if limits is None:
            return cls(user, user.name, user.disabled, expires, None)
        share = limits.window_share
        return cls(user, user.name, user.disabled, expires, limits, limits.needs_ledger, limits.budget,
                   tuple(budget.per for budget in limits.budget), tuple(budget.usd for budget in limits.budget),
                   limits.max_concurrent, limits.requests_per_minute, share.windows if share is not None else (),
                   limits.pattern)

    def allows(self, model: str) -> bool:
        """Whether the user may ask for `model`: it matches one of the `models` patterns (none: any model)."""
        answers = self.answers
        found = answers.get(model)
        if found is None:
            found = self.pattern is None or self.pattern.match(model) is not None
            if len(answers) < ANSWERS_KEPT:  # names a client makes up are matched each time, not kept
                answers[model] = found
        return found


@dataclass(slots=True)
class Admission:
    """What an admitted request holds until its response ends, and what its limits read from the ledgers
    (read once per request: the checks before forwarding and the answer's headers share them)."""

    user: str
    rules: Rules
    counters: Counters
    lease: Lease | None = None
    released: bool = False
    ledgers: dict[int, Ledger] = field(default_factory=dict)  # id(usage store) -> its ledger, caught up
    fullest: tuple[float, str] = (0.0, "")  # the fullest budget: the part of it spent, its period
    shares_of: UsageStore | None = None  # the usage store `shares` were read from
    shares: tuple[float, float] = (0.0, 0.0)  # points of the current 5-hour and weekly windows the user used

    def ledger(self, store: UsageStore) -> Ledger:
        found = self.ledgers.get(id(store))
        if found is None:
            found = self.ledgers[id(store)] = store.current_ledger()
        return found

    def used(self, store: UsageStore, now: float) -> tuple[float, float]:
        """The user's points of the current 5-hour and weekly windows in `store`'s ledger (the screen and the
        answer's headers ask for the same store's)."""
        if self.shares_of is not store:
            self.shares = self.ledger(store).shares(self.user, now)
            self.shares_of = store
        return self.shares

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self.lease is not None:
                self.counters.release(self.lease)


@dataclass(frozen=True, slots=True)
class Ledgered:
    """The usage stores that limits read, for one list of accounts."""

    accounts: Sequence[Account]
    pairs: list[tuple[Account, UsageStore]]  # each store once, with an account that records into it
    stores: list[UsageStore]
    shared: list[UsageStore]  # those with shared state (they read other nodes' records before a check)


class Limits:
    def __init__(self, cfg: ServiceConfig, counters: Counters, accounts: Callable[[], Sequence[Account]],
                 clock: Callable[[], float] = time.time):
        self.counters = counters
        self.accounts = accounts
        self.clock = clock
        self.queue_wait = float(os.environ.get(QUEUE_WAIT_ENV) or QUEUE_WAIT)
        self._known: Ledgered | None = None
        self.cfg: ServiceConfig
        self._rules: dict[int, Rules]  # id(user) -> their rules under `cfg`
        self._deny_overage: bool
        self.reload(cfg)

    def reload(self, cfg: ServiceConfig) -> None:
        """New limits for new requests; requests already admitted keep what they hold."""
        self.cfg = cfg
        self._rules = {}
        self._deny_overage = cfg.overage == "deny"

    def rules(self, user: User) -> Rules:
        """`user`'s rules under the current config (taken from it at the user's first request)."""
        found = self._rules.get(id(user))
        if found is None or found.user is not user:
            found = self._rules[id(user)] = Rules.of(user, self.cfg.limits_for(user))
        return found

    # -- before forwarding ---------------------------------------------------------------------------

    def admit(self, user: User | None, model: str) -> Admission | None:
        """Check the user's limits; raises a Refusal, or returns what the request holds (None: an open service)."""
        if user is None:
            return None
        now = self.clock()
        rules = self.rules(user)
        if rules.disabled:
            raise refusals.disabled(rules.name)
        if rules.expires is not None and rules.expires <= now:
            raise refusals.expired(rules.name, rules.expires)
        admission = Admission(rules.name, rules, self.counters)
        if rules.limits is None:
            return admission
        if not rules.allows(model):
            raise refusals.model(model, rules.limits.models)
        # with shared state: what other nodes recorded up to now, in the one trip
        stores = self.sync() if rules.needs_ledger else []
        check_budgets = partial(self._check_budgets, admission, now, stores) if rules.budgets else _no_check
        if rules.most is None and rules.per_minute is None:
            check_budgets()
        else:
            admission.lease, wait = self.counters.admit(rules.name, rules.most, rules.per_minute, self.queue_wait,
                                                        now, check_budgets)
            if wait > 0:
                assert rules.per_minute is not None
                raise refusals.rate(rules.per_minute, wait)
            if admission.lease is None and rules.most is not None:
                raise refusals.concurrency(rules.most, BUSY_RETRY)
        return admission

    def _check_budgets(self, admission: Admission, now: float, stores: list[UsageStore]) -> None:
        """Refuse when a budget is reached; note the fullest one (for the answer's headers)."""
        rules = admission.rules
        spent = self._spending(admission.user, rules.periods, now, stores, admission.ledger)
        fullest, at = 0.0, 0
        for place, amount in enumerate(rules.amounts):  # a limited request's few numbers: a plain loop
            part = spent[place] / amount
            if part > fullest:
                fullest, at = part, place
        if fullest >= 1.0:  # a part rounds to 1.0 a little before its budget is reached: the budgets decide
            for budget, usd in zip(rules.budgets, spent, strict=True):
                if usd >= budget.usd:
                    raise refusals.budget(budget.per, budget.usd, ends(budget.per, now), now)
        admission.fullest = (fullest, rules.periods[at])

    def screen(self, admission: Admission | None, accounts: Sequence[Account]) -> tuple[frozenset[str], Refusal | None]:
        """The credentials this request must not go to (the user's share of its window used up, or its paid
        extra usage in use while the service denies it), and the refusal to give when none is left."""
        now = self.clock()
        excluded: set[str] = set()
        refusal: Refusal | None = None
        for account in accounts:
            if self._deny_overage and account.quota.overage_until > now:
                excluded.add(account.tag)
                refusal = refusal or refusals.overage(account.quota.overage_until, now)
                continue
            if admission is None or not admission.rules.windows or account.usage is None:
                continue
            used = admission.used(account.usage, now)
            for place, window, percent in admission.rules.windows:
                if used[place] >= percent:
                    excluded.add(account.tag)
                    reset = admission.ledger(account.usage).reset(window)
                    refusal = refusal or refusals.share(window, percent, reset, now)
        return frozenset(excluded), refusal

    # -- the answer ------------------------------------------------------------------------------

    def headers(self, admission: Admission | None, allow_external: bool, account: Account,
                accounts: Sequence[Account]) -> list[tuple[str, str]] | None:
        """The limit headers of this user's own standing, to send instead of the subscription's; None: the
        subscription's pass as they are (an open service's caller of one credential is its only user)."""
        if admission is None and len(accounts) <= 1:
            return None
        now = self.clock()
        windows = self._standing(admission, allow_external, account, accounts, now)
        return standing_headers(windows, self._budget_standing(admission, now), now)

    def _standing(self, admission: Admission | None, allow_external: bool, account: Account,
                  accounts: Sequence[Account], now: float) -> dict[str, Standing]:
        five, week = account.quota.utilization(now)
        if len(accounts) > 1:
            pooled = aggregate_status(accounts, now, allow_external=allow_external)
            five, week = pooled["five_hour_utilization"], pooled["weekly_utilization"]
        standing = {"five_hour": Standing(five / 100, account.quota.five_hour_reset),
                    "weekly": Standing(week / 100, account.quota.weekly_reset)}
        if admission is not None and admission.rules.windows and account.usage is not None:
            used = admission.used(account.usage, now)
            for place, window, percent in admission.rules.windows:
                mine = used[place] / percent
                if mine > standing[window].utilization:
                    reset = admission.ledger(account.usage).reset(window)
                    standing[window] = Standing(mine, reset or standing[window].reset)
        return {w: s for w, s in standing.items() if s.reset > 0}

    @staticmethod
    def _budget_standing(admission: Admission | None, now: float) -> BudgetStanding | None:
        """The fullest budget, from what the admission read, when it is close enough to its end to be reported."""
        if admission is None:
            return None
        utilization, per = admission.fullest
        if utilization < BUDGET_WARNINGS[-1]:
            return None  # nothing to report, or no budget (and no period end to work out)
        return BudgetStanding(utilization, ends(per, now), per)

    # -- what users and admins see --------------------------------------------------------------

    def sync(self) -> list[UsageStore]:
        """With shared state, let every usage ledger read what other nodes recorded: inside a request's batch,
        with its one round trip before forwarding; else at once (status views). Returns every usage store."""
        known = self._ledgered()
        for store in known.shared:
            store.sync()
        return known.stores

    def spent(self, user: str, per: str, now: float) -> float:
        """USD `user` spent in the current UTC `per` (day, week or month), over every usage ledger."""
        return self._spending(user, (per,), now, self._ledgered().stores, lambda store: store.current_ledger())[0]

    @staticmethod
    def _spending(user: str, periods: tuple[str, ...], now: float, stores: list[UsageStore],
                  ledger_of: Callable[[UsageStore], Ledger]) -> list[float]:
        """USD `user` spent in each of the current `periods`, over the ledgers of `stores` (every usage store)."""
        firsts = first_days(periods, day_of(now))
        if len(stores) == 1:  # the usual case
            return ledger_of(stores[0]).spent(user, firsts)
        totals = [0.0] * len(periods)
        for store in stores:
            for i, usd in enumerate(ledger_of(store).spent(user, firsts)):
                totals[i] += usd
        return totals

    def _ledgered(self) -> Ledgered:
        """Each usage store once, with an account that records into it (with shared state, credentials
        without a usage file share one); worked out again only when the list of accounts is another."""
        accounts = self.accounts()
        known = self._known
        if known is None or known.accounts is not accounts:
            found: dict[int, tuple[Account, UsageStore]] = {}
            for account in accounts:
                if account.usage is not None:
                    found.setdefault(id(account.usage), (account, account.usage))
            pairs = list(found.values())
            stores = [store for _, store in pairs]
            known = self._known = Ledgered(accounts, pairs, stores, [s for s in stores if s.shared is not None])
        return known

    def view(self, user: User) -> dict[str, Any]:
        """A user's limits and what is left of each, for the status endpoint and page."""
        self.sync()  # with shared state every node shows the same figures
        now = self.clock()
        limits = self.cfg.limits_for(user)
        view: dict[str, Any] = {"disabled": user.disabled,
                                "expires": user.expires.isoformat() if user.expires is not None else None,
                                "spent": {per: round(self.spent(user.name, per, now), 6) for per in ADJECTIVE}}
        if limits is None:
            return view
        view["budget"] = [{"per": b.per, "usd": b.usd, "spent": round(self.spent(user.name, b.per, now), 6),
                           "remaining": round(max(0.0, b.usd - self.spent(user.name, b.per, now)), 6),
                           "resets": ends(b.per, now)} for b in limits.budget]
        view["requests_per_minute"] = limits.requests_per_minute
        view["max_concurrent"] = limits.max_concurrent
        view["in_flight"] = self.counters.in_flight(user.name)
        view["models"] = list(limits.models)
        if limits.window_share is not None:
            view["window_share"] = self._share_view(user, limits, now)
        return view

    def _share_view(self, user: User, limits: LimitsConfig, now: float) -> dict[str, Any]:
        share = limits.window_share
        assert share is not None
        found: dict[str, Any] = {}
        for account, store in self._ledgered().pairs:
            ledger = store.current_ledger()
            used = ledger.shares(user.name, now)
            found[account.tag] = {name: {"share": percent, "used": round(used[place], 4),
                                         "resets": ledger.reset(name) or None}
                                  for place, name, percent in share.windows}
        return found

