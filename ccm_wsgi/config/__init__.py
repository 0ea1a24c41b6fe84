"""Load a sing-box style JSON config into frozen dataclasses, with strict validation.

The layout is sing-box's: top-level `log`, `outbounds` and `services`; every service of type `ccm` is
ours. sing-box's other top-level sections (`dns`, `ntp`, `inbounds`, `route`, `experimental`,
`endpoints`, `certificate`) are accepted and ignored, and so are services of other types. The file may
carry `//`, `/* */` and `#` comments, as sing-box's reader allows.

Where sing-box is lax, ccm-wsgi is strict: unknown keys, wrong types, empty or duplicate user tokens,
duplicate tags, usage files shared by two trackers and unknown `detour` tags are all errors. Every
problem is collected (not just the first) as `"<json path>: <message>"`, e.g.
`services[0].users[1].token: duplicate token (same as services[0].users[0])`, and `ConfigError`
carries the list. Messages never quote a secret (user, admin or external token, proxy password, key).

Which accepted sing-box fields ccm-wsgi acts on:

| Where | Honoured | Type-checked, then ignored | Rejected |
|---|---|---|---|
| ccm service | `listen`, `listen_port`, `reuse_addr`, `tcp_keep_alive`, `disable_tcp_keep_alive` | `bind_interface`, `routing_mark`, `netns`, `tcp_fast_open`, `tcp_multi_path`, `tcp_keep_alive_interval`, `udp_fragment`, `udp_timeout`; deprecated `sniff`, `sniff_override_destination`, `sniff_timeout`, `domain_strategy`, `udp_disable_domain_unmapping` | |
| outbound dial fields | `connect_timeout` | `bind_interface`, `inet4_bind_address`, `inet6_bind_address`, `bind_address_no_port`, `routing_mark`, `reuse_addr`, `netns`, `tcp_fast_open`, `tcp_multi_path`, `disable_tcp_keep_alive`, `tcp_keep_alive`, `tcp_keep_alive_interval`, `udp_fragment`, `domain_resolver`, `network_strategy`, `network_type`, `fallback_network_type`, `fallback_delay`, `domain_strategy` | `detour` (chained outbounds: traffic would silently skip the chain) |
| `socks` outbound | `server`, `server_port`, `version`, `username`, `password` | `network`, `udp_over_tcp` (CCM is TCP only) | |
| `http` outbound | `server`, `server_port`, `username`, `password`, `path`, `headers`, `tls` | | |
| inbound `tls` | `enabled`, `server_name`, `alpn` (`http/1.1` only), `min_version`, `max_version`, `cipher_suites`, `certificate(_path)`, `key(_path)`, `client_authentication` (`no`, `verify-if-given`, `require-and-verify`), `client_certificate(_path)` | `curve_preferences` | `acme`, `ech`, `reality`, `kernel_tx`, `kernel_rx`, `client_certificate_public_key_sha256` (unless switched off); `alpn` `h2`; `client_authentication` `request` and `require-any` |
| outbound `tls` | `enabled`, `server_name`, `insecure`, `disable_sni`, `alpn`, `min_version`, `max_version`, `cipher_suites`, `certificate(_path)` | `curve_preferences` | `utls`, `reality`, `ech`, `fragment`, `fragment_fallback_delay`, `record_fragment`, `certificate_public_key_sha256`, `client_certificate(_path)`, `client_key(_path)` (unless switched off) |

Choices beyond sing-box: an omitted `listen_port` is 8080 (sing-box would pick an ephemeral port); an
untagged outbound is named after its index, as in sing-box; `outbounds` of other types (shadowsocks,
selector, ...) are accepted as opaque entries but are not in `Config.outbounds`, and naming one as a
`detour` is an error; `cipher_suites` keep Go's names (see `OPENSSL_CIPHERS` for OpenSSL's).
"""  # noqa: E501 (the tables above)

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "LEVELS",
    "OPENSSL_CIPHERS",
    "Config",
    "ConfigError",
    "Credential",
    "InboundTLS",
    "LogConfig",
    "Outbound",
    "OutboundTLS",
    "Price",
    "Service",
    "User",
    "default_config",
    "load",
    "openssl_cipher_list",
    "parse",
    "parse_duration",
]

LEVELS = ("trace", "debug", "info", "warn", "error", "fatal", "panic")

DEFAULT_UPSTREAM_URL = "https://api.anthropic.com"
DEFAULT_TOKEN_URL = "https://platform.claude.com/v1/oauth/token"


# --------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """The config is unusable; `problems` holds one `"<json path>: <message>"` line per problem."""

    def __init__(self, problems: Iterable[str]):
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    disabled: bool = False
    output: str = ""
    timestamp: bool = True


@dataclass(frozen=True)
class OutboundTLS:
    enabled: bool = False
    server_name: str = ""
    insecure: bool = False
    disable_sni: bool = False
    alpn: tuple[str, ...] = ()
    min_version: str = ""
    max_version: str = ""
    cipher_suites: tuple[str, ...] = ()
    certificate: str = ""  # PEM text, lines joined with "\n"
    certificate_path: str = ""


@dataclass(frozen=True)
class Outbound:
    type: str  # "socks" | "http" | "direct"
    tag: str
    server: str = ""
    server_port: int = 0
    version: str = "5"  # socks: "4" | "4a" | "5"
    username: str = ""
    password: str = ""
    path: str = ""
    headers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tls: OutboundTLS | None = None
    connect_timeout: float | None = None


@dataclass(frozen=True)
class InboundTLS:
    enabled: bool = False
    server_name: str = ""
    alpn: tuple[str, ...] = ()
    min_version: str = ""
    max_version: str = ""
    cipher_suites: tuple[str, ...] = ()
    certificate: str = ""
    certificate_path: str = ""
    key: str = ""
    key_path: str = ""
    client_authentication: str = "no"
    client_certificate: str = ""
    client_certificate_path: tuple[str, ...] = ()


@dataclass(frozen=True)
class User:
    name: str
    token: str = ""
    token_sha256: str = ""  # lower-case hex, 64 characters
    credential: str = ""
    external_credential: str = ""
    allow_external_usage: bool = False


@dataclass(frozen=True)
class Price:
    """USD per million tokens for models whose name `re.match`es `pattern`."""

    pattern: str
    input: float
    output: float
    cache_read: float
    cache_write_5m: float
    cache_write_1h: float
    premium: Price | None = None  # prices for the 1M context window


@dataclass(frozen=True)
class Credential:
    tag: str
    type: str  # "default" | "external" | "balancer"
    credential_path: str = ""
    usages_path: str = ""
    detour: str = ""
    reserve_5h: int = 0
    reserve_weekly: int = 0
    limit_5h: int = 0
    limit_weekly: int = 0
    strategy: str = "least_used"  # least_used | round_robin | random | fallback
    credentials: tuple[str, ...] = ()
    poll_interval: float = 60.0
    rebalance_threshold: float = 0.0
    url: str = ""
    server: str = ""
    server_port: int = 0
    token: str = ""
    reverse: bool = False


@dataclass(frozen=True)
class Service:
    tag: str = "ccm"
    listen: str = "127.0.0.1"
    listen_port: int = 8080
    credential_path: str = ""
    usages_path: str = ""
    users: tuple[User, ...] = ()
    headers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    detour: str = ""
    tls: InboundTLS | None = None
    upstream_url: str = DEFAULT_UPSTREAM_URL
    token_url: str = DEFAULT_TOKEN_URL
    credentials: tuple[Credential, ...] = ()
    admin_tokens: tuple[str, ...] = ()
    pricing: tuple[Price, ...] = ()
    max_request_body_size: int = 32 * 1024 * 1024
    connect_timeout: float = 10.0
    response_timeout: float = 600.0
    stream_idle_timeout: float = 300.0
    shutdown_grace: float = 30.0
    client_timeout: float = 60.0
    reuse_addr: bool = False
    tcp_keep_alive: float = 300.0
    disable_tcp_keep_alive: bool = False


@dataclass(frozen=True)
class Config:
    log: LogConfig
    outbounds: dict[str, Outbound]  # socks, http and direct outbounds by tag
    services: tuple[Service, ...]  # the ccm services, in file order


def default_config() -> Config:
    """The embedded default: one ccm service on 127.0.0.1:8080, default credential, no users, no usage file."""
    return Config(log=LogConfig(), outbounds={}, services=(Service(),))


# --------------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------------

_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3,
    "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)([^0-9.]*)")
_MAX_DURATION = (2**63 - 1) / 1e9  # Go's time.Duration range, in seconds


def parse_duration(value: str) -> float:
    """A sing-box (Go) duration such as "300ms", "1.5h", "2h45m" or "1d", in seconds.

    Every number needs a unit (ns, us, µs, ms, s, m, h, d); only "0" may stand alone, as in Go.
    Raises ValueError.
    """
    if not isinstance(value, str):
        raise ValueError("a duration must be a string")
    text = value[1:] if value[:1] in ("+", "-") else value
    sign = -1.0 if value[:1] == "-" else 1.0
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f"invalid duration {value!r}")
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        assert match is not None  # the pattern can match the empty string
        number, unit = match.groups()
        if number in ("", "."):
            raise ValueError(f"invalid duration {value!r}")
        if unit not in _DURATION_UNITS:
            what = "missing unit" if not unit else f"unknown unit {unit!r}"
            raise ValueError(f"{what} in duration {value!r}")
        total += float(number) * _DURATION_UNITS[unit]
        pos = match.end()
    if total > _MAX_DURATION:
        raise ValueError(f"duration {value!r} out of range")
    return sign * total


# --------------------------------------------------------------------------------------------------
# The validator: a JSON value that knows its path and reports problems into a shared context
# --------------------------------------------------------------------------------------------------

_ABSENT: Any = object()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
T = TypeVar("T")


def _join(path: str, key: str) -> str:
    if _BARE_KEY.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path or '$'}[{json.dumps(key)}]"


def _quote(value: str) -> str:
    """A (non-secret) value for a message: JSON-quoted, so control characters cannot break the line."""
    return json.dumps(value)


def _switched_off(value: Any) -> bool:
    """Whether an unsupported option is present but off: null, false, empty, or `{"enabled": false}`."""
    if value in (None, False, "", [], {}):
        return True
    return isinstance(value, dict) and value.get("enabled", _ABSENT) is False


class _Context:
    """Problems found so far, plus what cross-references need (outbound tags, files claimed)."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.outbound_types: dict[str, str] = {}
        self.usage_files: dict[str, str] = {}  # real path -> JSON path of its first claimant
        self.credential_files: list[tuple[str, str]] = []  # (real path, JSON path)

    def mark(self) -> int:
        """Compare with a later mark() to see whether problems were reported in between."""
        return len(self.problems)


class _Node:
    """One JSON value and its path. Readers return the converted value, or None after reporting."""

    __slots__ = ("ctx", "path", "value")

    def __init__(self, ctx: _Context, path: str, value: Any):
        self.ctx, self.path, self.value = ctx, path, value

    @property
    def present(self) -> bool:
        return self.value is not _ABSENT and self.value is not None

    def report(self, message: str) -> None:
        self.ctx.problems.append(f"{self.path or '$'}: {message}")

    def child(self, key: str) -> _Node:
        value = self.value.get(key, _ABSENT) if isinstance(self.value, dict) else _ABSENT
        return _Node(self.ctx, _join(self.path, key), value)

    def elements(self) -> list[_Node]:
        if not isinstance(self.value, list):
            self.report("must be a list")
            return []
        return [_Node(self.ctx, f"{self.path}[{i}]", v) for i, v in enumerate(self.value)]

    def listable(self) -> list[_Node]:
        """A list, or one scalar standing for a one-element list (sing-box's "listable")."""
        return self.elements() if isinstance(self.value, list) else [self]

    def object(
        self,
        known: Iterable[str],
        *,
        ignored: Mapping[str, Callable[[_Node], object] | None] | None = None,
        unsupported: Mapping[str, str] | None = None,
        misplaced: Mapping[str, str] | None = None,
    ) -> _Object | None:
        """Check that this is an object whose keys are all known.

        `ignored` keys are type-checked with their reader (None: any value) and otherwise dropped;
        `unsupported` keys (key -> why) are errors unless switched off; `misplaced` keys (key -> message)
        are always errors with that message.
        """
        if not isinstance(self.value, dict) or not all(isinstance(key, str) for key in self.value):
            self.report("must be an object")
            return None
        allowed = set(known)
        for key in sorted(getattr(self.value, "duplicates", ())):
            self.child(key).report("duplicate key")
        for key, value in self.value.items():
            node = self.child(key)
            if key in allowed:
                continue
            if ignored and key in ignored:
                read = ignored[key]
                if read is not None and node.present:
                    read(node)
            elif unsupported and key in unsupported:
                if not _switched_off(value):
                    node.report(f"not supported by ccm-wsgi ({unsupported[key]})")
            elif misplaced and key in misplaced:
                node.report(misplaced[key])
            else:
                node.report("unknown key")
        return _Object(self)

    # -- scalar readers ---------------------------------------------------------------------------

    def string(self) -> str | None:
        if isinstance(self.value, str):
            return self.value
        self.report("must be a string")
        return None

    def name(self) -> str | None:
        """A non-empty string without control characters (tags, names, hosts)."""
        value = self.string()
        if value is None:
            return None
        if not value.strip():
            self.report("must not be empty")
        elif any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            self.report("must not contain control characters")
        else:
            return value
        return None

    def file_path(self) -> str | None:
        value = self.string()
        if value is None:
            return None
        try:
            if b"\0" not in os.fsencode(value):
                return value
        except UnicodeError:
            pass
        self.report("not a usable file name (NUL or an unpaired surrogate)")
        return None

    def boolean(self) -> bool | None:
        if isinstance(self.value, bool):
            return self.value
        self.report("must be true or false")
        return None

    def integer(self, low: int, high: int) -> int | None:
        value = self.value
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        self.report(f"must be an integer {low}-{high}")
        return None

    def number(self, low: float = 0.0, high: float | None = None) -> float | None:
        value = self.value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if math.isfinite(number) and number >= low and (high is None or number <= high):
                return number
        bound = f">= {low:g}" if high is None else f"{low:g}-{high:g}"
        self.report(f"must be a number {bound}")
        return None

    def duration(self, *, allow_zero: bool = False) -> float | None:
        what = ">= 0" if allow_zero else "> 0"
        try:
            seconds = parse_duration(self.value)
        except ValueError:
            self.report(f'must be a duration {what} such as "30s", "5m" or "1h30m" (a number needs a unit)')
            return None
        if seconds < 0 or (seconds == 0 and not allow_zero):
            self.report(f"must be a duration {what}")
            return None
        return seconds

    def strings(self) -> tuple[str, ...] | None:
        """A string or a list of strings."""
        if not isinstance(self.value, (str, list)):
            self.report("must be a string or a list of strings")
            return None
        values = [node.string() for node in self.listable()]
        return None if None in values else tuple(v for v in values if v is not None)

    def pem(self) -> str | None:
        """PEM text, given as one string or a list of lines; empty means not given."""
        lines = self.strings()
        if lines is None:
            return None
        text = "\n".join(lines)
        if text and "-----BEGIN " not in text:
            self.report('must be PEM text (a "-----BEGIN ...-----" block)')
            return None
        return text


class _Object:
    """Typed access to the keys of a validated object; absent or null keys give the default."""

    __slots__ = ("node",)

    def __init__(self, node: _Node):
        self.node = node

    def __contains__(self, key: str) -> bool:
        return self.node.child(key).present

    def child(self, key: str) -> _Node:
        return self.node.child(key)

    def get(self, key: str, read: Callable[[_Node], T | None], default: T) -> T:
        node = self.node.child(key)
        if not node.present:
            return default
        value = read(node)
        return default if value is None else value

    def need(self, key: str, read: Callable[[_Node], T | None]) -> T | None:
        node = self.node.child(key)
        if not node.present:
            node.report("required")
            return None
        return read(node)

    def text(self, key: str, default: str = "") -> str:
        return self.get(key, _Node.string, default)

    def path(self, key: str) -> str:
        return self.get(key, _Node.file_path, "")

    def flag(self, key: str, default: bool = False) -> bool:
        return self.get(key, _Node.boolean, default)

    def integer(self, key: str, low: int, high: int, default: int) -> int:
        return self.get(key, lambda n: n.integer(low, high), default)

    def duration(self, key: str, default: float, *, allow_zero: bool = False) -> float:
        return self.get(key, lambda n: n.duration(allow_zero=allow_zero), default)

    def strings(self, key: str) -> tuple[str, ...]:
        return self.get(key, _Node.strings, ())


# --------------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------------


class _Pairs(dict):  # type: ignore[type-arg]
    """A decoded JSON object that remembers which keys appeared more than once."""

    duplicates: frozenset[str] = frozenset()


def _object_pairs(pairs: list[tuple[str, Any]]) -> _Pairs:
    result = _Pairs(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        result.duplicates = frozenset(key for key in result if keys.count(key) > 1)
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _strip_comments(text: str) -> str:
    """Blank out `//`, `#` and `/* */` comments outside strings, keeping line and column numbers."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif c == "#" or text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _decode(text: str) -> Any:
    try:
        return json.loads(
            _strip_comments(text), object_pairs_hook=_object_pairs, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise ConfigError([f"$: invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"]) from None
    except RecursionError:
        raise ConfigError(["$: invalid JSON: nested too deeply"]) from None
    except ValueError as exc:
        raise ConfigError([f"$: invalid JSON: {exc}"]) from None


def load(path: str) -> Config:
    """Read, decode and validate the config file at `path`; raises ConfigError listing every problem."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError([f"$: cannot read config file {_quote(path)}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"$: config file {_quote(path)} is not UTF-8 text"]) from None
    return parse(_decode(text))


# --------------------------------------------------------------------------------------------------
# Top level
# --------------------------------------------------------------------------------------------------

_TOP_KEYS = ("log", "outbounds", "services")
_SINGBOX_TOP_KEYS = ("dns", "ntp", "inbounds", "route", "experimental", "endpoints", "certificate")


def parse(data: object) -> Config:
    """Validate a decoded JSON document; raises ConfigError listing every problem."""
    ctx = _Context()
    root = _Node(ctx, "", data)
    top = root.object(_TOP_KEYS, ignored=dict.fromkeys(_SINGBOX_TOP_KEYS))
    if top is None:
        raise ConfigError(ctx.problems)
    log = _log(top.child("log"))
    outbounds = _outbounds(top.child("outbounds"))
    services = _services(top.child("services"))
    _check_shared_files(ctx)
    if ctx.problems:
        raise ConfigError(ctx.problems)
    return Config(log=log, outbounds=outbounds, services=services)


def _log(node: _Node) -> LogConfig:
    if not node.present:
        return LogConfig()
    obj = node.object(("level", "disabled", "output", "timestamp"))
    if obj is None:
        return LogConfig()
    return LogConfig(
        level=obj.get("level", _log_level, "info"),
        disabled=obj.flag("disabled"),
        output=obj.path("output"),
        timestamp=obj.flag("timestamp", True),
    )


def _log_level(node: _Node) -> str | None:
    value = node.string()
    if value is None:
        return None
    level = {"warning": "warn"}.get(value.lower(), value.lower())
    if level in LEVELS:
        return level
    node.report(f"unknown level {_quote(value)} (one of {', '.join(LEVELS)})")
    return None


def _check_shared_files(ctx: _Context) -> None:
    """A usage file written by a tracker must not be a credential file (usage files were checked as claimed)."""
    for real, path in ctx.credential_files:
        if real in ctx.usage_files:
            ctx.problems.append(f"{ctx.usage_files[real]}: same file as {path}, a credential file")


def _claim_usage_file(node: _Node, value: str) -> None:
    if not value:
        return
    real = os.path.realpath(value)
    first = node.ctx.usage_files.setdefault(real, node.path)
    if first != node.path:
        node.report(f"same file as {first} (two trackers would overwrite each other)")


def _note_credential_file(node: _Node, value: str) -> None:
    if value:
        node.ctx.credential_files.append((os.path.realpath(value), node.path))


# --------------------------------------------------------------------------------------------------
# Outbounds
# --------------------------------------------------------------------------------------------------

USABLE_OUTBOUNDS = ("socks", "http", "direct")

_Reader = Callable[[_Node], object]


def _any_duration(node: _Node) -> object:
    return node.duration(allow_zero=True)


# Socket options that sing-box's listen and dial fields share; ccm-wsgi type-checks and ignores them.
_SOCKET_IGNORED: dict[str, _Reader | None] = {
    "bind_interface": _Node.string,
    "routing_mark": None,  # an integer or a hex string
    "netns": _Node.string,
    "tcp_fast_open": _Node.boolean,
    "tcp_multi_path": _Node.boolean,
    "tcp_keep_alive_interval": _any_duration,
    "udp_fragment": _Node.boolean,
    "domain_strategy": _Node.string,  # deprecated in both
}
_DIAL_IGNORED: dict[str, _Reader | None] = {
    **_SOCKET_IGNORED,
    "inet4_bind_address": _Node.string,
    "inet6_bind_address": _Node.string,
    "bind_address_no_port": _Node.boolean,
    "reuse_addr": _Node.boolean,
    "disable_tcp_keep_alive": _Node.boolean,
    "tcp_keep_alive": _any_duration,
    "domain_resolver": None,  # a tag or an object
    "network_strategy": _Node.string,
    "network_type": _Node.strings,
    "fallback_network_type": _Node.strings,
    "fallback_delay": _any_duration,
}
_DIAL_MISPLACED = {
    "detour": "not supported by ccm-wsgi (chaining outbounds); point the service's detour at the first hop"
}
_OUTBOUND_KEYS = {
    "socks": ("server", "server_port", "version", "username", "password"),
    "http": ("server", "server_port", "username", "password", "path", "headers", "tls"),
    "direct": (),
}
_SOCKS_IGNORED: dict[str, _Reader | None] = {"network": _Node.string, "udp_over_tcp": None}
_SOCKS_VERSIONS = {"4": "4", "4a": "4a", "5": "5", 4: "4", 5: "5"}


def _outbounds(node: _Node) -> dict[str, Outbound]:
    result: dict[str, Outbound] = {}
    first_with_tag: dict[str, str] = {}
    if not node.present:
        return result
    for index, item in enumerate(node.elements()):
        if not isinstance(item.value, dict):
            item.report("must be an object")
            continue
        kind = _Object(item).need("type", _Node.name)
        # sing-box names an untagged outbound after its index
        tag = _Object(item).get("tag", _Node.string, "") or str(index)
        if tag in first_with_tag:
            item.child("tag").report(f"duplicate tag {_quote(tag)} (same as {first_with_tag[tag]})")
            continue
        first_with_tag[tag] = item.path
        if kind is None:
            continue
        item.ctx.outbound_types[tag] = kind
        if kind in USABLE_OUTBOUNDS:
            outbound = _outbound(item, kind, tag)
            if outbound is not None:
                result[tag] = outbound
    return result


def _outbound(node: _Node, kind: str, tag: str) -> Outbound | None:
    ignored = {**_DIAL_IGNORED, **(_SOCKS_IGNORED if kind == "socks" else {})}
    obj = node.object(("type", "tag", "connect_timeout", *_OUTBOUND_KEYS[kind]),
                      ignored=ignored, misplaced=_DIAL_MISPLACED)
    if obj is None:
        return None
    connect_timeout = obj.get("connect_timeout", lambda n: n.duration(), None)
    if kind == "direct":
        return Outbound(type=kind, tag=tag, connect_timeout=connect_timeout)
    server = obj.need("server", _Node.name) or ""
    server_port = obj.need("server_port", lambda n: n.integer(1, 65535)) or 0
    version = obj.get("version", _socks_version, "5")
    username, password = obj.text("username"), obj.text("password")
    if kind == "socks" and version != "5" and password:
        obj.child("password").report("only valid with socks version 5")
    return Outbound(
        type=kind, tag=tag, server=server, server_port=server_port, version=version,
        username=username, password=password, path=obj.text("path"),
        headers=obj.get("headers", lambda n: _headers(n, {}), {}),
        tls=obj.get("tls", _outbound_tls, None), connect_timeout=connect_timeout,
    )


def _socks_version(node: _Node) -> str | None:
    value = node.value
    version = _SOCKS_VERSIONS.get(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if version is None:
        node.report('must be "4", "4a" or "5"')
    return version


def _check_detour(node: _Node) -> str:
    """The detour tag, after checking it names an outbound ccm-wsgi can dial through."""
    tag = node.string() if node.present else ""
    if not tag:
        return ""
    kind = node.ctx.outbound_types.get(tag)
    if kind is None:
        node.report(f"unknown outbound {_quote(tag)}")
    elif kind not in USABLE_OUTBOUNDS:
        node.report(f"outbound {_quote(tag)} has type {_quote(kind)}, which ccm-wsgi cannot use "
                    "(socks, http or direct only)")
    return tag


# --------------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------------

_TOKEN_CHARS = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOP_BY_HOP = ("connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
               "te", "trailer", "trailers", "transfer-encoding", "upgrade")
_SERVICE_FORBIDDEN_HEADERS = {
    "authorization": "ccm-wsgi sets it to the subscription's OAuth access token",
    "x-api-key": "the upstream is authenticated with the OAuth access token, never an API key",
    "host": "it comes from upstream_url",
    "content-length": "it is computed from each request body",
    **dict.fromkeys(_HOP_BY_HOP, "hop-by-hop headers describe one connection and are never forwarded"),
}


def _headers(node: _Node, forbidden: Mapping[str, str]) -> dict[str, tuple[str, ...]] | None:
    """An object of header name -> string or list of strings."""
    obj = node.object(node.value.keys() if isinstance(node.value, dict) else ())
    if obj is None:
        return None
    result: dict[str, tuple[str, ...]] = {}
    first: dict[str, str] = {}
    for name in node.value:
        child = node.child(name)
        lowered = name.lower()
        if not _TOKEN_CHARS.fullmatch(name):
            child.report("not a valid header name")
        elif lowered in forbidden:
            child.report(f"cannot be configured: {forbidden[lowered]}")
        elif lowered in first:
            child.report(f"duplicate header (same as {first[lowered]})")
        else:
            first[lowered] = child.path
            values = _header_values(child)
            if values is not None:
                result[name] = values
    return result


def _header_values(node: _Node) -> tuple[str, ...] | None:
    values = node.strings()
    if values is None:
        return None
    if not values:
        node.report("must have at least one value")
        return None
    if any(c in v for v in values for c in "\r\n\0"):
        node.report("header values must not contain CR, LF or NUL")
        return None
    return values


# --------------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------------

_TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")
# sing-box takes Go's crypto/tls suite names; this maps them to OpenSSL's, for `SSLContext.set_ciphers`.
# The TLS 1.3 suites map to "": like Go, ccm-wsgi cannot configure them (OpenSSL always enables them).
OPENSSL_CIPHERS = {
    "TLS_RSA_WITH_RC4_128_SHA": "RC4-SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA": "ECDHE-ECDSA-RC4-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA": "ECDHE-RSA-RC4-SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": "ECDHE-RSA-DES-CBC3-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": "",
    "TLS_AES_256_GCM_SHA384": "",
    "TLS_CHACHA20_POLY1305_SHA256": "",
}


def openssl_cipher_list(names: Iterable[str]) -> str:
    """Go cipher-suite names as an `SSLContext.set_ciphers` string ("" when only TLS 1.3 ones are named)."""
    return ":".join(c for c in (OPENSSL_CIPHERS.get(name, name) for name in names) if c)


_TLS_COMMON_KEYS = ("enabled", "server_name", "alpn", "min_version", "max_version", "cipher_suites",
                    "certificate", "certificate_path")
_TLS_IGNORED: dict[str, _Reader | None] = {"curve_preferences": _Node.strings}
_NO_ECH = "Python's ssl module has no Encrypted Client Hello"
_NO_REALITY = "REALITY needs sing-box's own TLS stack"
_INBOUND_TLS_UNSUPPORTED = {
    "acme": "no ACME client; obtain a certificate elsewhere and use certificate_path and key_path",
    "ech": _NO_ECH,
    "reality": _NO_REALITY,
    "kernel_tx": "kernel TLS is not available through Python's ssl module",
    "kernel_rx": "kernel TLS is not available through Python's ssl module",
    "client_certificate_public_key_sha256": "client certificates are verified against client_certificate(_path) only",
}
_NO_CLIENT_CERT = "client certificates towards an HTTP proxy are not implemented"
_OUTBOUND_TLS_UNSUPPORTED = {
    "utls": "Python's ssl module cannot imitate another client's TLS fingerprint",
    "reality": _NO_REALITY,
    "ech": _NO_ECH,
    "fragment": "TLS fragmentation is not available through Python's ssl module",
    "fragment_fallback_delay": "TLS fragmentation is not available through Python's ssl module",
    "record_fragment": "TLS fragmentation is not available through Python's ssl module",
    "certificate_public_key_sha256": "public key pinning is not implemented; use certificate or certificate_path",
    "client_certificate": _NO_CLIENT_CERT,
    "client_certificate_path": _NO_CLIENT_CERT,
    "client_key": _NO_CLIENT_CERT,
    "client_key_path": _NO_CLIENT_CERT,
}
_CLIENT_AUTH_VERIFYING = ("verify-if-given", "require-and-verify")
_CLIENT_AUTH_UNVERIFIED = ("request", "require-any")


def _tls_version(node: _Node) -> str | None:
    value = node.string()
    if value is not None and value not in _TLS_VERSIONS:
        node.report(f"must be one of {', '.join(_TLS_VERSIONS)}")
        return None
    return value


def _cipher_suites(node: _Node) -> tuple[str, ...] | None:
    suites = node.strings()
    for suite in suites or ():
        if suite not in OPENSSL_CIPHERS:
            node.report(f"unknown cipher suite {_quote(suite)} (use Go's names, e.g. "
                        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)")
            return None
        if OPENSSL_CIPHERS[suite] and not _openssl_has(OPENSSL_CIPHERS[suite]):
            node.report(f"cipher suite {_quote(suite)} is not available in this Python's OpenSSL")
            return None
    return suites


def _openssl_has(cipher: str) -> bool:
    import ssl  # lazily: under gevent, ssl must be imported after monkey-patching, never by the config

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(cipher)
    except ssl.SSLError:
        return False
    return True


def _alpn(node: _Node, peer: str) -> tuple[str, ...] | None:
    protocols = node.strings()
    for protocol in protocols or ():
        if protocol == "h2":
            node.report(f"HTTP/2 is not served: ccm-wsgi speaks HTTP/1.1 only with {peer}; "
                        'use ["http/1.1"] or leave alpn out')
            return None
        if protocol != "http/1.1":
            node.report(f'unsupported protocol {_quote(protocol)} (only "http/1.1")')
            return None
    return protocols


def _readable_file(node: _Node) -> str | None:
    """A path to a file that can be read now; empty means not given."""
    path = node.file_path()
    if not path:
        return path
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        node.report(f"cannot read {_quote(path)}: {exc.strerror or exc}")
        return None
    return path


def _pem_source(obj: _Object, inline: str, path: str, *, enabled: bool, required: bool) -> tuple[str, str]:
    """Inline PEM text or a file path for a certificate or key (empty: not given).

    With TLS enabled the file must be readable now, and a `required` item needs one of the two.
    """
    mark = obj.node.ctx.mark()
    text = obj.get(inline, _Node.pem, "")
    file = obj.get(path, _Node.file_path, "")
    if text and file:
        obj.child(path).report(f"{inline} and {path} are mutually exclusive")
    elif file and enabled:
        file = _readable_file(obj.child(path)) or ""
    elif required and enabled and not text and obj.node.ctx.mark() == mark:
        obj.child(path).report(f"required (or {inline}) when TLS is enabled")
    return text, file


def _tls_common(obj: _Object, peer: str) -> dict[str, Any]:
    min_version = obj.get("min_version", _tls_version, "")
    max_version = obj.get("max_version", _tls_version, "")
    if min_version and max_version and _TLS_VERSIONS.index(min_version) > _TLS_VERSIONS.index(max_version):
        obj.child("min_version").report("must not be above max_version")
    return {
        "enabled": obj.flag("enabled"),
        "server_name": obj.text("server_name"),
        "alpn": obj.get("alpn", lambda n: _alpn(n, peer), ()),
        "min_version": min_version,
        "max_version": max_version,
        "cipher_suites": obj.get("cipher_suites", _cipher_suites, ()),
    }


def _outbound_tls(node: _Node) -> OutboundTLS | None:
    obj = node.object((*_TLS_COMMON_KEYS, "insecure", "disable_sni"), ignored=_TLS_IGNORED,
                      unsupported=_OUTBOUND_TLS_UNSUPPORTED)
    if obj is None:
        return None
    common = _tls_common(obj, "proxies")
    certificate, certificate_path = _pem_source(obj, "certificate", "certificate_path",
                                                enabled=common["enabled"], required=False)
    tls = OutboundTLS(**common, insecure=obj.flag("insecure"), disable_sni=obj.flag("disable_sni"),
                      certificate=certificate, certificate_path=certificate_path)
    return tls if tls.enabled else None


def _inbound_tls(node: _Node) -> InboundTLS | None:
    obj = node.object((*_TLS_COMMON_KEYS, "key", "key_path", "client_authentication", "client_certificate",
                       "client_certificate_path"),
                      ignored=_TLS_IGNORED, unsupported=_INBOUND_TLS_UNSUPPORTED)
    if obj is None:
        return None
    common = _tls_common(obj, "clients")
    enabled = common["enabled"]
    certificate, certificate_path = _pem_source(obj, "certificate", "certificate_path", enabled=enabled,
                                                required=True)
    key, key_path = _pem_source(obj, "key", "key_path", enabled=enabled, required=True)
    client_auth = obj.get("client_authentication", _client_authentication, "no")
    client_certificate = obj.get("client_certificate", _Node.pem, "")
    client_paths = obj.get("client_certificate_path", lambda n: _files(n, readable=enabled), ())
    has_client_ca = bool(client_certificate or client_paths)
    if client_auth in _CLIENT_AUTH_VERIFYING and not has_client_ca and enabled:
        obj.child("client_certificate_path").report(f"required (or client_certificate) with "
                                                    f"client_authentication {_quote(client_auth)}")
    elif client_auth == "no" and has_client_ca:
        obj.child("client_authentication").report(
            "client certificates are configured but never asked for; set verify-if-given or require-and-verify")
    if not enabled:
        return None
    return InboundTLS(**common, certificate=certificate, certificate_path=certificate_path, key=key,
                      key_path=key_path, client_authentication=client_auth,
                      client_certificate=client_certificate, client_certificate_path=client_paths)


def _files(node: _Node, *, readable: bool) -> tuple[str, ...] | None:
    """One path or a list of paths, each readable now if `readable`."""
    if not isinstance(node.value, (str, list)):
        node.report("must be a string or a list of strings")
        return None
    read = _readable_file if readable else _Node.file_path
    paths = [read(item) for item in node.listable()]
    return None if None in paths else tuple(p for p in paths if p)


def _client_authentication(node: _Node) -> str | None:
    value = node.string()
    if value is None:
        return None
    if value in _CLIENT_AUTH_UNVERIFIED:
        node.report(f"{_quote(value)} is not supported by ccm-wsgi (Python's ssl module verifies every client "
                    "certificate it accepts); use verify-if-given or require-and-verify")
        return None
    if value not in ("no", *_CLIENT_AUTH_VERIFYING):
        node.report("must be one of no, verify-if-given, require-and-verify")
        return None
    return value


# --------------------------------------------------------------------------------------------------
# Small value readers
# --------------------------------------------------------------------------------------------------


def _split_url(value: str) -> urllib.parse.SplitResult | None:
    """The parts of an http(s) URL with a host and a valid port, else None."""
    try:
        parts = urllib.parse.urlsplit(value)
        _ = parts.port  # raises ValueError for a port that is not a number 0-65535
    except ValueError:
        return None
    return parts if parts.scheme in ("http", "https") and parts.hostname else None


def _url(node: _Node) -> str | None:
    """An absolute http or https URL without query, fragment or user info; the value is never quoted back."""
    value = node.string()
    if value is None:
        return None
    parts = _split_url(value)
    if parts is None:
        node.report("must be an http:// or https:// URL with a host")
    elif parts.query or parts.fragment or "?" in value or "#" in value:
        node.report("must not have a query or fragment")
    elif parts.username is not None or parts.password is not None:
        node.report("must not contain user info")
    elif any(c.isspace() or ord(c) < 0x20 for c in value):
        node.report("must not contain whitespace or control characters")
    else:
        return value
    return None


def _base_url(node: _Node) -> str | None:
    value = _url(node)
    return value.rstrip("/") if value else value


def _ip_address(node: _Node) -> str | None:
    value = node.string()
    if value is None:
        return None
    try:
        ipaddress.ip_address(value)
    except ValueError:
        node.report("must be an IP address (not a host name)")
        return None
    return value


def _token(node: _Node, min_length: int = 1) -> str | None:
    """A bearer token: printable ASCII without spaces. The value is never quoted back."""
    value = node.string()
    if value is None:
        return None
    if not value:
        node.report("must not be empty")
    elif len(value) < min_length:
        node.report(f"must be at least {min_length} characters long")
    elif not all("\x21" <= c <= "\x7e" for c in value):
        node.report("must be printable ASCII without spaces")
    else:
        return value
    return None


def _sha256_hex(node: _Node) -> str | None:
    value = node.string()
    if value is not None and re.fullmatch(r"[0-9A-Fa-f]{64}", value):
        return value.lower()
    if value is not None:
        node.report("must be 64 hexadecimal characters (the SHA-256 of the token)")
    return None


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


# --------------------------------------------------------------------------------------------------
# Services
# --------------------------------------------------------------------------------------------------

_SERVICE_KEYS = (
    "type", "tag", "listen", "listen_port", "credential_path", "usages_path", "users", "headers", "detour", "tls",
    "reuse_addr", "tcp_keep_alive", "disable_tcp_keep_alive", "credentials",
    # ccm-wsgi extensions
    "upstream_url", "token_url", "admin_tokens", "pricing", "max_request_body_size", "connect_timeout",
    "response_timeout", "stream_idle_timeout", "shutdown_grace", "client_timeout",
)
_LISTEN_IGNORED: dict[str, _Reader | None] = {
    **_SOCKET_IGNORED,
    "udp_timeout": _any_duration,
    # deprecated inbound fields
    "sniff": _Node.boolean,
    "sniff_override_destination": _Node.boolean,
    "sniff_timeout": _any_duration,
    "udp_disable_domain_unmapping": _Node.boolean,
}
_TIMEOUTS = ("connect_timeout", "response_timeout", "stream_idle_timeout", "client_timeout")
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _services(node: _Node) -> tuple[Service, ...]:
    services: list[Service] = []
    tags: dict[str, str] = {}
    listeners: list[tuple[_Address, int, str]] = []
    found = False
    for item in node.elements() if node.present else []:
        if not isinstance(item.value, dict):
            item.report("must be an object")
            continue
        if _Object(item).need("type", _Node.name) != "ccm":
            continue  # another sing-box service
        found = True
        service = _service(item)
        if service is None:
            continue
        services.append(service)
        _claim_unique(item, "tag", service.tag, tags)
        _claim_listener(item, service, listeners)
    if not found:
        node.report('no service of type "ccm"')
    return tuple(services)


def _claim_unique(owner: _Node, key: str, value: str, seen: dict[str, str]) -> bool:
    """Record that `owner` uses `value` for `key`; report at `owner.key` and return False if it is taken."""
    first = seen.setdefault(value, owner.path)
    if first != owner.path:
        owner.child(key).report(f"duplicate {key} {_quote(value)} (same as {first})")
        return False
    return True


def _overlaps(a: _Address, b: _Address) -> bool:
    """Whether binding both addresses on one port clashes (a wildcard `::` also covers IPv4)."""
    if a == b:
        return True
    wildcard = a if a.is_unspecified else b if b.is_unspecified else None
    return wildcard is not None and (wildcard.version == 6 or a.version == b.version)


def _claim_listener(node: _Node, service: Service, listeners: list[tuple[_Address, int, str]]) -> None:
    if service.listen_port == 0:
        return  # an ephemeral port never clashes
    for key in ("listen", "listen_port"):
        if node.child(key).present and node.child(key).value != getattr(service, key):
            return  # invalid, already reported; the default in its place must not clash
    address = ipaddress.ip_address(service.listen)
    for other, port, path in listeners:
        if port == service.listen_port and _overlaps(address, other):
            node.child("listen_port").report(f"{service.listen} port {port} clashes with the listener of {path}")
            return
    listeners.append((address, service.listen_port, node.path))


def _service(node: _Node) -> Service | None:
    obj = node.object(_SERVICE_KEYS, ignored=_LISTEN_IGNORED)
    if obj is None:
        return None
    credentials = obj.get("credentials", _credentials, ())
    catalogue = {c.tag: c for c in credentials} if credentials else None
    token_owners: dict[str, str] = {}  # SHA-256 hex of each user token -> JSON path of its user
    users = obj.get("users", lambda n: _users(n, catalogue, token_owners), ())
    timeouts = {key: obj.duration(key, getattr(Service, key)) for key in _TIMEOUTS}
    keep_alive = obj.duration("tcp_keep_alive", 0.0, allow_zero=True) or Service.tcp_keep_alive
    return Service(
        tag=obj.get("tag", _Node.string, "") or "ccm",
        listen=obj.get("listen", _ip_address, Service.listen),
        listen_port=obj.integer("listen_port", 0, 65535, Service.listen_port),
        **_legacy_credential(obj, multi=bool(credentials)),
        users=users,
        headers=obj.get("headers", lambda n: _headers(n, _SERVICE_FORBIDDEN_HEADERS), {}),
        tls=obj.get("tls", _inbound_tls, None),
        upstream_url=obj.get("upstream_url", _base_url, DEFAULT_UPSTREAM_URL),
        token_url=obj.get("token_url", _url, DEFAULT_TOKEN_URL),
        credentials=credentials,
        admin_tokens=obj.get("admin_tokens", lambda n: _admin_tokens(n, token_owners), ()),
        pricing=obj.get("pricing", _pricing, ()),
        max_request_body_size=obj.integer("max_request_body_size", 1, 2**53, Service.max_request_body_size),
        shutdown_grace=obj.duration("shutdown_grace", Service.shutdown_grace, allow_zero=True),
        reuse_addr=obj.flag("reuse_addr"),
        tcp_keep_alive=keep_alive,
        disable_tcp_keep_alive=obj.flag("disable_tcp_keep_alive"),
        **timeouts,
    )


def _legacy_credential(obj: _Object, *, multi: bool) -> dict[str, str]:
    """The service-level `credential_path`, `usages_path` and `detour`: sing-box T's single credential."""
    if multi:
        for key in ("credential_path", "usages_path", "detour"):
            if obj.get(key, _Node.string, ""):
                obj.child(key).report("mutually exclusive with credentials; set it on each credential instead")
        return {}
    fields = {"credential_path": obj.path("credential_path"), "usages_path": obj.path("usages_path"),
              "detour": _check_detour(obj.child("detour"))}
    _note_credential_file(obj.child("credential_path"), fields["credential_path"])
    _claim_usage_file(obj.child("usages_path"), fields["usages_path"])
    return fields


# --------------------------------------------------------------------------------------------------
# Users and admin tokens
# --------------------------------------------------------------------------------------------------

_USER_KEYS = ("name", "token", "token_sha256", "credential", "external_credential", "allow_external_usage")
MIN_TOKEN_LENGTH = 8


def _users(
    node: _Node, catalogue: Mapping[str, Credential] | None, digests: dict[str, str]
) -> tuple[User, ...] | None:
    """The users; `digests` is filled with token SHA-256 -> user path. `catalogue` is None in legacy mode."""
    users: list[User] = []
    names: dict[str, str] = {}
    for item in node.elements():
        user = _user(item, catalogue)
        if user is None:
            continue
        _claim_unique(item, "name", user.name, names)
        digest = user.token_sha256 or _token_digest(user.token)
        first = digests.setdefault(digest, item.path)
        if first != item.path:
            field_name = "token_sha256" if user.token_sha256 else "token"
            item.child(field_name).report(f"duplicate token (same as {first})")
        users.append(user)
    return tuple(users)


def _user(node: _Node, catalogue: Mapping[str, Credential] | None) -> User | None:
    obj = node.object(_USER_KEYS)
    if obj is None:
        return None
    name = obj.need("name", _Node.name)
    token = obj.get("token", lambda n: _token(n, MIN_TOKEN_LENGTH), "")
    token_sha256 = obj.get("token_sha256", _sha256_hex, "")
    if ("token" in obj) == ("token_sha256" in obj):
        node.report("needs exactly one of token or token_sha256")
    user = User(
        name=name or "",
        token=token,
        token_sha256=token_sha256,
        credential=obj.text("credential"),
        external_credential=obj.text("external_credential"),
        allow_external_usage=obj.flag("allow_external_usage"),
    )
    if catalogue is None:
        for key in ("credential", "external_credential"):
            if getattr(user, key):
                obj.child(key).report("only valid with credentials")
    else:
        _check_user_credentials(obj, user, catalogue)
    return user if name and (token or token_sha256) else None


def _check_user_credentials(obj: _Object, user: User, catalogue: Mapping[str, Credential]) -> None:
    node = obj.child("credential")
    credential = catalogue.get(user.credential)
    if not user.credential:
        node.report("required in multi-credential mode (the tag of one of the service's credentials)")
    elif credential is None:
        node.report(f"unknown credential {_quote(user.credential)}")
    elif not user.allow_external_usage and _only_external(credential, catalogue):
        node.report(f"credential {_quote(user.credential)} only reaches external credentials, which this user "
                    "may not use; set allow_external_usage: true")
    if user.external_credential:
        external = catalogue.get(user.external_credential)
        if external is None:
            obj.child("external_credential").report(f"unknown credential {_quote(user.external_credential)}")
        elif external.type != "external":
            obj.child("external_credential").report(
                f"must name an external credential ({_quote(external.tag)} has type {_quote(external.type)})")


def _only_external(credential: Credential, catalogue: Mapping[str, Credential]) -> bool:
    """Whether every credential the user could be routed to is external."""
    members = credential.credentials if credential.type == "balancer" else (credential.tag,)
    types = [catalogue[tag].type for tag in members if tag in catalogue]
    return bool(types) and all(t == "external" for t in types)


def _admin_tokens(node: _Node, user_digests: Mapping[str, str]) -> tuple[str, ...] | None:
    tokens: list[str] = []
    seen: dict[str, str] = {}
    for item in node.elements():
        token = _token(item)
        if token is None:
            continue
        digest = _token_digest(token)
        if digest in user_digests:
            item.report(f"same as the token of {user_digests[digest]}; an admin token must differ from user tokens")
        elif seen.setdefault(digest, item.path) != item.path:
            item.report(f"duplicate admin token (same as {seen[digest]})")
        else:
            tokens.append(token)
    return tuple(tokens)


# --------------------------------------------------------------------------------------------------
# Pricing
# --------------------------------------------------------------------------------------------------

_PRICE_FIELDS = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")
# cache prices as multiples of the input price when omitted (Anthropic's published ratios)
_CACHE_RATIOS = {"cache_read": 0.1, "cache_write_5m": 1.25, "cache_write_1h": 2.0}


def _pricing(node: _Node) -> tuple[Price, ...] | None:
    prices = [_price(item) for item in node.elements()]
    return tuple(p for p in prices if p is not None)


def _price(node: _Node) -> Price | None:
    obj = node.object(("model", *_PRICE_FIELDS, "premium"))
    if obj is None:
        return None
    pattern = obj.need("model", _regex)
    numbers = _price_numbers(obj)
    premium = obj.get("premium", _premium, None)
    if pattern is None or numbers is None:
        return None
    return Price(pattern, *numbers, premium=premium)


def _premium(node: _Node) -> Price | None:
    obj = node.object(_PRICE_FIELDS)
    numbers = _price_numbers(obj) if obj is not None else None
    return Price("", *numbers) if numbers is not None else None


def _price_numbers(obj: _Object) -> tuple[float, ...] | None:
    problems = len(obj.node.ctx.problems)
    values = {key: obj.need(key, _Node.number) for key in ("input", "output")}
    for key, ratio in _CACHE_RATIOS.items():
        base = values["input"] or 0.0
        values[key] = obj.get(key, _Node.number, round(base * ratio, 12))
    if len(obj.node.ctx.problems) > problems:
        return None
    return tuple(float(values[key] or 0.0) for key in _PRICE_FIELDS)


def _regex(node: _Node) -> str | None:
    value = node.name()
    if value is None:
        return None
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        node.report(f"invalid regular expression: {exc}")
        return None
    return value


# --------------------------------------------------------------------------------------------------
# Credentials (multi-credential mode, sing-box N)
# --------------------------------------------------------------------------------------------------

_CREDENTIAL_KEYS = {
    "default": ("credential_path", "usages_path", "detour", "reserve_5h", "reserve_weekly", "limit_5h",
                "limit_weekly"),
    "external": ("url", "server", "server_port", "token", "reverse", "detour", "usages_path", "poll_interval"),
    "balancer": ("strategy", "credentials", "poll_interval", "rebalance_threshold"),
}
_CREDENTIAL_TYPES = {"": "default", "default": "default", "external": "external", "balancer": "balancer",
                     "fallback": "balancer"}
_STRATEGIES = ("least_used", "round_robin", "random", "fallback")
_WINDOWS = ("5h", "weekly")


def _credentials(node: _Node) -> tuple[Credential, ...] | None:
    credentials: list[Credential] = []
    tags: dict[str, str] = {}
    items: list[tuple[_Node, Credential]] = []
    for item in node.elements():
        credential = _credential(item)
        if credential is None:
            continue
        if _claim_unique(item, "tag", credential.tag, tags):
            credentials.append(credential)
            items.append((item, credential))
    catalogue = {c.tag: c for c in credentials}
    for item, credential in items:
        if credential.type == "balancer":
            _check_members(item.child("credentials"), credential, catalogue)
    return tuple(credentials)


def _misplaced_keys(kind: str) -> dict[str, str]:
    """Keys of the other credential types, each with a hint where it belongs."""
    owners: dict[str, list[str]] = {}
    for other, keys in _CREDENTIAL_KEYS.items():
        for key in keys:
            owners.setdefault(key, []).append(other)
    return {key: f"only valid for {' or '.join(types)} credentials"
            for key, types in owners.items() if kind not in types}


def _credential(node: _Node) -> Credential | None:
    if not isinstance(node.value, dict):
        node.report("must be an object")
        return None
    header = _Object(node)
    tag = header.need("tag", _Node.name)
    declared = header.get("type", _Node.string, "")
    kind = _CREDENTIAL_TYPES.get(declared)
    if kind is None:
        header.child("type").report(f"unknown credential type {_quote(declared)} "
                                    "(default, external, balancer or fallback)")
        # keep the tag known, so that users naming it get no second, misleading problem
        return Credential(tag=tag, type=declared) if tag else None
    obj = node.object(("tag", "type", *_CREDENTIAL_KEYS[kind]), misplaced=_misplaced_keys(kind))
    if obj is None or tag is None:
        return None
    read = {"default": _default_credential, "external": _external_credential, "balancer": _balancer}[kind]
    return Credential(tag=tag, type=kind, **read(obj, declared))


def _default_credential(obj: _Object, _declared: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "credential_path": obj.path("credential_path"),
        "usages_path": obj.path("usages_path"),
        "detour": _check_detour(obj.child("detour")),
    }
    _note_credential_file(obj.child("credential_path"), fields["credential_path"])
    _claim_usage_file(obj.child("usages_path"), fields["usages_path"])
    for window in _WINDOWS:
        reserve = fields[f"reserve_{window}"] = obj.integer(f"reserve_{window}", 0, 99, 0)
        limit = fields[f"limit_{window}"] = obj.integer(f"limit_{window}", 0, 100, 0)
        if reserve and limit:
            obj.child(f"limit_{window}").report(f"mutually exclusive with reserve_{window}")
    return fields


def _external_credential(obj: _Object, _declared: str) -> dict[str, Any]:
    if obj.flag("reverse"):
        obj.child("reverse").report("reverse tunnels are not supported by ccm-wsgi")
    url = obj.get("url", _base_url, "")
    if "url" not in obj:
        obj.child("url").report("required: an external credential without url only works over reverse tunnels, "
                                "which ccm-wsgi does not support")
    fields = {
        "url": url,
        "server": obj.get("server", _Node.name, ""),
        "server_port": obj.integer("server_port", 0, 65535, 0),
        "token": obj.need("token", _token) or "",
        "detour": _check_detour(obj.child("detour")),
        "usages_path": obj.path("usages_path"),
        "poll_interval": obj.duration("poll_interval", 0.0, allow_zero=True) or Credential.poll_interval,
    }
    _claim_usage_file(obj.child("usages_path"), fields["usages_path"])
    return fields


def _balancer(obj: _Object, declared: str) -> dict[str, Any]:
    strategy = obj.get("strategy", _strategy, "")
    if declared == "fallback":
        if strategy not in ("", "fallback"):
            obj.child("strategy").report('conflicts with type "fallback"')
        strategy = "fallback"
    strategy = strategy or "least_used"
    threshold = obj.get("rebalance_threshold", lambda n: n.number(0.0, 100.0), 0.0)
    if threshold and strategy != "least_used":
        obj.child("rebalance_threshold").report("only used by the least_used strategy")
    return {
        "strategy": strategy,
        "credentials": obj.need("credentials", _Node.strings) or (),
        "poll_interval": obj.duration("poll_interval", 0.0, allow_zero=True) or Credential.poll_interval,
        "rebalance_threshold": threshold,
    }


def _strategy(node: _Node) -> str | None:
    value = node.string()
    if value is None:
        return None
    strategy = value.replace("-", "_")
    if strategy in _STRATEGIES:
        return strategy
    node.report(f"unknown strategy {_quote(value)} (least_used, round_robin, random or fallback)")
    return None


def _check_members(node: _Node, balancer: Credential, catalogue: Mapping[str, Credential]) -> None:
    if not node.present:
        return  # already reported as required
    if not balancer.credentials:
        node.report("must name at least one credential")
    members = node.listable()
    seen: set[str] = set()
    for member, tag in zip(members, balancer.credentials, strict=False):
        target = catalogue.get(tag)
        if target is None:
            member.report(f"unknown credential {_quote(tag)}")
        elif target.type == "balancer":
            member.report(f"{_quote(tag)} is a balancer; balancers cannot be nested")
        elif tag in seen:
            member.report(f"{_quote(tag)} is listed twice")
        seen.add(tag)
