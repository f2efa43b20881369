"""`agentkernel audit`: what sandboxes did, from the audit log."""

from __future__ import annotations

import json

import typer

from agentkernel.cli.output import console
from agentkernel.service import audit as audit_log

SUMMARY_KEYS = (
    "argv",
    "exit_code",
    "signal",
    "duration_s",
    "path",
    "size",
    "host",
    "port",
    "allowed",
    "reason",
)


def audit(
    sandbox: str | None = typer.Option(
        None, "--sandbox", "-s", metavar="NAME", help="Only this sandbox's entries."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON lines, one entry per line."),
) -> None:
    """Show the audit log: life cycle, every exec, file transfers, network decisions."""
    for entry in audit_log.entries(sandbox):
        if json_out:
            print(json.dumps(entry))
            continue
        details = " ".join(f"{k}={json.dumps(entry[k])}" for k in SUMMARY_KEYS if entry.get(k) is not None)
        console.print(
            f"{entry.get('ts')} {entry.get('sandbox') or '-'} {entry.get('event')} {details}", markup=False
        )
