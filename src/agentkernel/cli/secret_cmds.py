"""`agentkernel secret set|ls|rm`: the secret store that `--secret NAME` draws on (docs/secrets.md)."""

from __future__ import annotations

import getpass
import sys

import typer

from agentkernel.cli.output import console, print_json
from agentkernel.errors import AgentkernelError
from agentkernel.network import secret_store
from agentkernel.network.brokering import check_name

app = typer.Typer(
    help="Secrets sandboxes can use without holding them (`run --secret NAME`).", no_args_is_help=True
)


@app.command("set")
def set_secret(
    name: str = typer.Argument(..., help="The secret's name: the variable its placeholder is in."),
    hosts: list[str] = typer.Option(
        [],
        "--host",
        metavar="HOST",
        help="A host it may be sent to (repeatable; *.example.com for subdomains).",
    ),
) -> None:
    """Store a secret. Its value is read from stdin (one line), or asked for on a terminal: never
    from the command line, where other users and the shell history would see it."""
    check_name(name)
    if not hosts:
        raise AgentkernelError(f"secret {name} has no hosts: give at least one --host")
    if sys.stdin.isatty():
        value = getpass.getpass(f"value of {name}: ")
    else:
        value = sys.stdin.readline().rstrip("\r\n")
    if not value:
        raise AgentkernelError(f"no value given for secret {name}")
    secret_store.put(name, value, hosts)
    console.print(name)


@app.command("ls")
def list_secrets(json_out: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    """The stored secrets and their hosts (never their values)."""
    rows = [{"name": n, "hosts": list(secret_store.hosts(n) or ())} for n in secret_store.names()]
    if json_out:
        print_json(rows)
        return
    for row in rows:
        console.print(f"{row['name']:<32} {', '.join(row['hosts'])}")


@app.command("rm")
def remove_secret(name: str = typer.Argument(..., help="The secret's name.")) -> None:
    """Remove a stored secret (sandboxes running with it keep it until they stop)."""
    if not secret_store.remove(name):
        raise AgentkernelError(f"no stored secret {name!r}")
    console.print(name)
