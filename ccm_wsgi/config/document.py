"""The whole document: sing-box's top-level layout, and what ties its parts together.

Top-level `log`, `outbounds` and `services`; every service of type `ccm` is ours, services of other
types are ignored, and sing-box's other sections (`dns`, `ntp`, `inbounds`, `route`, `experimental`,
`endpoints`, `certificate`) are accepted and not read. Checks that span services and outbounds live
here: outbound and service tags are unique, a `detour` names an outbound ccm-wsgi can dial through,
two listeners do not clash, a usage file has one writer and is not a credential file.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import ConfigDict, Field, ValidationInfo

from .base import (
    REF,
    Loc,
    Problem,
    Reading,
    Section,
    claim,
    entries,
    fail,
    key_of,
    problem_error,
    quote,
    read_as,
)
from .credentials import DefaultCredential, ExternalCredential
from .log import LogConfig
from .outbounds import USABLE_OUTBOUNDS, DialOutbound, OtherOutbound, Outbound, OutboundEntry
from .service import Service
from .values import Anything, Name, name, plain

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_SINGBOX = "a sing-box section; accepted, not read"


class OtherService(Section):
    """A sing-box service of another type; nothing but its type is read."""

    model_config = ConfigDict(extra="allow")

    type: Name = ""


def read_service(value: Any, info: ValidationInfo) -> Service | OtherService:
    """A ccm service is read in full; any other is kept with its type only, unread, as sing-box's own."""
    if isinstance(value, (Service, OtherService)):
        return value
    if not isinstance(value, dict):
        fail("must be an object")
    kind = key_of(value, "type", name)
    if isinstance(kind, Problem):
        raise problem_error([kind])
    if kind == "ccm":
        return read_as(Service, value, info)
    return OtherService.model_construct(type=kind)


class Config(Section):
    log: LogConfig = Field(default_factory=LogConfig, description="logging")
    outbound_list: tuple[OutboundEntry, ...] = Field(
        default=(), alias="outbounds", description="ways out to the upstream")
    service_list: tuple[Annotated[Service | OtherService, plain(read_service)], ...] = Field(
        default=(), alias="services", description="the ccm services (and sing-box services of other types)")
    dns: Anything = Field(default=None, description=_SINGBOX)
    ntp: Anything = Field(default=None, description=_SINGBOX)
    inbounds: Anything = Field(default=None, description=_SINGBOX)
    route: Anything = Field(default=None, description=_SINGBOX)
    experimental: Anything = Field(default=None, description=_SINGBOX)
    endpoints: Anything = Field(default=None, description=_SINGBOX)
    certificate: Anything = Field(default=None, description=_SINGBOX)

    @functools.cached_property
    def outbounds(self) -> dict[str, DialOutbound]:
        """The outbounds ccm-wsgi can dial through (socks, http, direct), by tag (an untagged one by index)."""
        return {outbound.tag or str(index): outbound for index, outbound in enumerate(self.outbound_list)
                if not isinstance(outbound, OtherOutbound)}

    @functools.cached_property
    def services(self) -> tuple[Service, ...]:
        """The ccm services, in file order."""
        return tuple(s for s in self.service_list if isinstance(s, Service))

    def relations(self, read: Reading) -> Iterator[Problem]:
        kinds: dict[str, str] = {}  # outbound tag -> type
        yield from self._outbound_problems(kinds)
        found = False
        tags: dict[str, Loc] = {}
        listeners: list[tuple[_Address, int, Loc]] = []
        files = _Files()
        for index, service in entries(self.service_list):
            if not isinstance(service, Service):
                continue
            found = True
            loc: Loc = ("services", index)
            if first := claim(tags, service.tag, loc):
                yield Problem((*loc, "tag"), f"duplicate tag {quote(service.tag)} (same as {REF})", (first,))
            yield from _listener_problems(service, loc, listeners)
            if service.reads_as_pooled():
                for number, credential in entries(service.credentials):
                    if isinstance(credential, (DefaultCredential, ExternalCredential)):
                        where: Loc = (*loc, "credentials", number)
                        yield from _detour_problems(credential.detour, (*where, "detour"), kinds)
                        if isinstance(credential, DefaultCredential):
                            files.credential(credential.credential_path, (*where, "credential_path"))
                        yield from files.usage(credential.usages_path, (*where, "usages_path"))
            else:
                yield from _detour_problems(service.detour, (*loc, "detour"), kinds)
                files.credential(service.credential_path, (*loc, "credential_path"))
                yield from files.usage(service.usages_path, (*loc, "usages_path"))
        yield from files.shared()
        if not found:
            yield Problem(("services",), 'no service of type "ccm"')

    def _outbound_problems(self, kinds: dict[str, str]) -> Iterator[Problem]:
        seen: dict[str, Loc] = {}
        for index, outbound in entries(self.outbound_list):
            tag = outbound.tag or str(index)  # sing-box names an untagged outbound after its index
            if first := claim(seen, tag, ("outbounds", index)):
                yield Problem(("outbounds", index, "tag"), f"duplicate tag {quote(tag)} (same as {REF})", (first,))
            elif outbound.type:
                kinds[tag] = outbound.type


def _detour_problems(tag: str, loc: Loc, kinds: dict[str, str]) -> Iterator[Problem]:
    """A detour must name an outbound ccm-wsgi can dial through."""
    if not tag:
        return
    kind = kinds.get(tag)
    if kind is None:
        yield Problem(loc, f"unknown outbound {quote(tag)}")
    elif kind not in USABLE_OUTBOUNDS:
        yield Problem(loc, f"outbound {quote(tag)} has type {quote(kind)}, which ccm-wsgi cannot use "
                           "(socks, http or direct only)")


def _overlaps(a: _Address, b: _Address) -> bool:
    """Whether binding both addresses on one port clashes (a wildcard `::` also covers IPv4)."""
    if a == b:
        return True
    wildcard = a if a.is_unspecified else b if b.is_unspecified else None
    return wildcard is not None and (wildcard.version == 6 or a.version == b.version)


def _listener_problems(service: Service, loc: Loc, listeners: list[tuple[_Address, int, Loc]]) -> Iterator[Problem]:
    if service.listen_port == 0 or not service.was_read("listen", "listen_port"):
        return  # an ephemeral port never clashes; an invalid address is reported, its default must not clash
    address = ipaddress.ip_address(service.listen)
    for other, port, where in listeners:
        if port == service.listen_port and _overlaps(address, other):
            yield Problem((*loc, "listen_port"), f"{service.listen} port {port} clashes with the listener of {REF}",
                          (where,))
            return
    listeners.append((address, service.listen_port, loc))


class _Files:
    """Usage files have one writer each (two trackers would overwrite each other) and are not credential files."""

    def __init__(self) -> None:
        self.usage_files: dict[str, Loc] = {}  # real path -> its first claimant
        self.credential_files: list[tuple[str, Loc]] = []

    def usage(self, path: str, loc: Loc) -> Iterator[Problem]:
        if path and (first := claim(self.usage_files, os.path.realpath(path), loc)):
            yield Problem(loc, f"same file as {REF} (two trackers would overwrite each other)", (first,))

    def credential(self, path: str, loc: Loc) -> None:
        if path:
            self.credential_files.append((os.path.realpath(path), loc))

    def shared(self) -> Iterator[Problem]:
        for real, loc in self.credential_files:
            if real in self.usage_files:
                yield Problem(self.usage_files[real], f"same file as {REF}, a credential file", (loc,))


__all__ = ["Config", "OtherService", "Outbound", "read_service"]
