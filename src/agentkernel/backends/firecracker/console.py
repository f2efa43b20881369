"""A Firecracker sandbox's serial console, kept in a file of bounded size.

Firecracker writes the guest's serial console to its stdout, and a guest can write there without
end. Its stdout is a pipe to this small process, which appends what comes to the console log and,
whenever the file would pass its cap, cuts it down to its last quarter (from a line start), in
place: `agentkernel logs` and the exit-reason code, which reads the end, keep the latest lines.
It ends when the pipe does, once Firecracker has exited.

Run by path with the standard library only, so that it starts fast and small:
`python -I -S firecracker_console.py LOG CAP`.
"""

from __future__ import annotations

import os
import sys

CHUNK = 65536


def trim(fd: int, size: int, keep: int) -> int:
    """Keep the file's last `keep` bytes or fewer, from the start of a line; its new size."""
    tail = os.pread(fd, keep, max(0, size - keep))
    if size > keep and b"\n" in tail:
        tail = tail[tail.index(b"\n") + 1 :]
    os.pwrite(fd, tail, 0)
    os.ftruncate(fd, len(tail))
    os.lseek(fd, len(tail), os.SEEK_SET)
    return len(tail)


def main() -> None:
    path, cap = sys.argv[1], int(sys.argv[2])
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    size = os.lseek(fd, 0, os.SEEK_END)
    while data := os.read(0, CHUNK):
        if size + len(data) > cap:
            size = trim(fd, size, cap // 4)
            data = data[-(cap // 2) :]  # a chunk bigger than the file may be: its end only
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        size += len(data)


if __name__ == "__main__":
    main()
