"""The `ccm-wsgi` command: serve, check, usage, token, login, doctor."""

from __future__ import annotations

import sys

import click


@click.group()
@click.version_option(package_name="ccm-wsgi")
def main() -> None:
    """Claude Code Multiplexer: share a Claude subscription through per-user tokens."""


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="sing-box style JSON config.")
def serve(config_path: str | None) -> None:
    """Serve every ccm service of CONFIG (the embedded default without -c)."""
    from gevent import monkey

    monkey.patch_all()  # before anything imports socket, ssl or urllib3
    from .observe import rundir

    rundir.forget()  # before prometheus_client is imported: one process keeps its metrics in memory
    from .http import server

    sys.exit(server.run(config_path))


@main.command()
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False))
def check(config_path: str) -> None:
    """Validate CONFIG: print `ok`, or one line per problem starting with its JSON path."""
    from .config import ConfigError, load

    try:
        load(config_path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(problem)
        sys.exit(1)
    click.echo("ok")


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False))
@click.option("-f", "--file", "usages_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the usage-file schema instead of a table.")
def usage(config_path: str | None, usages_file: str | None, as_json: bool) -> None:
    """Requests, tokens and USD by user, model and week."""
    from .accounting import report

    if bool(config_path) == bool(usages_file):
        raise click.UsageError("give exactly one of -c CONFIG or -f USAGES_JSON")
    sys.exit(report.run(config_path=config_path, usages_file=usages_file, as_json=as_json))


@main.command()
def token() -> None:
    """Print a new random user token (256 bits, URL-safe, shaped so that Claude Code shows usage notices)."""
    from .http.tokens import new_token

    click.echo(new_token())


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="the config whose service (URLs, detour, credential file) the login is for")
@click.option("--credential", "credential", metavar="TAG", help="log in the pool credential TAG of the config")
@click.option("--credential-path", "credential_path", type=click.Path(dir_okay=False),
              help="write the login into this file instead")
@click.option("--callback-port", "callback_port", type=click.IntRange(0, 65535), metavar="N",
              help="receive the browser's redirect on 127.0.0.1:N (through ssh -L) instead of a pasted code")
@click.option("--import", "import_from", metavar="FILE|-",
              help="install a credentials JSON made elsewhere (- reads standard input)")
def login(config_path: str | None, credential: str | None, credential_path: str | None, callback_port: int | None,
          import_from: str | None) -> None:
    """Log a subscription in (Claude's OAuth login, no browser needed here) and save it where the service reads it."""
    from .credentials import login as flow

    if credential and credential_path:
        raise click.UsageError("give --credential or --credential-path, not both")
    if import_from is not None and callback_port is not None:
        raise click.UsageError("--import installs a login made elsewhere: it takes no --callback-port")
    sys.exit(flow.run(config_path, credential, credential_path, callback_port, import_from))


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="the config to check the host for")
def doctor(config_path: str | None) -> None:
    """Check that this host can serve CONFIG: one line per check (ok, warn, fail) and what to do; exit 1 on a fail."""
    from . import doctor as checks

    sys.exit(checks.run(config_path))
