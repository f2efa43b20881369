"""The container backend's seccomp profiles: deny by default, an allowlist per security profile.

The profiles follow the idea of the Docker/Podman default profile (every syscall not listed fails
with EPERM; a few are allowed only with harmless arguments) and are stricter than it: the container
runs with no capabilities worth the kernel surface behind mount, namespaces, keyrings, BPF and the
like, so those syscalls are not reachable at all.

- moderate: what programs, compilers, package managers, language runtimes and debuggers use.
- restrictive: moderate without ptrace and process_vm_*, the 32-bit x86 ABI, netlink and other
  socket families but Unix and IP, SysV message queues, and personality changes.
- permissive: moderate plus user namespaces and mounts inside them (unshare, setns, mount, clone with
  namespace flags, clone3), so that an agent's own sandbox (bubblewrap, as Claude Code uses on
  Linux) can work inside the container.

The JSON files in agentkernel/assets/seccomp/ are this module's output, kept in the repository so that
they can be read and diffed; `python -m agentkernel.backends.container.seccomp` rewrites them, and a test
checks that they are current.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

PROFILES = ("permissive", "moderate", "restrictive")
EPERM = 1
ENOSYS = 38

# clone(2) flags that make namespaces: CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET.
CLONE_NAMESPACES = 0x7E020000
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16

BASE = """
accept accept4 access alarm arch_prctl bind brk capget capset chdir chmod chown clock_getres
clock_gettime clock_nanosleep close close_range connect copy_file_range creat dup dup2 dup3
epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd eventfd2 execve
execveat exit exit_group faccessat faccessat2 fadvise64 fallocate fchdir fchmod fchmodat fchown
fchownat fcntl fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstatfs fsync
ftruncate futex futex_waitv futimesat get_robust_list get_mempolicy getcpu getcwd getdents
getdents64 getegid geteuid getgid getgroups getitimer getpeername getpgid getpgrp getpid getppid
getpriority getrandom getresgid getresuid getrlimit getrusage getsid getsockname getsockopt gettid
gettimeofday getuid getxattr inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel
io_destroy io_getevents io_setup io_submit ioctl ioprio_get ioprio_set kill landlock_add_rule
landlock_create_ruleset landlock_restrict_self lchown lgetxattr link linkat listen listxattr
llistxattr lremovexattr lseek lsetxattr lstat madvise mbind membarrier memfd_create mincore mkdir
mkdirat mknod mknodat mlock mlock2 mlockall mmap mprotect mq_getsetattr mq_notify mq_open
mq_timedreceive mq_timedsend mq_unlink mremap msync munlock munlockall munmap nanosleep newfstatat
open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect
poll ppoll prctl pread64 preadv preadv2 prlimit64 pselect6 pwrite64 pwritev pwritev2 read readahead
readlink readlinkat readv recvfrom recvmmsg recvmsg rename renameat renameat2 restart_syscall rmdir
rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
rt_sigtimedwait rt_tgsigqueueinfo sched_get_priority_max sched_get_priority_min sched_getaffinity
sched_getattr sched_getparam sched_getscheduler sched_rr_get_interval sched_setaffinity sched_yield
seccomp select semctl semget semop semtimedop sendfile sendmmsg sendmsg sendto set_mempolicy
set_robust_list set_tid_address setfsgid setfsuid setgid setgroups setitimer setpgid setpriority
setregid setresgid setresuid setreuid setrlimit setsid setsockopt setuid setxattr shmat shmctl shmdt
shmget shutdown sigaltstack signalfd signalfd4 socketpair splice stat statfs statx symlink symlinkat
sync sync_file_range syncfs sysinfo tee tgkill time timer_create timer_delete timer_getoverrun
timer_gettime timer_settime timerfd_create timerfd_gettime timerfd_settime times tkill truncate
umask uname unlink unlinkat utime utimensat utimes vfork wait4 waitid write writev
"""

# Debuggers and tracers (gdb, strace, py-spy): fine in the container's own pid namespace.
TRACING = "ptrace process_vm_readv process_vm_writev kcmp"
# SysV message queues: rarely used, kept out of the restrictive profile.
SYSV_MSG = "msgctl msgget msgrcv msgsnd"
# 32-bit x86 names of the calls above (the x86 ABI is allowed outside the restrictive profile).
X86_32 = """
_llseek _newselect chown32 clock_gettime64 clock_nanosleep_time64 fadvise64_64 fchown32 fcntl64
fstat64 fstatat64 fstatfs64 ftruncate64 futex_time64 getegid32 geteuid32 getgid32 getgroups32
getresgid32 getresuid32 getuid32 lchown32 lstat64 mmap2 ppoll_time64 pselect6_time64 recv
recvmmsg_time64 rt_sigtimedwait_time64 send sendfile64 setfsgid32 setfsuid32 setgid32 setgroups32
setregid32 setresgid32 setresuid32 setreuid32 setuid32 sigaction signal sigpending sigprocmask
sigreturn sigsuspend socketcall stat64 statfs64 truncate64 ugetrlimit waitpid set_thread_area
get_thread_area timer_gettime64 timer_settime64 timerfd_gettime64 timerfd_settime64
utimensat_time64 semtimedop_time64 io_pgetevents_time64 clock_getres_time64 mq_timedreceive_time64
mq_timedsend_time64 sched_rr_get_interval_time64
"""
# Nested sandboxes (permissive only): user namespaces and what is done inside them.
NESTED = "unshare setns mount umount2 pivot_root clone3"


def _names(*groups: str) -> list[str]:
    return sorted({name for group in groups for name in group.split()})


def _allow(names: list[str]) -> dict[str, Any]:
    return {"names": names, "action": "SCMP_ACT_ALLOW"}


def _arg(index: int, value: int, op: str = "SCMP_CMP_EQ", value_two: int = 0) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


def profile(name: str) -> dict[str, Any]:
    """The seccomp profile (OCI/Docker JSON form) for a security profile."""
    if name not in PROFILES:
        raise ValueError(f"unknown security profile {name!r}")
    restrictive, permissive = name == "restrictive", name == "permissive"
    groups = [BASE] + ([] if restrictive else [TRACING, SYSV_MSG, X86_32]) + ([NESTED] if permissive else [])
    rules: list[dict[str, Any]] = [_allow(_names(*groups))]
    # clone: threads and processes; new namespaces only where nested sandboxes are allowed.
    if permissive:
        rules.append(_allow(["clone"]))
    else:
        rules.append({**_allow(["clone"]), "args": [_arg(0, CLONE_NAMESPACES, "SCMP_CMP_MASKED_EQ", 0)]})
        # glibc falls back to clone when clone3 is unknown; clone3's flags cannot be filtered.
        rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    # socket: Unix and IP everywhere; netlink (ip, glibc's getaddrinfo probes) outside restrictive.
    families = [AF_UNIX, AF_INET, AF_INET6] + ([] if restrictive else [AF_NETLINK])
    rules += [{**_allow(["socket"]), "args": [_arg(0, family)]} for family in families]
    # personality: only the values programs query or set for themselves (as Docker's profile does).
    personas = [0x0] if restrictive else [0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF]
    rules += [{**_allow(["personality"]), "args": [_arg(0, value)]} for value in personas]
    arches: list[dict[str, Any]] = [
        {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": [] if restrictive else ["SCMP_ARCH_X86"]},
        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": [] if restrictive else ["SCMP_ARCH_ARM"]},
    ]
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "archMap": arches,
        "syscalls": rules,
    }


def asset_path(name: str) -> Path:
    """The profile's JSON file as shipped in the package."""
    if name not in PROFILES:
        raise ValueError(f"unknown security profile {name!r}")
    return Path(str(resources.files("agentkernel").joinpath("assets", "seccomp", f"{name}.json")))


def render(name: str) -> str:
    return json.dumps(profile(name), indent=1) + "\n"


def main() -> None:
    for name in PROFILES:
        asset_path(name).parent.mkdir(parents=True, exist_ok=True)
        asset_path(name).write_text(render(name))
        print(asset_path(name))


if __name__ == "__main__":
    main()
