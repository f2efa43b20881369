"""`agentkernel bench` and `bench stress`: figures, not pass/fail."""

from __future__ import annotations

import sys

import typer

from agentkernel.bench import DEFAULT_CONCURRENCY
from agentkernel.cli.output import console, err_console, print_json

app = typer.Typer(invoke_without_command=True)


@app.callback()
def bench(
    ctx: typer.Context,
    runs: int = typer.Option(
        5, "--runs", min=1, max=50, metavar="N", help="Repetitions of each boot measurement."
    ),
    image: str = typer.Option("base", "--image", metavar="IMAGE", help="Image to boot."),
    count: int = typer.Option(
        100,
        "--count",
        min=1,
        max=200,
        metavar="N",
        help="Sandboxes for the pool fill, stress, memory and idle figures (the targets are for 100).",
    ),
    idle_seconds: float = typer.Option(
        60, "--idle-seconds", min=1, max=600, metavar="S", help="Seconds idle sandboxes are watched."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure boot, run, exec and stop against a bare QEMU boot of the same kernel and image, snapshots,
    the warm pool, filling it, and stress runs (without and with network); then the table of targets.
    Runs in a new empty directory, so it measures the same wherever it is started."""
    if ctx.invoked_subcommand is not None:
        return
    from agentkernel.bench import (
        figures as benchmarks,  # imported here: keeps every other command's start fast
    )

    result = benchmarks.everything(runs=runs, image=image, count=count, idle_seconds=idle_seconds)
    if json_out:
        print_json(result)
        return
    snap, pool, fill_ = result["snapshots"], result["pool"], result["fill"]
    console.print(
        f"acceleration: {result['accel']}, image {result['image']}, median of {result['runs']} runs"
    )
    console.print(f"bare QEMU boot to agent ready:   {result['bare_qemu_boot_to_agent_s']:.3f} s")
    console.print(f"`run --no-network` to cmd start: {result['run_to_command_start_s']:.3f} s")
    console.print(f"our overhead on the bare VMM:    {result['overhead_ratio'] * 100:.1f} %")
    console.print(
        f"  of which: CLI start {result['cli_start_s']:.3f} s (`agentkernel --version`; "
        f"`python3 -c pass` {result['python_pass_s']:.3f} s), the first command in a new VM "
        f"{result['first_exec_in_new_vm_s']:.3f} s (read, run the first time)"
    )
    console.print(f"`run` with network (gateway):    {result['run_with_network_to_command_start_s']:.3f} s")
    console.print(f"exec round trip of `true`:       {result['exec_round_trip_true_s'] * 1000:.1f} ms")
    console.print(f"stop:                            {result['stop_s']:.3f} s")
    console.print(
        f"cold boot to ready {snap['cold_boot_to_ready_s']:.3f} s, restore to ready "
        f"{snap['restore_to_ready_s']:.3f} s ({snap['restore_over_cold']:.2f} of cold)"
    )
    console.print(
        f"VMM memory (PSS): cold {snap['cold_pss_bytes'] / 2**20:.1f} MiB, each of {snap['forks']} restored "
        f"{snap['restored_pss_bytes_mean'] / 2**20:.1f} MiB ({snap['restored_over_cold_pss']:.2f} of cold)"
    )
    console.print(
        f"`run -- true` in process: cold {pool['cold_run_true_s']:.3f} s, "
        f"through the pool {pool['pool_run_true_s']:.3f} s ({pool['pool_over_cold']:.2f} of cold)"
    )
    console.print(
        f"`agentkernel run -- true`: cold {pool['cli_cold_run_true_s']:.3f} s, "
        f"through the pool {pool['cli_pool_run_true_s']:.3f} s ({pool['cli_pool_over_cold']:.2f} of cold)"
    )
    console.print(
        f"filling the pool with {fill_['count']}: {fill_['fill_s']:.2f} s (first ready after "
        f"{fill_['first_ready_s']:.2f} s; {fill_['peak_making']} made at once, at most {fill_['parallel']})"
    )
    cli_row = result["table"]["cli_cost_over_python"]
    for when, ratios in (("with a pool daemon", cli_row["each"]), ("without", cli_row["without_daemon"])):
        each = ", ".join(f"{label} {ratio:g}" for label, ratio in ratios.items())
        console.print(f"the CLI's own cost over `python3 -c pass`, {when}: {each}")
    for key in ("stress", "stress_network"):
        run = result[key]
        flag = " --network" if run["network"] else ""
        console.print(f"stress{flag}: {run['succeeded']}/{run['count']} in {run['total_s']:.2f} s")
    console.print("targets:")
    for name, row in result["table"].items():
        verdict = {True: "holds", False: "misses", None: "not measured"}[row["holds"]]
        value = "-" if row["value"] is None else f"{row['value']:g}"
        console.print(f"  {name:<24} {value:>8} {row['unit']:<6} target <= {row['target']:g}: {verdict}")


@app.command("stress")
def stress(
    count: int = typer.Option(100, "--count", min=1, max=1000, metavar="N", help="Sandboxes to run."),
    concurrency: int = typer.Option(
        DEFAULT_CONCURRENCY, "--concurrency", min=1, max=64, metavar="N", help="How many start at once."
    ),
    image: str = typer.Option("base", "--image", metavar="IMAGE", help="Image to boot."),
    network: bool = typer.Option(False, "--network/--no-network", help="Give each its network gateway."),
    mode: str = typer.Option(
        "snapshot",
        "--mode",
        metavar="MODE",
        help="snapshot: resume each from one snapshot; pool: take each from a pool filled first "
        "(untimed); cold: boot each.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Start many sandboxes (all up at the peak), check each command's output, remove them all, and
    count what is left behind."""
    from agentkernel.bench import stress as stress_test

    def progress(stage: str, done: int, total: int) -> None:
        if sys.stderr.isatty():
            err_console.print(f"{stage}: {done}/{total}", end="\r")

    result = stress_test.stress(
        count=count, concurrency=concurrency, mode=mode, image=image, network=network, progress=progress
    )
    if json_out:
        print_json(result)
    else:
        console.print(
            f"{result['succeeded']}/{result['count']} succeeded in {result['total_s']:.2f} s "
            f"(mode {mode}, concurrency {concurrency}; preparation {result['prepare_s']:.2f} s)"
        )
        for stage, p in result["stages"].items():
            if p["p50"] is not None:
                console.print(
                    f"  {stage:<7} p50 {p['p50']:.3f} s  p95 {p['p95']:.3f} s  p99 {p['p99']:.3f} s"
                )
        console.print(
            f"  peak RSS of the VMMs and this process: {result['peak_host_rss_bytes'] / 2**30:.2f} GiB"
        )
        console.print("  left behind: " + ", ".join(f"{k} {v}" for k, v in result["leaks"].items()))
        for error in result["errors"]:
            console.print(f"  error: {error}")
    if result["failed"] or any(result["leaks"].values()):
        raise typer.Exit(1)
