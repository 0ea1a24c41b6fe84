"""Prometheus metrics of one ccm service: who used what, and what an operator alerts on.

prometheus_client keeps the counts and writes the exposition. Under gunicorn each worker's counts live in
files of the run's shared directory (`rundir.py`) and a scrape of any worker adds up the files of all
workers, those that exited included, so a replaced worker never makes a counter go back. `ccm-wsgi serve`
is one process: its counts live in memory.

Every label comes from a bounded set, never from what a client sent: `user` is a configured user name ("-"
for none), `model` the price row that names the model (`Pricing.label`: a row name, a config price's pattern,
or "other"), `status` an HTTP status, `credential` a configured tag, and `kind`, `limit`, `cause`, `result`
fixed words. Figures that are states rather than events (credential windows, budgets, the TLS certificate)
are read when Prometheus scrapes (`state.py`).

The request path pays for a few dictionary look-ups and counter increments per request (a usage record's
counts go straight to the children's values: see `_adder`) and nothing per streamed event; `CCM_METRICS=off`
in the environment leaves the metrics out altogether (`/metrics` answers 404), which is how the benchmark
measures what they cost.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .rundir import multiprocess_dir

if TYPE_CHECKING:
    from ..accounting.pricing import Pricing
    from ..accounting.records import Record

NOBODY = "-"  # the user label of requests without a user (an open service, a refused token)
KINDS = ("input", "output", "cache_read", "cache_write")
REFRESH_RESULTS = ("success", "failure", "adopted")
TRANSPORT = {502: "unreachable", 504: "timeout"}  # the upstream sent no answer: what the client got instead
# An answer's head can take from well under a second (a stream starts) to minutes (a long answer in one piece).
FIRST_BYTE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, float("inf"))


def enabled() -> bool:
    """Whether this process keeps metrics (`CCM_METRICS=off`: no, for measuring what they cost)."""
    return os.environ.get("CCM_METRICS", "").lower() != "off"


def _adder(child: Counter) -> Callable[[float], None]:
    """What `child.inc(n)` does, without the checks it repeats on every call (that the child has all its
    labels, that n is not negative): a usage record's counts hold both by construction, and they are added
    on every request. The value object is the one prometheus_client keeps for the child, in memory or in this
    worker's file."""
    adder: Callable[[float], None] = child._value.inc
    return adder


def cause(cut: str) -> str:
    """A stream cut's reason as a label value: `client gone` -> `client_gone`."""
    return cut.replace(" ", "_")


class Metrics:
    """The counters the proxy, the credentials and the usage stores feed, and the exposition."""

    def __init__(self, pricing: Pricing, credentials: Iterable[str]):
        self.pricing = pricing
        disable_created_metrics()  # no `_created` series: they double the exposition and Prometheus needs none
        shared = multiprocess_dir()
        self.registry = CollectorRegistry()
        own: CollectorRegistry | None = None if shared else self.registry  # files are collected below
        if shared:
            MultiProcessCollector(self.registry, shared)
        self.requests = Counter("ccm_requests", "Requests answered, by user, model and HTTP status",
                                ["user", "model", "status"], registry=own)
        self.tokens = Counter("ccm_tokens", "Tokens used, by user, model and kind (input, output, cache_read, "
                              "cache_write)", ["user", "model", "kind"], registry=own)
        self.cost = Counter("ccm_cost_usd", "USD the usage is worth at the price table's rates, by user and model",
                            ["user", "model"], registry=own)
        self.active = Gauge("ccm_active_requests", "Requests in progress, streams included",
                            multiprocess_mode="livesum", registry=own)
        self.first_byte = Histogram("ccm_upstream_first_byte_seconds", "Seconds until the upstream's answer began",
                                    buckets=FIRST_BYTE_BUCKETS, registry=own)
        self.upstream_errors = Counter("ccm_upstream_errors", "Upstream answers with an error status, by status "
                                       "(unreachable or timeout when none came)", ["status"], registry=own)
        self.refusals = Counter("ccm_refusals", "Requests a limit refused, by user and limit",
                                ["user", "limit"], registry=own)
        self.cuts = Counter("ccm_stream_cuts", "Responses cut short, by cause", ["cause"], registry=own)
        self.refreshes = Counter("ccm_token_refresh", "Subscription token refreshes, by credential and result "
                                 "(success, failure, adopted from another process)", ["credential", "result"],
                                 registry=own)
        self.save_failures = Counter("ccm_usage_save_failures", "Failed saves of a usage file", registry=own)
        for tag in credentials:
            for result in REFRESH_RESULTS:
                self.refreshes.labels(tag, result)
        self._requests: dict[tuple[str, str, int], Any] = {}
        self._usage: dict[tuple[str, str], tuple[Callable[[float], None], ...]] = {}  # input .. cache_write, cost

    def watch(self, collector: Collector) -> None:
        """Add figures read at scrape time."""
        self.registry.register(collector)

    def scrape(self, accept: str) -> tuple[bytes, str]:
        """The exposition in the format the scraper accepts (Prometheus text, or OpenMetrics), and its type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    # -- what the proxy reports --------------------------------------------------------------------

    def started(self) -> None:
        self.active.inc()

    def answered(self, seconds: float, status: int) -> None:
        """The upstream's answer began after `seconds`, with `status`."""
        self.first_byte.observe(seconds)
        if status >= 400:
            self.upstream_errors.labels(str(status)).inc()

    def unanswered(self, status: int) -> None:
        """No answer came from the upstream; the client gets `status` (502 or 504)."""
        self.upstream_errors.labels(TRANSPORT.get(status, str(status))).inc()

    def finished(self, user: str, model: str, status: int, record: Record | None, refused: str, cut: str) -> None:
        """One request is over: what it used (its usage record, when it has one), how it ended."""
        self.active.dec()
        user = user or NOBODY
        label = self.pricing.label(record.model if record is not None else model)
        key = (user, label, status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.requests.labels(user, label, str(status))
        counter.inc()
        if record is not None:
            usage = self._usage.get(key[:2])
            if usage is None:
                usage = self._usage[key[:2]] = (*(_adder(self.tokens.labels(user, label, kind)) for kind in KINDS),
                                                _adder(self.cost.labels(user, label)))
            add_input, add_output, add_cache_read, add_cache_write, add_cost = usage
            t = record.tokens
            if t.input_tokens:
                add_input(t.input_tokens)
            if t.output_tokens:
                add_output(t.output_tokens)
            if t.cache_read_input_tokens:
                add_cache_read(t.cache_read_input_tokens)
            if t.cache_creation_input_tokens:
                add_cache_write(t.cache_creation_input_tokens)
            if record.cost:
                add_cost(record.cost)
        if refused:
            self.refusals.labels(user, refused).inc()
        if cut:
            self.cuts.labels(cause(cut)).inc()

    # -- what the credentials and the usage stores report -------------------------------------------

    def refreshed(self, credential: str, result: str) -> None:
        self.refreshes.labels(credential, result).inc()

    def save_failed(self) -> None:
        self.save_failures.inc()
