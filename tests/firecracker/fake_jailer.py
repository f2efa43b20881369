"""A stand-in for Firecracker's jailer, which cannot run here either (it ships with firecracker).

It checks its arguments as jailer.md says the jailer does (id, exec file, chroot base, cgroup and
resource-limit formats, netns path), then does what the backend relies on, without confining
anything: it gives the chroot, <chroot base>/<exec file name>/<id>/root, to --uid and --gid as the
jailer does; starts the exec file (the fake firecracker), in the network namespace given with --netns
(through nsenter), with FAKE_FC_ROOT set to the chroot, so that every path Firecracker is given
resolves inside it, and FAKE_FC_UID and FAKE_FC_GID, the ids the jailer would drop to, so that it
checks its access to the folders of its sockets as that uid; writes the child's pid to
<chroot>/<exec file name>.pid; and exits, as the jailer does with --new-pid-ns. The arguments after
`--` go to firecracker, after the ones the jailer adds.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path


def fail(message: str) -> None:
    print(f"Jailer error: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", required=True)
    parser.add_argument("--exec-file", required=True)
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--chroot-base-dir", default="/srv/jailer")
    parser.add_argument("--cgroup-version", choices=["1", "2"], default="1")
    parser.add_argument("--parent-cgroup")
    parser.add_argument("--cgroup", action="append", default=[])
    parser.add_argument("--resource-limit", action="append", default=[])
    parser.add_argument("--netns")
    parser.add_argument("--new-pid-ns", action="store_true")
    parser.add_argument("--daemonize", action="store_true")
    args = parser.parse_args(own)
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", args.id):
        fail(f"invalid instance id {args.id!r}")
    exec_file = Path(args.exec_file).resolve()
    if not exec_file.is_file() or "firecracker" not in exec_file.name:
        fail(f"invalid exec file {args.exec_file}")
    for value in args.cgroup:
        file, _, setting = value.partition("=")
        if not setting or "=" in setting or "/" in file:
            fail(f"invalid cgroup {value!r}")
    if args.netns and not Path(args.netns).exists():
        fail(f"cannot open the network namespace {args.netns}")
    root = Path(args.chroot_base_dir).resolve() / exec_file.name / args.id / "root"
    if not root.is_dir():
        fail(f"no chroot at {root}")
    os.chown(root, args.uid, args.gid)  # `/` for the jailed Firecracker
    netns = ["nsenter", f"--net={args.netns}", "--"] if args.netns else []
    child = subprocess.Popen(
        [*netns, str(exec_file), "--id", args.id, "--start-time-us", "0", "--start-time-cpu-us", "0", *extra],
        env={
            **os.environ,
            "FAKE_FC_ROOT": str(root),
            "FAKE_FC_UID": f"{args.uid}",
            "FAKE_FC_GID": f"{args.gid}",
        },
    )
    with (root / f"{exec_file.name}.pid").open("x") as pidfile:
        pidfile.write(str(child.pid))
    os._exit(0)  # leave the child running, reparented, as the jailer's clone()d child is


if __name__ == "__main__":
    main()
