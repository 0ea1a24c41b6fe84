"""A ccm service: its listener, its users, its credentials and ccm-wsgi's own extensions.

Two modes, as in sing-box: a single credential given by the service-level `credential_path`,
`usages_path` and `detour` (every upstream answer, a 429 included, passes through), or a pool of
`credentials` with users bound to one of them (quota 429s fail over to another credential). The model
hides the difference where it does not matter: `effective_credentials` is the pool, or the single
credential as a `DefaultCredential` tagged "default", and `pooled` tells the modes apart.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from ..anthropic import DEFAULT_AUTHORIZE_URL, DEFAULT_TOKEN_URL, DEFAULT_UPSTREAM_URL
from ..names import HOP_BY_HOP
from .base import REF, Loc, Problem, Reading, claim, entries, quote
from .credentials import (
    POLL_INTERVAL,
    BalancerCredential,
    Credential,
    CredentialEntry,
    DefaultCredential,
    ExternalCredential,
)
from .headers import headers
from .limits import Limits
from .outbounds import SocketOptions
from .pricing import Price
from .state import RedisState
from .tls import InboundTLS, if_enabled
from .users import User, token_digest
from .values import (
    BaseUrl,
    Bool,
    Duration,
    FilePath,
    IpAddress,
    OptionalDuration,
    Port,
    Str,
    Url,
    UserToken,
    choice,
    duration,
    integer,
    plain,
    string,
)

SINGLE_POLL_INTERVAL = 300.0  # the single credential's quota is only shown, so it is polled less often
_NEVER_FORWARDED = "hop-by-hop headers describe one connection and are never forwarded"
FORBIDDEN_HEADERS = {
    "authorization": "ccm-wsgi sets it to the subscription's OAuth access token",
    "x-api-key": "the upstream is authenticated with the OAuth access token, never an API key",
    "host": "it comes from upstream_url",
    "content-length": "it is computed from each request body",
    **dict.fromkeys(sorted(HOP_BY_HOP), _NEVER_FORWARDED),
}
_IGNORED = "accepted for sing-box compatibility; not used"
_STATE_HINT = 'or use shared state: "state": {"type": "redis", "url": ...}'
Pooled = DefaultCredential | ExternalCredential


ServiceHeaders = Annotated[dict[str, tuple[str, ...]], headers(FORBIDDEN_HEADERS)]
ServiceTag = Annotated[str, plain(string), AfterValidator(lambda tag: tag or "ccm")]


class Service(SocketOptions):
    type: Annotated[Literal["ccm"], plain(lambda _: "ccm")] = "ccm"
    tag: ServiceTag = Field(default="ccm", description="the service's name")
    listen: IpAddress = Field(default="127.0.0.1", description="the address to listen on (an IP literal)")
    listen_port: Port = Field(default=8080, description="the port to listen on; 0 picks a free one")
    credential_path: FilePath = Field(default="", description="single credential: the OAuth credential file")
    usages_path: FilePath = Field(default="", description="single credential: the usage file")
    detour: Str = Field(default="", description="single credential: tag of the outbound for everything sent upstream")
    users: tuple[User, ...] = Field(default=(), description="who may call the service; none: anyone who can reach it")
    headers: ServiceHeaders = Field(
        default={}, description="extra upstream headers, replacing same-named ones")
    tls: Annotated[InboundTLS | None, AfterValidator(if_enabled)] = Field(
        default=None, description="TLS on the listener")
    credentials: tuple[CredentialEntry, ...] = Field(default=(), description="several subscriptions (a pool)")
    reuse_addr: Bool = Field(default=False, description="SO_REUSEADDR on the listening socket")
    tcp_keep_alive: Annotated[float, duration(zero_means=300.0)] = Field(
        default=300.0, description="idle time before the first TCP keep-alive probe on accepted connections")
    tcp_keep_alive_interval: Annotated[float, duration(zero_means=75.0)] = Field(
        default=75.0, description="time between TCP keep-alive probes")
    disable_tcp_keep_alive: Bool = Field(default=False, description="no TCP keep-alive on accepted connections")
    udp_timeout: OptionalDuration = Field(default=0.0, description=_IGNORED)
    sniff: Bool = Field(default=False, description=_IGNORED)
    sniff_override_destination: Bool = Field(default=False, description=_IGNORED)
    sniff_timeout: OptionalDuration = Field(default=0.0, description=_IGNORED)
    udp_disable_domain_unmapping: Bool = Field(default=False, description=_IGNORED)
    # ccm-wsgi's extensions
    upstream_url: BaseUrl = Field(default=DEFAULT_UPSTREAM_URL, description="where /v1/* goes")
    token_url: Url = Field(default=DEFAULT_TOKEN_URL, description="the OAuth token endpoint")
    authorize_url: Url = Field(default=DEFAULT_AUTHORIZE_URL, description="the OAuth authorize page (ccm-wsgi login)")
    admin_tokens: tuple[UserToken, ...] = Field(default=(), description="tokens that see every user and credential")
    pricing: tuple[Price, ...] = Field(default=(), description="prices tried before the built-in table")
    max_request_body_size: Annotated[int, integer(1, 2**53)] = Field(
        default=32 * 1024 * 1024, description="larger request bodies get 413")
    connect_timeout: Duration = Field(default=10.0, description="upstream connection set-up")
    response_timeout: Duration = Field(default=600.0, description="wait for the upstream's response head")
    stream_idle_timeout: Duration = Field(default=300.0, description="silence allowed inside a response body")
    shutdown_grace: OptionalDuration = Field(default=30.0, description="how long a stop waits for requests in flight")
    client_timeout: Duration = Field(default=60.0, description="idle keep-alive connections and slow request heads")
    limits: Limits | None = Field(default=None, description="every user's limits, unless the user has its own")
    overage: Annotated[str, choice("allow", "deny")] = Field(
        default="allow", description="deny: refuse requests once the subscription's own limits are reached")
    state: RedisState | None = Field(default=None, description="shared state for several nodes (default: this host)")

    # -- what the runtime asks ----------------------------------------------------------------------

    @property
    def pooled(self) -> bool:
        """Pool mode: quota 429s fail over to another credential. Otherwise every answer passes through."""
        return bool(self.credentials)

    @functools.cached_property
    def effective_credentials(self) -> tuple[Credential, ...]:
        """The pool, or the single credential as a DefaultCredential tagged "default" (never capped)."""
        if self.credentials:
            return self.credentials
        return (DefaultCredential(tag="default", credential_path=self.credential_path, usages_path=self.usages_path,
                                  detour=self.detour, limit_5h=100, limit_weekly=100),)

    @property
    def default_poll_interval(self) -> float:
        """How often an idle default credential's quota is polled (a balancer may ask for more often)."""
        return POLL_INTERVAL if self.pooled else SINGLE_POLL_INTERVAL

    def limits_for(self, user: User | None) -> Limits | None:
        """The limits that apply to `user` (None: an open service's caller): its own, else the service's."""
        if user is not None and user.limits is not None:
            return user.limits
        return self.limits

    def reachable(self, tag: str) -> tuple[Pooled, ...]:
        """The default and external credentials a request bound to credential `tag` may be sent to."""
        return _reach({c.tag: c for c in self.effective_credentials}, tag)

    # -- relations ----------------------------------------------------------------------------------

    def reads_as_pooled(self) -> bool:
        """`pooled`, also on a partial object: some credential could be read with its tag."""
        return any(credential.tag for _, credential in entries(self.credentials))

    def relations(self, read: Reading) -> Iterator[Problem]:
        pooled = self.reads_as_pooled()
        if pooled:
            for key in ("credential_path", "usages_path", "detour"):
                if getattr(self, key):
                    yield Problem((key,), "mutually exclusive with credentials; set it on each credential instead")
        catalogue: dict[str, Credential] = {}
        yield from self._credential_problems(read, catalogue)
        digests: dict[bytes, Loc] = {}
        yield from self._user_problems(catalogue if pooled else None, digests)
        seen: dict[bytes, Loc] = {}
        for index, admin in entries(self.admin_tokens):
            digest, loc = token_digest(admin), ("admin_tokens", index)
            if digest in digests:
                yield Problem(loc, f"same as the token of {REF}; an admin token must differ from user tokens",
                              (digests[digest],))
            elif first := claim(seen, digest, loc):
                yield Problem(loc, f"duplicate admin token (same as {REF})", (first,))
        if self.state is None:
            yield from self._ledger_problems(catalogue if pooled else None)

    def _credential_problems(self, read: Reading, catalogue: dict[str, Credential]) -> Iterator[Problem]:
        tags: dict[str, Loc] = {}
        for index, credential in entries(self.credentials):
            if credential.tag:
                first = claim(tags, credential.tag, ("credentials", index))
                if first:
                    yield Problem(("credentials", index, "tag"),
                                  f"duplicate tag {quote(credential.tag)} (same as {REF})", (first,))
                else:
                    catalogue[credential.tag] = credential
        raw = read.given.get("credentials")
        for index, credential in entries(self.credentials):
            if isinstance(credential, BalancerCredential) and isinstance(raw, list) and isinstance(raw[index], Mapping):
                listed = isinstance(raw[index].get("credentials"), list)
                yield from _member_problems(credential, ("credentials", index, "credentials"), listed, catalogue)

    def _user_problems(self, catalogue: Mapping[str, Credential] | None,
                       digests: dict[bytes, Loc]) -> Iterator[Problem]:
        """Per user: its credential (pooled) or none (single); names and tokens unique. `digests` gets filled."""
        names: dict[str, Loc] = {}
        for index, user in entries(self.users):
            loc: Loc = ("users", index)
            if catalogue is None:
                for key in ("credential", "external_credential"):
                    if getattr(user, key):
                        yield Problem((*loc, key), "only valid with credentials")
            else:
                yield from _user_credential_problems(user, loc, catalogue)
            if user.name and (first := claim(names, user.name, loc)):  # a missing or invalid one cannot clash
                yield Problem((*loc, "name"), f"duplicate name {quote(user.name)} (same as {REF})", (first,))
            if (user.token or user.token_sha256) and (first := claim(digests, user.digest, loc)):
                field = "token_sha256" if user.token_sha256 else "token"
                yield Problem((*loc, field), f"duplicate token (same as {REF})", (first,))

    def _ledger_problems(self, catalogue: Mapping[str, Credential] | None) -> Iterator[Problem]:
        """Budgets and window shares are counted from the usage records: every credential a limited user can
        reach must keep them (without shared state)."""
        inheriting: list[User | None] = [user for _, user in entries(self.users) if user.limits is None] or [None]
        places: list[tuple[Loc, Limits, list[User | None]]] = [
            (("users", index, "limits"), user.limits, [user])
            for index, user in entries(self.users) if user.limits is not None]
        if self.limits is not None and (inheriting != [None] or not self.users):
            places.insert(0, (("limits",), self.limits, inheriting))
        for loc, limits, users in places:
            if not limits.needs_ledger:
                continue
            keys = [key for key in ("budget", "window_share") if getattr(limits, key)]
            what = f"{' and '.join(keys)} {'are' if len(keys) > 1 else 'is'} counted from the usage records"
            if catalogue is None:
                if not self.usages_path:
                    yield Problem(loc, f"{what}: set the service's usages_path ({_STATE_HINT})")
                continue
            first = next(iter(catalogue), "")
            missing = sorted({c.tag for user in users
                              for c in _reach(catalogue, user.credential if user is not None else first)
                              if not c.usages_path})
            if missing:
                names = ", ".join(quote(tag) for tag in missing)
                yield Problem(loc, f"{what}, which credential{'s' if len(missing) > 1 else ''} {names} "
                                   f"{'do' if len(missing) > 1 else 'does'} not keep: set usages_path there "
                                   f"({_STATE_HINT})")


def _reach(catalogue: Mapping[str, Any], tag: str) -> tuple[Pooled, ...]:
    credential = catalogue.get(tag)
    members = credential.credentials if isinstance(credential, BalancerCredential) else (tag,)
    found = (catalogue.get(t) for t in members)
    return tuple(c for c in found if isinstance(c, (DefaultCredential, ExternalCredential)))


def _only_external(credential: Credential, catalogue: Mapping[str, Credential]) -> bool:
    """Whether every credential a user bound to `credential` could be routed to is external."""
    members = credential.credentials if isinstance(credential, BalancerCredential) else (credential.tag,)
    types = [catalogue[tag].type for tag in members if tag in catalogue]
    return bool(types) and all(kind == "external" for kind in types)


def _member_problems(balancer: BalancerCredential, loc: Loc, listed: bool,
                     catalogue: Mapping[str, Credential]) -> Iterator[Problem]:
    seen: set[str] = set()
    for index, tag in enumerate(balancer.credentials):
        where = (*loc, index) if listed else loc
        target = catalogue.get(tag)
        if target is None:
            yield Problem(where, f"unknown credential {quote(tag)}")
        elif isinstance(target, BalancerCredential):
            yield Problem(where, f"{quote(tag)} is a balancer; balancers cannot be nested")
        elif tag in seen:
            yield Problem(where, f"{quote(tag)} is listed twice")
        seen.add(tag)


def _user_credential_problems(user: User, loc: Loc, catalogue: Mapping[str, Credential]) -> Iterator[Problem]:
    credential = catalogue.get(user.credential)
    if not user.credential:
        yield Problem((*loc, "credential"),
                      "required in multi-credential mode (the tag of one of the service's credentials)")
    elif credential is None:
        yield Problem((*loc, "credential"), f"unknown credential {quote(user.credential)}")
    elif not user.allow_external_usage and _only_external(credential, catalogue):
        yield Problem((*loc, "credential"), f"credential {quote(user.credential)} only reaches external "
                                            "credentials, which this user may not use; set allow_external_usage: true")
    if user.external_credential:
        external = catalogue.get(user.external_credential)
        if external is None:
            yield Problem((*loc, "external_credential"), f"unknown credential {quote(user.external_credential)}")
        elif not isinstance(external, ExternalCredential):
            yield Problem((*loc, "external_credential"), f"must name an external credential "
                                                         f"({quote(external.tag)} has type {quote(external.type)})")
