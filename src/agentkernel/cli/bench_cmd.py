"""`agentkernel bench` and `bench stress`: figures, not pass/fail."""

from __future__ import annotations

import sys

import typer

from agentkernel.cli.output import console, err_console, print_json

app = typer.Typer(invoke_without_command=True)


@app.callback()
def bench(
    ctx: typer.Context,
    runs: int = typer.Option(
        5, "--runs", min=1, max=50, metavar="N", help="Repetitions of each boot measurement."
    ),
    image: str = typer.Option("base", "--image", metavar="IMAGE", help="Image to boot."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure boot, run, exec and stop against a bare QEMU boot of the same kernel and image, snapshots
    and the warm pool."""
    if ctx.invoked_subcommand is not None:
        return
    from agentkernel.bench import (
        figures as benchmarks,  # imported here: keeps every other command's start fast
    )

    result = benchmarks.lifecycle(runs=runs, image=image)
    result["snapshots"] = snap = benchmarks.snapshot_figures(image=image)
    result["pool"] = pool = benchmarks.pool_figures(runs=runs, image=image)
    if json_out:
        print_json(result)
        return
    console.print(
        f"acceleration: {result['accel']}, image {result['image']}, median of {result['runs']} runs"
    )
    console.print(f"bare QEMU boot to agent ready:   {result['bare_qemu_boot_to_agent_s']:.3f} s")
    console.print(f"`run --no-network` to cmd start: {result['run_to_command_start_s']:.3f} s")
    console.print(f"our overhead on the bare VMM:    {result['overhead_ratio'] * 100:.1f} %")
    console.print(
        f"  of which: CLI start {result['cli_start_s']:.3f} s (`agentkernel --version`), "
        f"the first command in a new VM {result['first_exec_in_new_vm_s']:.3f} s (read, run the first time)"
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


@app.command("stress")
def stress(
    count: int = typer.Option(100, "--count", min=1, max=1000, metavar="N", help="Sandboxes to run."),
    concurrency: int = typer.Option(
        6, "--concurrency", min=1, max=64, metavar="N", help="How many start at once."
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
