"""`ccm-wsgi login`: Claude's OAuth login (authorization code with PKCE) on a machine without a browser.

It prints the authorize URL, the person opens it in a browser anywhere, authorizes, and pastes back the
`code#state` the hosted callback page shows (or, with `--callback-port N`, the browser's redirect reaches a
listener on 127.0.0.1:N through an ssh tunnel). The state must be the one this attempt made; the code is then
exchanged at the service's `token_url` through the credential's `detour`, and the login is written where the
service reads it, in Claude Code's format. `--import FILE` installs a login made elsewhere the same way.

The login is written as `install.py` says: checked before the person is asked anything, nothing half-written
whenever it is interrupted. A running `ccm-wsgi serve` notices the new file on its next request.

Messages never show a token, and of what the token endpoint says only its status and OAuth error code.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import queue
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import click
import urllib3

from .. import config
from ..anthropic import API_USER_AGENT, CLIENT_ID, LOGIN_SCOPES, OAUTH_BETA, PROFILE_PATH, REDIRECT_URI
from ..upstream.outbounds import Outbounds, Route
from .callback import CallbackServer
from .endpoint import oauth_error, post_token, refusal, token_answer
from .install import Installer, LoginError, Signals
from .oauth import now_ms
from .pkce import PasteError, Pkce, Refused, authorize_url, read_pasted
from .store import OAUTH_KEY, CredentialStore, credential_store, parse_document

WAIT_SECONDS = 15 * 60.0  # how long a person has to authorize and paste (the code itself expires sooner)
# Claude Code's `subscriptionType` for the profile's organisation type
SUBSCRIPTIONS = {"claude_max": "max", "claude_pro": "pro", "claude_team": "team", "claude_enterprise": "enterprise"}
IMPORT_WARNING = (
    "warning: this proxy now owns the login's refresh chain. Do not use the login on the machine it came from "
    "any more: a refresh there would log this proxy out (and the other way round). Log that machine in again "
    "with a login of its own."
)


@dataclass(frozen=True, slots=True)
class Target:
    """Where the login goes and how the service reaches Anthropic for it."""

    store: CredentialStore
    service: config.Service
    route: Route
    label: str  # `credential "a"`, or the file, for messages


# -- where the login goes -----------------------------------------------------------------------------------


def resolve(config_path: str | None, tag: str | None, path: str | None) -> Target:
    """The credential `tag` of the config, the file `path`, or the first service's own credential."""
    try:
        cfg = config.load(config_path) if config_path else config.default_config()
    except config.ConfigError as exc:
        raise LoginError(f"{config_path} does not pass check:\n  " + "\n  ".join(exc.problems)) from None
    service, credential = _credential(cfg, tag, path)
    detour = credential.detour if credential is not None else service.detour if not service.pooled else ""
    if path:
        store = credential_store(path)
        label = store.path
    else:
        assert credential is not None
        store = credential_store(credential.credential_path)
        label = f'credential "{credential.tag}" ({store.describe()})' if service.pooled else store.describe()
    route = Outbounds(cfg.outbounds).route(detour, service.connect_timeout)
    return Target(store, service, route, label)


def _credential(cfg: config.Config, tag: str | None, path: str | None
                ) -> tuple[config.Service, config.DefaultCredential | None]:
    """The service and the default credential the login is for (None: a file no credential names)."""
    if tag:
        for service in cfg.services:
            for credential in service.effective_credentials:
                if credential.tag == tag:
                    if not isinstance(credential, config.DefaultCredential):
                        raise LoginError(f'credential "{tag}" has type {credential.type}: only a default '
                                         "credential holds a subscription login")
                    return service, credential
        known = sorted({c.tag for s in cfg.services for c in s.effective_credentials
                        if isinstance(c, config.DefaultCredential)})
        raise LoginError(f'the config has no credential "{tag}" (its default credentials: {", ".join(known)})')
    if path:
        wanted = os.path.realpath(os.path.expanduser(path))
        for service in cfg.services:
            for credential in service.effective_credentials:
                if isinstance(credential, config.DefaultCredential) and credential.credential_path and \
                        os.path.realpath(os.path.expanduser(credential.credential_path)) == wanted:
                    return service, credential
        return cfg.services[0], None
    service = cfg.services[0]
    defaults = [c for c in service.effective_credentials if isinstance(c, config.DefaultCredential)]
    if len(defaults) != 1:
        names = ", ".join(c.tag for c in defaults) or "none"
        raise LoginError(f'service "{service.tag}" has {len(defaults)} default credentials ({names}): name the one '
                         "to log in with --credential TAG")
    return service, defaults[0]


# -- what the person gives ------------------------------------------------------------------------------------


class Inputs:
    """Lines from standard input and the browser's callbacks, in one queue, whichever comes first."""

    def __init__(self) -> None:
        self.queue: queue.Queue[tuple[str, str]] = queue.Queue()

    def start_stdin(self) -> None:
        # os.read on the descriptor, not sys.stdin: a daemon thread blocked inside a buffered reader would make
        # the interpreter's exit fail on that reader's lock
        threading.Thread(target=self._read_stdin, name="login-stdin", daemon=True).start()

    def _read_stdin(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(0, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                if buffer.strip():
                    self.queue.put(("paste", buffer.decode("utf-8", "replace")))
                self.queue.put(("eof", ""))
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                self.queue.put(("paste", line.decode("utf-8", "replace")))
            buffer = buffer[-65536:]

    def callback(self, address: str) -> None:
        self.queue.put(("callback", address))

    def next(self, deadline: float) -> tuple[str, str]:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LoginError(f"no code arrived within {WAIT_SECONDS / 60:.0f} minutes; run ccm-wsgi login again")
            with contextlib.suppress(queue.Empty):
                return self.queue.get(timeout=min(left, 1.0))


def wait_for_code(inputs: Inputs, expected_state: str, callback: bool) -> tuple[str, str]:
    """The code, once a paste or a callback gives one whose state is this attempt's."""
    deadline = time.monotonic() + WAIT_SECONDS
    stdin_open = True
    while True:
        kind, text = inputs.next(deadline)
        if kind == "eof":
            stdin_open = False
            if not callback:
                raise LoginError("standard input ended before a code was pasted; run ccm-wsgi login again")
            continue
        if kind == "paste" and not text.strip():
            continue
        try:
            code, state = read_pasted(text)
        except Refused as exc:
            raise LoginError(f"{exc}; run ccm-wsgi login again and press Authorize") from None
        except PasteError as exc:
            if kind == "callback" or not stdin_open:
                raise LoginError(str(exc)) from None
            click.echo(f"{exc}. Paste it again:", err=True)
            continue
        if state is not None and state != expected_state:
            raise LoginError("state mismatch: this code belongs to another login attempt (an older URL, or a link "
                             "someone else made). Nothing was changed; run ccm-wsgi login again and open the URL "
                             "it prints")
        return code, expected_state


# -- talking to Anthropic --------------------------------------------------------------------------------------


def exchange(target: Target, code: str, pkce: Pkce, redirect_uri: str) -> dict[str, Any]:
    """The token endpoint's answer to the code (it holds an access token), or a LoginError saying why not."""
    body = {"grant_type": "authorization_code", "code": code, "state": pkce.state, "code_verifier": pkce.verifier,
            "redirect_uri": redirect_uri, "client_id": CLIENT_ID}
    token_url = target.service.token_url
    try:
        resp = post_token(target.route, token_url, body)
    except urllib3.exceptions.HTTPError as exc:
        raise LoginError(f"the token endpoint {token_url} did not answer ({target.route.describe(exc)}); the code "
                         "may be spent: run ccm-wsgi login again") from None
    answer = token_answer(resp)
    if answer is not None:
        return answer
    if resp.status == 400 and oauth_error(resp) == "invalid_grant":
        raise LoginError("the token endpoint refused the code (invalid_grant): it is wrong, already used, or "
                         "expired (codes last a few minutes). Run ccm-wsgi login again and paste the new code "
                         "right away")
    raise LoginError(f"the token endpoint refused the login ({refusal(resp)}). Nothing was changed; run "
                     "ccm-wsgi login again, or check token_url and the detour if this persists")


def profile(target: Target, access_token: str) -> tuple[str | None, str | None]:
    """(subscriptionType, rateLimitTier) from the profile API; (None, None) with a note when it cannot say."""
    url = target.service.upstream_url + PROFILE_PATH
    headers = {"Authorization": "Bearer " + access_token, "anthropic-beta": OAUTH_BETA,
               "User-Agent": API_USER_AGENT, "Accept": "application/json"}
    try:
        resp = target.route.pool.request("GET", url, headers=headers, retries=False, redirect=False,
                                         timeout=urllib3.Timeout(connect=target.route.connect_timeout, read=15.0))
        data = json.loads(resp.data) if resp.status == 200 else None
    except (urllib3.exceptions.HTTPError, ValueError) as exc:
        why = target.route.describe(exc) if isinstance(exc, urllib3.exceptions.HTTPError) else "not JSON"
        click.echo(f"note: the subscription type could not be read ({why}); the login works without it", err=True)
        return None, None
    organization = data.get("organization") if isinstance(data, dict) else None
    if not isinstance(organization, dict):
        status = f"HTTP {resp.status}" if resp.status != 200 else "an answer without it"
        click.echo(f"note: the subscription type could not be read ({status}); the login works without it",
                   err=True)
        return None, None
    kind, tier = organization.get("organization_type"), organization.get("rate_limit_tier")
    return SUBSCRIPTIONS.get(kind) if isinstance(kind, str) else None, tier if isinstance(tier, str) else None


def login_oauth(answer: dict[str, Any], subscription: str | None, tier: str | None) -> dict[str, Any]:
    """The token endpoint's answer as Claude Code stores it."""
    scope = answer.get("scope")
    scopes = scope.split() if isinstance(scope, str) and scope.strip() else list(LOGIN_SCOPES)
    try:
        expires_in = int(answer.get("expires_in") or 3600)
    except (TypeError, ValueError):
        expires_in = 3600
    return {
        "accessToken": answer["access_token"],
        "refreshToken": answer.get("refresh_token") if isinstance(answer.get("refresh_token"), str) else None,
        "expiresAt": now_ms() + expires_in * 1000,
        "scopes": scopes,
        "subscriptionType": subscription,
        "rateLimitTier": tier,
    }


# -- the command ---------------------------------------------------------------------------------------------


def show(url: str, server: CallbackServer | None) -> None:
    """The URL on a line of its own (never wrapped), a QR code of it on a terminal, and what to do."""
    click.echo("Open this URL in a browser (on any machine), sign in to the Claude account with the subscription, "
               "and press Authorize:")
    click.echo("")
    click.echo(url)
    click.echo("")
    qr(url)
    if server is not None:
        host = (os.environ.get("SSH_CONNECTION") or "").split()[2:3] or [socket.gethostname()]
        user = os.environ.get("SUDO_USER") or os.environ.get("USER") or getpass.getuser()
        click.echo(f"The browser is sent to http://localhost:{server.port}/callback. If it runs on another "
                   "machine, forward that port first, with this one line on that machine (your user and address "
                   "for this server):")
        click.echo("")
        click.echo(f"ssh -L {server.port}:127.0.0.1:{server.port} {user}@{host[0]}")
        click.echo("")
        click.echo("Waiting for the browser. Without a tunnel the page does not load: then copy the address from "
                   "the browser's address bar and paste it here.")
    else:
        click.echo("Then paste the code the page shows (code#state) here and press Enter:")


def qr(url: str) -> None:
    """A QR code of the URL, for a phone's browser, when stdout is a terminal wide enough for it."""
    if not sys.stdout.isatty():
        return
    try:
        import segno
    except ImportError:
        return
    code = segno.make(url, error="l", micro=False)
    width, _ = code.symbol_size(border=2)
    if width > shutil.get_terminal_size().columns:
        return
    code.terminal(compact=True, border=2)
    click.echo("")


def interactive(target: Target, installer: Installer, callback_port: int | None) -> dict[str, Any]:
    inputs = Inputs()
    server = None
    if callback_port is not None:
        try:
            server = CallbackServer(callback_port, inputs.callback)
        except OSError as exc:
            raise LoginError(f"cannot listen on 127.0.0.1:{callback_port} ({exc.strerror}): choose another "
                             "--callback-port") from None
        server.start()
    pkce = Pkce.new()
    redirect_uri = server.redirect_uri if server is not None else REDIRECT_URI
    try:
        show(authorize_url(target.service.authorize_url, redirect_uri, pkce), server)
        inputs.start_stdin()
        code, _ = wait_for_code(inputs, pkce.state, server is not None)
    finally:
        if server is not None:
            server.close()
    click.echo("Exchanging the code...")
    installer.reserve()
    try:
        answer = exchange(target, code, pkce, redirect_uri)
        subscription, tier = profile(target, answer["access_token"])
        oauth = login_oauth(answer, subscription, tier)
        installer.commit(oauth)
    finally:
        installer.abandon()
    account = answer.get("account")
    email = account.get("email_address") if isinstance(account, dict) else None
    plan = f"Claude {subscription.capitalize()}" if subscription else "subscription type unknown"
    click.echo(f"Logged in{' as ' + email if isinstance(email, str) else ''} ({plan}"
               f"{', tier ' + tier if tier else ''}).")
    if not oauth["refreshToken"]:
        click.echo("warning: the login came without a refresh token: log in again when it expires", err=True)
    return oauth


def read_import(source: str) -> dict[str, Any]:
    """The `claudeAiOauth` object of a credentials JSON made elsewhere, validated."""
    name = "standard input" if source == "-" else source
    try:
        if source == "-":
            if sys.stdin.isatty():
                click.echo("Paste the credentials JSON, then press Ctrl-D:", err=True)
            raw = sys.stdin.buffer.read()
        else:
            with open(source, "rb") as f:
                raw = f.read()
    except OSError as exc:
        raise LoginError(f"cannot read {name} ({exc.strerror})") from None
    try:
        oauth: dict[str, Any] = parse_document(raw, name)[OAUTH_KEY]
    except ValueError as exc:
        raise LoginError(f"{exc}: give Claude Code's .credentials.json (or the keychain item's JSON)") from None
    refresh = oauth.get("refreshToken")
    expires = oauth.get("expiresAt") or 0
    if not (isinstance(refresh, str) and refresh):
        if expires and expires <= now_ms():
            raise LoginError(f"the login in {name} has expired and has no refresh token: it cannot be used "
                             "any more; log in with ccm-wsgi login instead")
        click.echo("warning: the login has no refresh token: it stops working when its access token expires",
                   err=True)
    return dict(oauth)


def run(config_path: str | None, credential: str | None, credential_path: str | None, callback_port: int | None,
        import_from: str | None) -> int:
    signals = Signals()
    signals.install()
    try:
        target = resolve(config_path, credential, credential_path)
        installer = Installer(target.store, signals)
        installer.check()
        if import_from is not None:
            oauth = read_import(import_from)
            installer.reserve()
            installer.commit(oauth)
            kind = oauth.get("subscriptionType")
            click.echo(f"Installed the login{' (Claude ' + str(kind).capitalize() + ')' if kind else ''} "
                       f"into {target.label}.")
            click.echo(IMPORT_WARNING, err=True)
        else:
            interactive(target, installer, callback_port)
            mode = ", mode 0600" if target.store.keychain is None else ""
            click.echo(f"Saved into {target.label}{mode}. A running ccm-wsgi uses it from its next request on.")
    except LoginError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("\ninterrupted: nothing was written", err=True)
        return 130
    finally:
        signals.restore()
    return 0
