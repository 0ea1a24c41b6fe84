"""The config: a sing-box style JSON document read into a typed, frozen model (pydantic v2).

`load(path)` reads a file (JSON with `//`, `/* */` and `#` comments, as sing-box allows), `parse(data)`
a decoded document; both return a `Config` or raise `ConfigError`, whose `problems` hold every problem
found, one `"<json path>: <message>"` line each, in the order of the file, e.g.
`services[0].users[1].token: duplicate token (same as services[0].users[0])`. Messages never quote a
secret (user, admin or external token, proxy password, key).

Where sing-box is lax, ccm-wsgi is strict: unknown keys, wrong types, empty or duplicate user tokens,
duplicate tags, usage files shared by two trackers and unknown `detour` tags are all errors. What
ccm-wsgi honours, accepts and ignores, or refuses is declared with each field (its `description`), one
module per section: `log`, `outbounds`, `tls`, `service`, `users`, `credentials`, `limits`, `state`,
`pricing`, and `document` for what ties them together. `base` holds the generic reading, `values` the
value types (and `headers` header objects), `jsonc` the decoding.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import ValidationError

from .base import ReadContext, located, path, position, quote
from .credentials import BalancerCredential, Credential, DefaultCredential, ExternalCredential
from .document import Config, OtherService
from .jsonc import DecodeError, decode
from .limits import Budget, Limits, WindowShare
from .log import LogConfig
from .outbounds import DialOutbound, DirectOutbound, HttpOutbound, OtherOutbound, Outbound, SocksOutbound
from .pricing import Price, Rates
from .service import Service
from .state import RedisState
from .tls import InboundTLS, OutboundTLS
from .users import User, token_digest
from .values import parse_duration

__all__ = [
    "BalancerCredential",
    "Budget",
    "Config",
    "ConfigError",
    "Credential",
    "DefaultCredential",
    "DialOutbound",
    "DirectOutbound",
    "ExternalCredential",
    "HttpOutbound",
    "InboundTLS",
    "Limits",
    "LogConfig",
    "OtherOutbound",
    "OtherService",
    "Outbound",
    "OutboundTLS",
    "Price",
    "Rates",
    "RedisState",
    "Service",
    "SocksOutbound",
    "User",
    "WindowShare",
    "default_config",
    "load",
    "parse",
    "parse_duration",
    "token_digest",
]


class ConfigError(Exception):
    """The config is unusable; `problems` holds one `"<json path>: <message>"` line per problem."""

    def __init__(self, problems: Iterable[str]):
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))


def parse(data: object) -> Config:
    """Validate a decoded JSON document; raises ConfigError listing every problem."""
    try:
        return Config.model_validate(data, context=ReadContext())
    except ValidationError as exc:
        found = [problem for problem in map(located, exc.errors()) if problem is not None]
    found.sort(key=lambda problem: position(data, problem[0]))
    raise ConfigError(f"{path(loc)}: {message}" for loc, message in found)


def load(file: str) -> Config:
    """Read, decode and validate the config file at `file`; raises ConfigError listing every problem."""
    try:
        with open(file, encoding="utf-8-sig") as stream:
            text = stream.read()
    except OSError as exc:
        raise ConfigError([f"$: cannot read config file {quote(file)}: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"$: config file {quote(file)} is not UTF-8 text"]) from None
    try:
        data = decode(text)
    except DecodeError as exc:
        raise ConfigError([f"$: {exc}"]) from None
    return parse(data)


def default_config() -> Config:
    """The embedded default: one ccm service on 127.0.0.1:8080, default credential, no users, no usage file."""
    return parse({"services": [{"type": "ccm"}]})
