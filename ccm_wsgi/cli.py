"""The `ccm-wsgi` command: serve, check, usage, token."""

from __future__ import annotations

import secrets
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
    """Print a new random user token (256 bits, URL-safe)."""
    click.echo("ak-ccm-" + secrets.token_urlsafe(32))
