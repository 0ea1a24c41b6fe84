"""`ccm-wsgi doctor`: is this host ready to serve the config? One line per check, `ok`, `warn` or `fail`, then what
was found and, where something is wrong, what to do. The exit status is 1 when any check fails.

Nothing it does costs anything or changes anything. No refresh token is spent (an expired login that has a refresh
token is only said to be refreshable). Reachability is an unauthenticated HEAD: any HTTP answer proves the way
through the detour, TLS verified as the service verifies it. The only authenticated call is the usage API (free;
the service polls it anyway), and only with an access token that has not expired, to read whether paid extra usage
is on. A listener's port is tried by connecting to it, and bound (then closed at once) only at the exact address
the service would bind, when nothing answers there.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import pwd
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import click
import urllib3

from . import certs, config, files
from .anthropic import API_USER_AGENT, OAUTH_BETA, USAGE_PATH
from .credentials.store import OAUTH_KEY, CredentialStore, credential_store, parse_document
from .http import tls
from .pool.quota import format_duration
from .service import is_loopback
from .upstream.outbounds import Outbounds, Route, hostport

CLOCK_TOLERANCE = 5.0  # seconds the clock may differ from the upstream's `Date`
CERT_WARN_DAYS, CERT_FAIL_DAYS = 14, 7
FREE_WARN, FREE_FAIL = 64 * 2**20, 2**20  # bytes free beside a usage file
TIMEOUT = 10.0
PORT_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class Line:
    level: str  # ok, warn, fail
    text: str

    def __str__(self) -> str:
        return f"{self.level:<4} {self.text}"


@dataclass
class Login:
    """What the credential check learnt about one login, for the checks after it."""

    oauth: dict[str, Any]
    route: Route
    upstream_url: str

    def usable_token(self) -> str | None:
        expires = self.oauth.get("expiresAt") or 0
        token = self.oauth.get("accessToken")
        return token if isinstance(token, str) and (not expires or expires > time.time() * 1000) else None


@dataclass
class Doctor:
    cfg: config.Config
    config_path: str | None
    lines: list[Line] = field(default_factory=list)
    logins: dict[str, Login] = field(default_factory=dict)  # by credential file
    clock_checked: bool = False

    def __post_init__(self) -> None:
        self.outbounds = Outbounds(self.cfg.outbounds)

    def say(self, level: str, text: str) -> None:
        line = Line(level, text)
        self.lines.append(line)
        click.echo(str(line))

    def run(self) -> None:
        seen: set[str] = set()
        for service in self.cfg.services:
            for credential in service.effective_credentials:
                if isinstance(credential, config.DefaultCredential):
                    self.credential(service, credential, seen)
        self.reachability()
        for service in self.cfg.services:
            self.usage_files(service)
        for service in self.cfg.services:
            self.listener(service)
            self.access(service)
            self.overage(service)
            self.certificate(service)

    # -- credentials -----------------------------------------------------------------------------------------

    def login_hint(self, service: config.Service, credential: config.DefaultCredential) -> str:
        command = "ccm-wsgi login" + (f" -c {self.config_path}" if self.config_path else "")
        return command + (f" --credential {credential.tag}" if service.pooled else "")

    def credential(self, service: config.Service, credential: config.DefaultCredential, seen: set[str]) -> None:
        store = credential_store(credential.credential_path)
        if store.path in seen:
            return
        seen.add(store.path)
        name = f'credential "{credential.tag}"' if service.pooled else f'service "{service.tag}" login'
        login = self.login_hint(service, credential)
        document = self.read_login(store, name, login)
        if document is None:
            return
        oauth: dict[str, Any] = document[OAUTH_KEY]
        route = self.outbounds.route(credential.detour, service.connect_timeout)
        self.logins[store.path] = Login(oauth, route, service.upstream_url)
        kind = oauth.get("subscriptionType") or "subscription type unknown"
        tier = oauth.get("rateLimitTier")
        plan = f"{kind}{', ' + tier if isinstance(tier, str) and tier else ''}"
        expires = oauth.get("expiresAt") or 0
        left = expires / 1000 - time.time() if expires else float("inf")
        if left > 0:
            validity = "valid for " + format_duration(left) if left != float("inf") else "no expiry"
        elif oauth.get("refreshToken"):
            validity = "expired, refreshed by the service on its next request"
        else:
            self.say("fail", f"{name} ({store.describe()}): expired {format_duration(-left)} ago and has no "
                             f"refresh token; log in again: {login}")
            return
        self.say("ok", f"{name} ({store.describe()}): {plan}, {validity}")

    def read_login(self, store: CredentialStore, name: str, login: str) -> dict[str, Any] | None:
        """The login's document once every file check passed; None after saying why not."""
        where = f"{name} ({store.path})"
        if store.keychain is not None:
            data = store.keychain.read()
            with contextlib.suppress(ValueError):
                return parse_document(data or b"", "the keychain item " + store.keychain.service)
        try:
            st = os.stat(store.path)
        except FileNotFoundError:
            self.say("fail", f"{where}: no such file; log in: {login}")
            return None
        except OSError as exc:
            self.say("fail", f"{where}: cannot be reached ({exc.strerror}); run this check as the service's user")
            return None
        me = os.geteuid()
        if st.st_uid != me:
            self.say("fail", f"{where}: owned by {user_name(st.st_uid)}, but this runs as {user_name(me)}; run the "
                             f"service and this check as the file's owner, or: chown {user_name(me)} {store.path}")
            return None
        mode = st.st_mode & 0o777
        if mode & 0o077:
            self.say("fail", f"{where}: mode {mode:04o} lets other users read the login; run: chmod 600 {store.path}")
            return None
        try:
            document = store.read()
        except ValueError as exc:
            self.say("fail", f"{name}: {exc}; log in again: {login}")
            return None
        reason = store.unwritable()
        if reason:
            self.say("fail", f"{where}: {reason}, so a refreshed login could not be saved (and the service does not "
                             "refresh then); give the service's user write access")
            return None
        return document

    # -- the way out -----------------------------------------------------------------------------------------

    def reachability(self) -> None:
        """Each upstream, token endpoint and peer, through each detour it is used with, once."""
        targets: dict[tuple[str, str], tuple[str, config.Service]] = {}
        for service in self.cfg.services:
            for credential in service.effective_credentials:
                if isinstance(credential, config.DefaultCredential):
                    targets.setdefault((credential.detour, service.upstream_url), ("upstream", service))
                    targets.setdefault((credential.detour, service.token_url), ("token endpoint", service))
                elif isinstance(credential, config.ExternalCredential):
                    targets.setdefault((credential.detour, credential.url), (f'peer of "{credential.tag}"', service))
        for (detour, url), (what, service) in targets.items():
            route = self.outbounds.route(detour, service.connect_timeout)
            way = self.outbounds.describe(detour)
            started = time.time()
            try:
                resp = route.pool.request("HEAD", url, headers={"User-Agent": API_USER_AGENT}, retries=False,
                                          redirect=False, timeout=urllib3.Timeout(connect=route.connect_timeout,
                                                                                  read=TIMEOUT))
            except urllib3.exceptions.HTTPError as exc:
                self.say("fail", f"{what} {url} is not reachable: {route.describe(exc)}; check the outbound, the "
                                 "network and the firewall")
                continue
            finished = time.time()
            verified = ", TLS verified" if url.startswith("https:") else ""
            self.say("ok", f"{what} {url} reachable through the {way} (HTTP {resp.status}{verified})")
            if what == "upstream" and not self.clock_checked:
                self.clock(resp.headers.get("date"), url, started, finished)
        if not self.clock_checked and any(what == "upstream" for what, _ in targets.values()):
            self.say("warn", "clock: not compared, no upstream answered (the clock must be right within a few "
                             "seconds: keep time synchronisation on)")

    def clock(self, date: str | None, url: str, started: float, finished: float) -> None:
        self.clock_checked = True
        try:
            theirs = parsedate_to_datetime(date or "").timestamp()
        except (TypeError, ValueError):
            self.say("warn", f"clock: {url} sent no usable Date header, so the clock was not compared")
            return
        skew = (started + finished) / 2 - theirs
        allowed = CLOCK_TOLERANCE + (finished - started) / 2 + 1.0  # Date has whole seconds
        if abs(skew) > allowed:
            direction = "ahead of" if skew > 0 else "behind"
            self.say("fail", f"clock: {abs(skew):.0f}s {direction} the upstream's (token expiry and the usage "
                             "windows are counted with it); turn on time synchronisation: timedatectl set-ntp true")
        else:
            self.say("ok", f"clock: within {CLOCK_TOLERANCE:g}s of the upstream's")

    # -- files -----------------------------------------------------------------------------------------------

    def usage_files(self, service: config.Service) -> None:
        paths = [c.usages_path for c in service.effective_credentials
                 if isinstance(c, (config.DefaultCredential, config.ExternalCredential)) and c.usages_path]
        for path in paths:
            path = os.path.abspath(path)
            directory = os.path.dirname(path)
            where = f"usage file {path}"
            if not os.path.isdir(directory):
                self.say("fail", f"{where}: the directory {directory} does not exist; create it for the service's "
                                 f"user: install -d -o USER {directory}")
                continue
            reason = files.unwritable_directory(directory)
            if reason is None and os.path.exists(path) and not os.access(path, os.W_OK):
                reason = "the file is not writable"
            if reason:
                self.say("fail", f"{where}: cannot write in {directory} ({reason}); the file, its journal and its "
                                 "lock are written there: give the service's user write access")
                continue
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize
            shown = f"{free / 2**20:.0f} MiB free"
            if free < FREE_FAIL:
                self.say("fail", f"{where}: only {shown}; records are kept in memory until there is room: free "
                                 "some space")
            elif free < FREE_WARN:
                self.say("warn", f"{where}: only {shown}; free some space")
            else:
                self.say("ok", f"{where}: directory writable, {shown}")

    # -- listeners -------------------------------------------------------------------------------------------

    def listener(self, service: config.Service) -> None:
        where = f'service "{service.tag}" listener {hostport(service.listen, service.listen_port)}'
        if service.listen_port == 0:
            self.say("ok", f"{where}: a free port is chosen at start")
            return
        state, reason = port_state(service.listen, service.listen_port, service.tls is not None)
        if state == "free":
            self.say("ok", f"{where}: the port is free")
        elif state == "ccm-wsgi":
            self.say("ok", f"{where}: served by a running ccm-wsgi (its /healthz answers)")
        elif state == "taken":
            self.say("fail", f"{where}: the port is taken by another program ({reason}); stop it or choose another "
                             "listen_port")
        else:
            self.say("fail", f"{where}: cannot listen there ({reason}); a port below 1024 needs root or "
                             "CAP_NET_BIND_SERVICE, and the address must belong to this host")

    def access(self, service: config.Service) -> None:
        where = f'service "{service.tag}"'
        if service.users:
            self.say("ok", f"{where}: {len(service.users)} user(s), each with a token")
        elif is_loopback(service.listen):
            self.say("ok", f"{where}: open (no users), on the loopback interface only")
        else:
            self.say("fail", f"{where}: open (no users) and listening on {service.listen}: anyone who can reach the "
                             "port uses the subscription; add users (tokens from ccm-wsgi token) or listen on "
                             "127.0.0.1 behind a proxy that authenticates")

    # -- paid extra usage --------------------------------------------------------------------------------------

    def overage(self, service: config.Service) -> None:
        where = f'service "{service.tag}"'
        if service.overage == "deny":
            self.say("ok", f'{where}: overage "deny": requests past the subscription\'s limits are refused')
            return
        explicit = "overage" in service.model_fields_set
        for credential in service.effective_credentials:
            if not isinstance(credential, config.DefaultCredential):
                continue
            name = f'credential "{credential.tag}"' if service.pooled else "the subscription"
            login = self.logins.get(credential_store(credential.credential_path).path)
            enabled, why = extra_usage(login)
            if enabled is None:
                self.say("warn", f"{where}: cannot tell whether paid extra usage is on for {name} ({why}); if it "
                                 'is, requests past the subscription\'s limits are billed: set "overage": "deny" to '
                                 "be sure")
            elif not enabled:
                self.say("ok", f"{where}: paid extra usage is off for {name}")
            elif explicit:
                self.say("warn", f'{where}: paid extra usage is on for {name} and "overage": "allow" lets requests '
                                 "past the subscription's limits be billed to it (as configured)")
            else:
                self.say("fail", f"{where}: paid extra usage is on for {name}, and overage is allowed by default, so "
                                 "requests past the subscription's limits are billed to it; set \"overage\": \"deny\" "
                                 'to refuse them, or "overage": "allow" to accept the cost')

    # -- inbound TLS -----------------------------------------------------------------------------------------

    def certificate(self, service: config.Service) -> None:
        cfg = service.tls
        if cfg is None:
            return
        where = f'service "{service.tag}" TLS certificate'
        try:
            tls.build_context(cfg)
            if cfg.certificate_path:
                with open(cfg.certificate_path, encoding="ascii", errors="replace") as f:
                    pem = f.read()
            else:
                pem = cfg.certificate
            not_before, not_after = certs.validity(pem)
        except (OSError, ssl.SSLError, certs.CertificateError) as exc:
            self.say("fail", f"{where}: cannot be used ({exc}); fix certificate_path and key_path")
            return
        now = datetime.now(timezone.utc)
        days = (not_after - now).total_seconds() / 86400
        until = not_after.strftime("%Y-%m-%d %H:%M UTC")
        renew = "; renew it (the service picks the new files up without a restart)"
        if not_before > now:
            self.say("fail", f"{where}: not valid before {not_before:%Y-%m-%d %H:%M UTC}; check the clock")
        elif days <= 0:
            self.say("fail", f"{where}: expired on {until}{renew}")
        elif days < CERT_FAIL_DAYS:
            self.say("fail", f"{where}: expires in {days:.1f} days ({until}){renew}")
        elif days < CERT_WARN_DAYS:
            self.say("warn", f"{where}: expires in {days:.0f} days ({until}){renew}")
        else:
            self.say("ok", f"{where}: valid until {until}")


def extra_usage(login: Login | None) -> tuple[bool | None, str]:
    """Whether the usage API says paid extra usage is on (None: unknown, with why)."""
    if login is None:
        return None, "its login did not pass the checks above"
    token = login.usable_token()
    if token is None:
        return None, "the access token has expired; it is not refreshed just to ask"
    headers = {"Authorization": "Bearer " + token, "anthropic-beta": OAUTH_BETA, "User-Agent": API_USER_AGENT,
               "Accept": "application/json"}
    try:
        resp = login.route.pool.request("GET", login.upstream_url + USAGE_PATH, headers=headers, retries=False,
                                        redirect=False, timeout=urllib3.Timeout(connect=login.route.connect_timeout,
                                                                                read=TIMEOUT))
    except urllib3.exceptions.HTTPError as exc:
        return None, f"the usage API did not answer: {login.route.describe(exc)}"
    if resp.status != 200:
        return None, f"the usage API answered HTTP {resp.status}"
    try:
        extra = json.loads(resp.data).get("extra_usage")
    except (ValueError, AttributeError):
        extra = None
    if not isinstance(extra, dict) or not isinstance(extra.get("is_enabled"), bool):
        return None, "the usage API does not say"
    return extra["is_enabled"], ""


def port_state(host: str, port: int, tls_on: bool) -> tuple[str, str]:
    """("free" | "ccm-wsgi" | "taken" | "unusable", why) for listening on host:port."""
    address = ipaddress.ip_address(host)
    target = ("::1" if address.version == 6 else "127.0.0.1") if address.is_unspecified else host
    try:
        with socket.create_connection((target, port), timeout=PORT_TIMEOUT):
            pass
    except OSError:
        pass  # nobody answers there: can we bind it?
    else:
        if answers_healthz(target, port, tls_on):
            return "ccm-wsgi", ""
        return "taken", "it does not answer ccm-wsgi's /healthz"
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own listener
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "taken", exc.strerror or "address in use"
            return "unusable", exc.strerror or str(exc)
    return "free", ""


def answers_healthz(host: str, port: int, tls_on: bool) -> bool:
    url = f"{'https' if tls_on else 'http'}://{hostport(host, port)}/healthz"
    with urllib3.PoolManager(cert_reqs="CERT_NONE", assert_hostname=False, retries=False) as http, \
            _quiet_tls():
        try:
            resp = http.request("GET", url, timeout=urllib3.Timeout(connect=PORT_TIMEOUT, read=PORT_TIMEOUT))
        except urllib3.exceptions.HTTPError:
            return False
    try:
        return resp.status == 200 and json.loads(resp.data) == {"status": "ok"}
    except ValueError:
        return False


@contextlib.contextmanager
def _quiet_tls() -> Iterator[None]:
    """Our own listener's certificate needs no checking to recognise it; urllib3 need not warn about that."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        yield


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def run(config_path: str | None) -> int:
    """Every check, each line printed as soon as it is known; 1 when any failed."""
    try:
        cfg = config.load(config_path) if config_path else config.default_config()
    except config.ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(Line("fail", f"config: {problem}")))
        click.echo(str(Line("fail", f"config {config_path} does not pass check; fix it first (ccm-wsgi check -c "
                                    f"{config_path})")))
        return 1
    doctor = Doctor(cfg, config_path)
    doctor.say("ok", f"config {config_path} passes check" if config_path else "config: the embedded default (no -c)")
    doctor.run()
    return 1 if any(line.level == "fail" for line in doctor.lines) else 0
