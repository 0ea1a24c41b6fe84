"""The `credentials` of a pooled service: one options type per credential type, chosen by `type`.

As sing-box's own options, a credential is a tagged union: `default` (a Claude subscription's OAuth
credential file; also the type when `type` is "" or absent), `external` (another ccm instance, used
with one of its user tokens), `balancer` (a choice among default and external credentials by a
strategy) and `fallback` (a balancer whose strategy is `fallback`). A key of another type is refused
with the type it belongs to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo

from ..names import STRATEGIES
from .base import (
    REQUIRED,
    Problem,
    Reading,
    Required,
    Section,
    check_value,
    context_of,
    fail,
    key_of,
    problem_error,
    problems_of,
    quote,
    read_as,
)
from .values import Bool, FilePath, Name, Port, Str, duration, integer, name, number, plain, string, strings, token, url

POLL_INTERVAL = 60.0  # how often an idle pooled credential's quota is polled, unless a balancer asks for less


def strategy(value: object) -> str:
    text = string(value)
    spelled = text.replace("-", "_")
    if spelled not in STRATEGIES:
        fail(f"unknown strategy {quote(text)} (least_used, round_robin, random or fallback)")
    return spelled


def _kind(value: str) -> Any:
    """The `type` of a union member: already checked by the union that chose the class."""
    return plain(lambda _: value)


PollInterval = Annotated[float, duration(zero_means=POLL_INTERVAL)]
Reserve = Annotated[int, integer(0, 99)]  # percent
Cap = Annotated[int, integer(0, 100)]  # percent
Tag = Annotated[str, plain(name), REQUIRED]
PeerUrl = Annotated[str, url(base=True), Required(
    "required: an external credential without url only works over reverse tunnels, which ccm-wsgi does not support")]
PeerToken = Annotated[str, token(), REQUIRED]
Strategy = Annotated[str, plain(strategy)]
Members = Annotated[tuple[str, ...], plain(strings), REQUIRED]


class _Credential(Section):
    tag: Tag = Field(default="", description="the name users and balancers use")

    @classmethod
    def unknown_key(cls, key: str) -> str:
        owners = [kind for kind, other in _TYPES.items() if other is not cls and key in other.model_fields]
        return f"only valid for {' or '.join(owners)} credentials" if owners else "unknown key"


class DefaultCredential(_Credential):
    """A Claude subscription: Claude Code's OAuth credential file, refreshed in place."""

    type: Annotated[Literal["default"], _kind("default")] = "default"
    credential_path: FilePath = Field(default="", description="the credential file (default: Claude Code's own)")
    usages_path: FilePath = Field(default="", description="this credential's usage file (none: usage is not recorded)")
    detour: Str = Field(default="", description="tag of the outbound that carries this credential's traffic")
    reserve_5h: Reserve = Field(default=0, description="percent of the 5-hour window left unused")
    reserve_weekly: Reserve = Field(default=0, description="percent of the weekly window left unused")
    limit_5h: Cap = Field(default=0, description="stop at this percent of the 5-hour window")
    limit_weekly: Cap = Field(default=0, description="stop at this percent of the weekly window")

    def relations(self, read: Reading) -> Iterator[Problem]:
        for window in ("5h", "weekly"):
            if getattr(self, f"reserve_{window}") and getattr(self, f"limit_{window}"):
                yield Problem((f"limit_{window}",), f"mutually exclusive with reserve_{window}")


class ExternalCredential(_Credential):
    """Another ccm instance, reached at `url` with one of its user tokens."""

    type: Annotated[Literal["external"], _kind("external")] = "external"
    url: PeerUrl = Field(default="", description="the other instance's base URL")
    server: Name = Field(default="", description="connect to this host instead of the URL's")
    server_port: Port = Field(default=0, description="connect to this port instead of the URL's")
    token: PeerToken = Field(default="", description="a user token of the other instance")
    reverse: Bool = Field(default=False, description="sing-box's reverse tunnels; not supported")
    detour: Str = Field(default="", description="tag of the outbound that carries this credential's traffic")
    usages_path: FilePath = Field(default="", description="this credential's usage file")
    poll_interval: PollInterval = Field(default=POLL_INTERVAL, description="how often the peer's status is polled")

    def relations(self, read: Reading) -> Iterator[Problem]:
        if self.reverse:
            yield Problem(("reverse",), "reverse tunnels are not supported by ccm-wsgi")


class BalancerCredential(_Credential):
    """A choice among default and external credentials; type `fallback` means strategy `fallback`."""

    type: Annotated[Literal["balancer", "fallback"], plain(
        lambda declared: "fallback" if declared == "fallback" else "balancer")] = "balancer"
    strategy: Strategy = Field(
        default_factory=lambda data: "fallback" if data.get("type") == "fallback" else "least_used",
        description="least_used, round_robin, random or fallback (default: fallback for type fallback)")
    credentials: Members = Field(
        default=(), description="the tags of the default and external credentials to choose among, in order")
    poll_interval: PollInterval = Field(
        default=POLL_INTERVAL, description="poll each member's quota at least this often")
    rebalance_threshold: Annotated[float, number(0.0, 100.0)] = Field(
        default=0.0, description="least_used: move a session when its credential is this many points above the best")

    def relations(self, read: Reading) -> Iterator[Problem]:
        if self.type == "fallback" and "strategy" in read.given and self.strategy != "fallback":
            yield Problem(("strategy",), 'conflicts with type "fallback"')
        if self.rebalance_threshold and self.strategy != "least_used":
            yield Problem(("rebalance_threshold",), "only used by the least_used strategy")
        if "credentials" in read.given and not self.credentials:
            yield Problem(("credentials",), "must name at least one credential")


Credential = DefaultCredential | ExternalCredential | BalancerCredential
_TYPES: dict[str, type[Credential]] = {
    "default": DefaultCredential, "external": ExternalCredential, "balancer": BalancerCredential}


def read_credential(value: Any, info: ValidationInfo) -> Credential:
    """The credential class its `type` names. One of an unknown type is kept (with that type) while the
    document is read, so that users and balancers naming its tag get no second, misleading problem."""
    if isinstance(value, (DefaultCredential, ExternalCredential, BalancerCredential)):
        return value
    if not isinstance(value, dict):
        fail("must be an object")
    declared = "" if value.get("type") is None else check_value(string, value["type"], ("type",))
    if isinstance(declared, str) and declared not in ("", "fallback", *_TYPES):
        tag = key_of(value, "tag", name)
        ctx = context_of(info)
        if ctx is not None and isinstance(tag, str):
            ctx.keep(value, DefaultCredential.model_construct(tag=tag, type=declared))
        raise problem_error([*([tag] if isinstance(tag, Problem) else []), Problem(
            ("type",), f"unknown credential type {quote(declared)} (default, external, balancer or fallback)")])
    kind = declared if isinstance(declared, str) else ""  # a type that is not a string reads as default
    cls = _TYPES.get({"": "default", "fallback": "balancer"}.get(kind, kind), DefaultCredential)
    if isinstance(declared, str):
        return read_as(cls, value, info)
    try:
        read_as(cls, value, info)
    except ValidationError as exc:
        raise problem_error([declared, *problems_of(exc)]) from None
    raise problem_error([declared])


CredentialEntry = Annotated[Credential, plain(read_credential)]
