"""The `agentkernel` entry point: commands it can do on the standard library alone, at once; the full
(Typer) command line for everything else.

A command is done here only when every flag it was given is one this module fully understands and
nothing it meets needs the service's work (a sandbox to reap or reconcile, a database another process
holds, an input error to phrase): then it prints exactly what the full command line would. Otherwise
it has printed nothing and changed nothing, and the full command line runs with the same arguments, so
behaviour, errors and exit codes are the full command line's by construction.

Done here today: `--version`; `ls`/`list` (with `-a`/`--all` and `-f`/`--filter label=KEY=VALUE`)
when every record shown is as its backend would leave it (QEMU's VMMs are checked in /proc; a running
sandbox of another backend sends `ls` to the full command line); `exec` without a terminal or
`--detach` in a running QEMU sandbox (`thin_exec`); `run` when the pool daemon has a ready sandbox of
its kind (`thin_run`); `stop`, `rm` and `cp` when the pool daemon runs, which has the service do them
(`thin_served`).
"""

from __future__ import annotations

import json
import os
import sys
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import Any

FULL_ENV = "AGENTKERNEL_FULL_CLI"
"""Set to 1: every command goes to the full command line (to compare the two)."""
TRACE_ENV = "AGENTKERNEL_THIN_TRACE"
"""A file path: a command done here writes the modules it imported there, one a line."""
LIST_HEADER = f"{'NAME':<24} {'STATUS':<8} {'BACKEND':<8} {'IMAGE':<12} {'CPUS':>4} {'MEM':>6}  CREATED"
NO_SANDBOXES = "no sandboxes"


class Fallback(Exception):
    """The full command line is to do this command."""


def list_line(r: Mapping[str, Any]) -> str:
    """A sandbox's line in `ls` (`r`: its record's fields by name)."""
    return (
        f"{r['name']:<24} {r['status']:<8} {r['backend']:<8} {r['image']:<12} {r['vcpus']:>4} "
        f"{r['memory_mb']:>4}MB  {r['created_at']}"
    )


def os_error_line(exc: OSError) -> str:
    """The one line for an error on the host's side (a full disk, a file it may not read or write)."""
    from agentkernel.errors import os_error_text

    return f"agentkernel: error: {os_error_text(exc)}"


def one_line(message: str) -> str:
    """`message` with control characters escaped: what a user typed, quoted in it, stays on its line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def main() -> None:
    argv = sys.argv[1:]
    if os.environ.get(FULL_ENV) != "1" and "_AGENTKERNEL_COMPLETE" not in os.environ:
        if argv[:1] in (["exec"], ["run"], ["stop"], ["rm"], ["remove"], ["cp"]):
            _done(argv[0], argv[1:])
        try:
            out = thin(argv)
        except Fallback:
            out = None
        if out is not None:
            try:
                sys.stdout.write(out)
                sys.stdout.flush()
            except BrokenPipeError:  # the reader left (`| head`): silently, as rich ends the full one
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing to flush at exit
                sys.exit(1)
            except OSError as exc:  # a full disk: the full command line's one line
                print(os_error_line(exc), file=sys.stderr)
                sys.exit(1)
            _trace()
            sys.exit(0)
    from agentkernel.cli.app import main as full

    full()


def _done(command: str, args: Sequence[str]) -> None:
    """`exec`, `run`, `stop`, `rm` or `cp` here and exit with its status, unless it falls back (then
    return, having done nothing)."""
    from agentkernel.errors import AgentkernelError

    try:
        if command == "exec":
            from agentkernel.cli import thin_exec

            code = thin_exec.run(args)
        elif command == "run":
            from agentkernel.cli import thin_run

            code = thin_run.run(args)
        else:
            from agentkernel.cli import thin_served

            code = thin_served.run(command, args)
    except Fallback:
        return
    except AgentkernelError as exc:
        _trace()
        print(f"agentkernel: error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:  # our stdout closed (`| head`), a full disk: the full command line's line
        print(os_error_line(exc), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("agentkernel: interrupted", file=sys.stderr)
        sys.exit(130)
    _trace()
    sys.exit(code)


def _trace() -> None:
    if trace := os.environ.get(TRACE_ENV):
        with open(trace, "w") as f:
            f.write("".join(f"{name}\n" for name in sorted(sys.modules)))


def thin(argv: Sequence[str]) -> str | None:
    """What the command prints on stdout when it is done here (it exits 0); None, or Fallback raised,
    for the full command line."""
    if list(argv) in (["--version"], ["-V"]):
        from agentkernel import __version__

        return f"agentkernel {__version__}\n"
    if argv[:1] in (["ls"], ["list"]):
        return list_sandboxes(argv[1:])
    return None


def _options(
    args: Sequence[str], flags: Mapping[str, str], valued: Mapping[str, str]
) -> dict[str, list[str]]:
    """`args` as {option: [values]} (a flag's value is ""); `flags` and `valued` map each spelling to
    its option. Anything else (an argument, `--help`, an option spelled another way) is a Fallback."""
    found: dict[str, list[str]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg in flags:
            found.setdefault(flags[arg], []).append("")
        elif arg in valued and i + 1 < len(args):
            found.setdefault(valued[arg], []).append(args[i + 1])
            i += 1
        elif eq and name.startswith("--") and name in valued:
            found.setdefault(valued[name], []).append(value)
        else:
            raise Fallback(arg)
        i += 1
    return found


def list_sandboxes(args: Sequence[str]) -> str:
    """`ls`: the sandboxes' table, when no record needs reaping or reconciling (see `sandboxes.reap`,
    `sandboxes.reconcile`)."""
    from agentkernel.errors import AgentkernelError
    from agentkernel.sandbox import db
    from agentkernel.service import checks

    given = _options(args, {"-a": "all", "--all": "all"}, {"-f": "filter", "--filter": "filter"})
    labels = []
    for value in given.get("filter", []):
        kind, sep, label = value.partition("=")
        if kind != "label" or not sep:
            raise Fallback(value)
        labels.append(label)
    try:
        return _table(checks.parse_labels(labels), db.all_rows(wait=False), "all" in given)
    except (AgentkernelError, db.Busy, ValueError, TypeError, AttributeError, KeyError, OSError):
        # a held database, a damaged record, a path it may not read: the full command line's one line
        raise Fallback from None


def _table(wanted: Mapping[str, str], rows: Sequence[Mapping[str, Any]], every: bool) -> str:
    """The table of `rows` with all of the labels `wanted` (pool sandboxes only if `every`)."""
    from agentkernel.service import owners

    shown = []
    for row in rows:
        extra = json.loads(row["extra"])
        if not isinstance(extra, dict) or owners.dead_owner(extra.get("owner")) is not None:
            raise Fallback(row["name"])
        if extra.get("pool") and not every:
            continue
        if not as_recorded(row, extra):
            raise Fallback(row["name"])
        if wanted.items() <= (extra.get("labels") or {}).items():
            shown.append(row)
    if not shown:
        return f"{NO_SANDBOXES}\n"
    return "".join(f"{line}\n" for line in (LIST_HEADER, *(list_line(r) for r in shown)))


def as_recorded(row: Mapping[str, Any], extra: Mapping[str, Any]) -> bool:
    """Whether reconciling would leave the record as it is: nothing to change in it or on the host."""
    from agentkernel.sandbox.liveness import vmm_alive
    from agentkernel.service import owners

    status, pid = row["status"], row["pid"]
    if status == "starting":
        starter = extra.get("starter")
        return isinstance(starter, dict) and owners.is_alive(starter)
    if status not in ("running", "paused") or pid is None:
        return True
    deadline = extra.get("deadline")
    if deadline is not None and time.time() >= deadline:
        return False
    from pathlib import Path

    return vmm_alive(row["backend"], Path(row["rundir"]), pid) is True


if __name__ == "__main__":
    main()
