"""`agentkernel doctor`: report (and with --repair fix) what crashes and kills left in the data dir."""

from __future__ import annotations

import typer

from agentkernel.cli.output import console


def doctor(
    repair: bool = typer.Option(
        False, "--repair", help="Fix what is found: clean dead builds, rebuild a damaged state database."
    ),
) -> None:
    """Check the data dir: dead builds, the state database, sandboxes whose VMM lost its record."""
    from agentkernel.service.doctor import diagnose

    findings = diagnose(repair=repair)
    for finding in findings:
        mark = "[green]fixed[/green]" if finding.repaired else "[yellow]problem[/yellow]"
        console.print(f"{mark} ", end="")
        console.print(finding.message, markup=False, highlight=False)
    if not findings:
        console.print("no problems found")
    elif any(not f.repaired for f in findings):
        raise typer.Exit(1)
