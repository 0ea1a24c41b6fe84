"""Outbounds: `socks`, `http` and `direct` carry ccm traffic; other sing-box types are accepted as opaque.

An outbound is chosen by its `type` (a tagged union, as sing-box's option types). sing-box's dial fields
are accepted: `connect_timeout` is honoured, the others are type-checked and not used; `detour` on an
outbound (a chain of outbounds) is refused, because traffic would silently skip the chain. Outbounds of
other types (shadowsocks, selector, ...) are kept as `OtherOutbound`: a service cannot use one as its
`detour`. An outbound without a tag is named after its index, as in sing-box (`Config.outbounds`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, ValidationInfo

from .base import (
    REQUIRED,
    Problem,
    Reading,
    Refused,
    Section,
    check_value,
    context_of,
    fail,
    key_of,
    problem_error,
    read_as,
)
from .headers import Headers
from .tls import OutboundTLS, if_enabled
from .values import (
    Anything,
    Bool,
    Name,
    OptionalDuration,
    Str,
    Strings,
    duration,
    integer,
    name,
    plain,
    string,
)

USABLE_OUTBOUNDS = ("socks", "http", "direct")
_SOCKS_VERSIONS: dict[object, str] = {"4": "4", "4a": "4a", "5": "5", 4: "4", 5: "5"}


def socks_version(value: object) -> str:
    version = _SOCKS_VERSIONS.get(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if version is None:
        fail('must be "4", "4a" or "5"')
    return version


class SocketOptions(Section):
    """Socket fields that sing-box's listen and dial fields share; accepted, type-checked and not used."""

    bind_interface: Str = Field(default="", description="accepted for sing-box compatibility; not used")
    routing_mark: Anything = Field(default=None, description="accepted for sing-box compatibility; not used")
    netns: Str = Field(default="", description="accepted for sing-box compatibility; not used")
    tcp_fast_open: Bool = Field(default=False, description="accepted for sing-box compatibility; not used")
    tcp_multi_path: Bool = Field(default=False, description="accepted for sing-box compatibility; not used")
    udp_fragment: Bool = Field(default=False, description="accepted for sing-box compatibility; not used")
    domain_strategy: Str = Field(default="", description="deprecated in sing-box; accepted, not used")


class _Dial(SocketOptions):
    """sing-box's dial fields."""

    tag: Str = Field(default="", description="the name a detour uses (default: the outbound's index)")
    connect_timeout: Annotated[float | None, duration()] = Field(
        default=None, description="connection set-up through this outbound (default: the service's connect_timeout)")
    detour: Annotated[object, Refused(
        "not supported by ccm-wsgi (chaining outbounds); point the service's detour at the first hop")] = None
    tcp_keep_alive_interval: OptionalDuration = Field(
        default=0.0, description="accepted for sing-box compatibility; not used")
    inet4_bind_address: Str = Field(default="", description="accepted for sing-box compatibility; not used")
    inet6_bind_address: Str = Field(default="", description="accepted for sing-box compatibility; not used")
    bind_address_no_port: Bool = Field(default=False, description="accepted for sing-box compatibility; not used")
    reuse_addr: Bool = Field(default=False, description="accepted for sing-box compatibility; not used")
    disable_tcp_keep_alive: Bool = Field(default=False, description="accepted for sing-box compatibility; not used")
    tcp_keep_alive: OptionalDuration = Field(default=0.0, description="accepted for sing-box compatibility; not used")
    domain_resolver: Anything = Field(default=None, description="accepted for sing-box compatibility; not used")
    network_strategy: Str = Field(default="", description="accepted for sing-box compatibility; not used")
    network_type: Strings = Field(default=(), description="accepted for sing-box compatibility; not used")
    fallback_network_type: Strings = Field(default=(), description="accepted for sing-box compatibility; not used")
    fallback_delay: OptionalDuration = Field(default=0.0, description="accepted for sing-box compatibility; not used")


def _kind(value: str) -> Any:
    """The `type` of a union member: already checked by the union that chose the class."""
    return plain(lambda _: value)


Server = Annotated[str, plain(name), REQUIRED]
ServerPort = Annotated[int, integer(1, 65535), REQUIRED]


class _Proxy(_Dial):
    server: Server = Field(default="", description="the proxy's host")
    server_port: ServerPort = Field(default=0, description="the proxy's port")
    username: Str = Field(default="", description="user name at the proxy")
    password: Str = Field(default="", description="password at the proxy (never shown in messages)")


class SocksOutbound(_Proxy):
    type: Annotated[Literal["socks"], _kind("socks")] = "socks"
    version: Annotated[str, plain(socks_version)] = Field(
        default="5", description='"4", "4a" or "5"; 4a and 5 let the proxy resolve the name')
    network: Str = Field(default="", description="accepted for sing-box compatibility (ccm is TCP only)")
    udp_over_tcp: Anything = Field(default=None, description="accepted for sing-box compatibility (ccm is TCP only)")

    def relations(self, read: Reading) -> Iterator[Problem]:
        if self.version != "5" and self.password:
            yield Problem(("password",), "only valid with socks version 5")


class HttpOutbound(_Proxy):
    type: Annotated[Literal["http"], _kind("http")] = "http"
    path: Str = Field(
        default="", description="accepted; cannot be put on a CONNECT line, so it is ignored with a warning")
    headers: Headers = Field(default={}, description="extra headers on the CONNECT request")
    tls: Annotated[OutboundTLS | None, AfterValidator(if_enabled)] = Field(
        default=None, description="TLS to the proxy (an https:// proxy)")


class DirectOutbound(_Dial):
    type: Annotated[Literal["direct"], _kind("direct")] = "direct"


class OtherOutbound(Section):
    """An outbound of a type ccm-wsgi cannot dial through; only its type and tag are read."""

    model_config = ConfigDict(extra="allow")

    type: Name = ""
    tag: Str = ""


DialOutbound = SocksOutbound | HttpOutbound | DirectOutbound
Outbound = DialOutbound | OtherOutbound
_BY_TYPE: dict[str, type[DialOutbound]] = {"socks": SocksOutbound, "http": HttpOutbound, "direct": DirectOutbound}


def read_outbound(value: Any, info: ValidationInfo) -> Outbound:
    """The outbound class its `type` names. One without a usable type still claims its tag (it is kept as an
    `OtherOutbound` with an empty type while the document is read), so that a duplicate tag is still found."""
    if isinstance(value, (SocksOutbound, HttpOutbound, DirectOutbound, OtherOutbound)):
        return value
    if not isinstance(value, dict):
        fail("must be an object")
    kind = key_of(value, "type", name)
    if isinstance(kind, Problem):
        problems = [kind]
        tag = check_value(string, value.get("tag", ""), ("tag",)) if value.get("tag") is not None else ""
        if isinstance(tag, Problem):
            problems.append(tag)
        ctx = context_of(info)
        if ctx is not None:
            ctx.keep(value, OtherOutbound.model_construct(type="", tag=tag if isinstance(tag, str) else ""))
        raise problem_error(problems)
    return read_as(_BY_TYPE[kind], value, info) if kind in _BY_TYPE else read_as(OtherOutbound, value, info)


OutboundEntry = Annotated[Outbound, plain(read_outbound)]
