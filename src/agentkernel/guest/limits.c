/* Resource limits for the sandbox's processes (protocol.md, Resource limits).
 *
 * Every EXEC'd process joins one cgroup v2 group, /sys/fs/cgroup/sandbox, before it runs the
 * program; HELLO's max_procs and memory_mb set that group's pids.max and memory.max. The agent
 * stays in the root group, outside the limits, and shields itself from the OOM killer: a fork bomb
 * gets EAGAIN and a memory hog is killed while the agent goes on answering. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#define CG_ROOT "/sys/fs/cgroup"
#define CG_SANDBOX CG_ROOT "/sandbox"
#define MIN_RESERVE (32LL << 20)  /* memory kept out of the sandbox's reach for the agent and kernel */

static int procs_fd = -1;    /* CG_SANDBOX/cgroup.procs, open for the children to join */
static bool cg_failed;       /* set-up failed once: said so, not tried again */
static bool oom_shielded;    /* the agent's oom_score_adj is -1000; children must not inherit it */

static bool write_file(const char *path, const char *text)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	ssize_t n = write(fd, text, strlen(text));
	int err = errno;
	close(fd);
	errno = err;
	return n == (ssize_t)strlen(text);
}

static bool cg_fail(const char *what)
{
	logmsg("resource limits unavailable: %s: %s (processes run without them)", what, strerror(errno));
	cg_failed = true;
	return false;
}

/* Mount cgroup2, enable the pids and memory controllers for children, make the sandbox group.
 * favordynmods: every command's process joins the sandbox group, and without it the first join after
 * a short idle waits for an RCU grace period (about 30 ms with HZ=100); kernels before 6.0 lack it. */
static bool cg_setup(void)
{
	if (procs_fd >= 0)
		return true;
	if (cg_failed)
		return false;
	const unsigned long flags = MS_NOSUID | MS_NODEV | MS_NOEXEC;
	if (!is_mountpoint(CG_ROOT) && mount("cgroup2", CG_ROOT, "cgroup2", flags, "favordynmods") &&
	    mount("cgroup2", CG_ROOT, "cgroup2", flags, NULL))
		return cg_fail("mount cgroup2 on " CG_ROOT);
	if (!write_file(CG_ROOT "/cgroup.subtree_control", "+pids +memory"))
		return cg_fail("enable the pids and memory controllers");
	if (mkdir(CG_SANDBOX, 0755) && errno != EEXIST)
		return cg_fail("mkdir " CG_SANDBOX);
	procs_fd = open(CG_SANDBOX "/cgroup.procs", O_WRONLY | O_CLOEXEC);
	if (procs_fd < 0)
		return cg_fail("open " CG_SANDBOX "/cgroup.procs");
	return true;
}

static void shield_agent(void)
{
	if (write_file("/proc/self/oom_score_adj", "-1000"))
		oom_shielded = true;
	else
		setup_failed("oom_score_adj");
}

/* At start: in a VM, the group exists from the first process on (without limits until a HELLO sets
 * them). In a container the runtime's cgroup limits the whole container and the agent cannot mount. */
void limits_init(void)
{
	shield_agent();
	if (!container)
		cg_setup();
}

/* memory.max for `mb`: at most the machine's memory less a reserve, so an OOM in the group never
 * starves the agent (or the kernel) itself. */
static long long memory_max(int64_t mb)
{
	struct sysinfo si;
	long long want = mb > (1LL << 30) ? 1LL << 50 : (long long)mb << 20;
	if (sysinfo(&si))
		return want;
	long long total = (long long)si.totalram * si.mem_unit;
	long long reserve = total / 16 > MIN_RESERVE ? total / 16 : MIN_RESERVE;
	long long cap = total - reserve > (16LL << 20) ? total - reserve : 16LL << 20;
	return want < cap ? want : cap;
}

static void set_limit(const char *file, int64_t value, long long amount)
{
	char path[128], text[32];
	snprintf(path, sizeof path, CG_SANDBOX "/%s", file);
	if (value > 0)
		snprintf(text, sizeof text, "%lld", amount);
	else
		snprintf(text, sizeof text, "max");
	if (!write_file(path, text))
		logmsg("%s = %s: %s", path, text, strerror(errno));
}

/* HELLO's max_procs and memory_mb, where present (0 or less: no limit). Absent ones stay as set. */
void limits_apply(const struct rec *r)
{
	if (!r->has[F_MAX_PROCS] && !r->has[F_MEMORY_MB])
		return;
	if (!cg_setup())
		return;
	if (r->has[F_MAX_PROCS]) {
		int64_t n = rec_int(r, F_MAX_PROCS, 0);
		set_limit("pids.max", n, n);
	}
	if (r->has[F_MEMORY_MB]) {
		int64_t mb = rec_int(r, F_MEMORY_MB, 0);
		set_limit("memory.max", mb, memory_max(mb));
	}
}

/* In a child before exec: join the sandbox group and give up the agent's OOM shield. */
int limits_join(void)
{
	if (oom_shielded && !write_file("/proc/self/oom_score_adj", "0"))
		return -1;
	if (procs_fd >= 0 && write(procs_fd, "0", 1) != 1)
		return -1;
	return 0;
}
