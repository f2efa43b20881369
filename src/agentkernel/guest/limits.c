/* Resource limits for the sandbox's processes (protocol.md, Resource limits).
 *
 * Every EXEC'd process joins a cgroup v2 group of its own, /sys/fs/cgroup/sandbox/<n>, before it runs
 * the program; HELLO's max_procs and memory_mb set pids.max and memory.max of their parent,
 * /sys/fs/cgroup/sandbox, which so bounds all the commands together. The agent stays in the root
 * group, outside the limits, at real-time scheduling priority, and shields itself from the OOM
 * killer: a fork bomb gets EAGAIN and a memory hog is killed while the agent goes on answering.
 *
 * A command's own group is what makes all of it killable: cgroup.kill reaches the processes that
 * left its process group (setsid, daemons) and those forked while the kill is under way. It is used
 * when the command is ended (its timeout, the host's SIGKILL, its connection closing while it runs);
 * when its main process exits, what it sent to the background lives on in its group (a server
 * started by one command serves the next). The CPU controller gives every command's group an equal
 * share (cpu.weight), so a fork bomb left running takes half the CPU from the next command, not all
 * of it. Groups are removed once empty (on the next command's start).
 *
 * Reclaim at memory.max can keep a slowly growing command alive for minutes (the kernel's OOM killer
 * waits while evicted program text can still be read back in), so the agent watches memory.events
 * and kills the largest process itself once the limit has been hit with pages refaulting
 * (thrashing) for PRESSURE_MS. */
#include "agent.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/inotify.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#define CG_ROOT "/sys/fs/cgroup"
#define CG_SANDBOX CG_ROOT "/sandbox"
#define MIN_RESERVE (32LL << 20)  /* memory kept out of the sandbox's reach for the agent and kernel */
#define DEFAULT_MAX_PROCS "1024"  /* pids.max until a HELLO sets it: never unlimited */
#define PRESSURE_MS 2000          /* at the memory limit and thrashing this long: the agent kills */
#define RECENT_MS 500             /* the limit was hit this recently: the pressure goes on */
#define THRASH_PAGES 64           /* refaults within PRESSURE_MS that mean thrashing, not streaming */

static int sandbox_fd = -1;  /* CG_SANDBOX, O_DIRECTORY: the command groups are made in it */
static bool cg_failed;       /* set-up failed once: said so, not tried again */
static bool oom_shielded;    /* the agent's oom_score_adj is -1000; children must not inherit it */
static unsigned next_group = 1;
static unsigned *dying;      /* groups whose command ended with processes left: removed once empty */
static size_t ndying, capdying;

/* Memory pressure: counters from memory.events and memory.stat as last read. */
static long long seen_max, seen_oom_kill;
static int64_t pressure_since, last_max_at;  /* monotonic ms; 0: no pressure */
static long long refaults_at_start;

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

/* The value of `key` in a cgroup file of "key value" lines; -1 if absent or unreadable. */
static long long read_key(const char *path, const char *key)
{
	char buf[8192];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	size_t k = strlen(key);
	for (char *line = buf; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
		if (!strncmp(line, key, k) && line[k] == ' ')
			return atoll(line + k + 1);
	return -1;
}

static bool cg_fail(const char *what)
{
	logmsg("resource limits unavailable: %s: %s (processes run without them)", what, strerror(errno));
	cg_failed = true;
	return false;
}

/* Mount cgroup2, enable the pids and memory controllers for children and the CPU controller down to
 * the command groups, make the sandbox group with the default process limit, and watch its
 * memory.events (the inotify fd joins the epoll set). A kernel without the CPU controller still gets
 * the other limits.
 * favordynmods: every command's process joins a group, and without it the first join after a short
 * idle waits for an RCU grace period (about 30 ms with HZ=100); kernels before 6.0 lack it. */
static bool cg_setup(void)
{
	if (sandbox_fd >= 0)
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
	if (!write_file(CG_SANDBOX "/pids.max", DEFAULT_MAX_PROCS))
		return cg_fail(CG_SANDBOX "/pids.max");
	if (!write_file(CG_ROOT "/cgroup.subtree_control", "+cpu") ||
	    !write_file(CG_SANDBOX "/cgroup.subtree_control", "+cpu"))
		logmsg("no CPU controller: %s (a command can take the CPU from the others)", strerror(errno));
	sandbox_fd = open(CG_SANDBOX, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (sandbox_fd < 0)
		return cg_fail("open " CG_SANDBOX);
	int in = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	if (in < 0 || inotify_add_watch(in, CG_SANDBOX "/memory.events", IN_MODIFY) < 0) {
		logmsg("cannot watch " CG_SANDBOX "/memory.events: %s (no action on memory pressure)",
		       strerror(errno));
		if (in >= 0)
			close(in);
	} else {
		watch_add(in, W_LIMITS, EPOLLIN, NULL, NULL);
	}
	return true;
}

/* At start: in a VM, the group exists from the first process on (with the default process limit
 * until a HELLO sets the limits). In a container the runtime's cgroup limits the whole container and
 * the agent cannot mount. */
void limits_init(void)
{
	if (write_file("/proc/self/oom_score_adj", "-1000"))
		oom_shielded = true;
	else
		setup_failed("oom_score_adj");
	/* Real-time priority: the agent runs whenever it has work, however many processes the sandbox
	 * has running (nice -20 still left it 2% of the CPU against a fork bomb at 4096). The kernel's RT
	 * throttling leaves the rest at least 5%; the agent only ever waits in epoll. Its children start
	 * as ordinary processes (SCHED_RESET_ON_FORK). musl leaves sched_setscheduler unimplemented. */
	struct sched_param rt = { .sched_priority = 1 };
	if (syscall(SYS_sched_setscheduler, 0, SCHED_FIFO | SCHED_RESET_ON_FORK, &rt))
		setup_failed("real-time priority");
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

/* Remove the groups that were left with processes and have none now (rmdir fails while a group has
 * processes). */
static void sweep(void)
{
	size_t kept = 0;
	char name[16];
	for (size_t i = 0; i < ndying; i++) {
		snprintf(name, sizeof name, "%u", dying[i]);
		if (unlinkat(sandbox_fd, name, AT_REMOVEDIR) && errno == EBUSY)
			dying[kept++] = dying[i];
	}
	ndying = kept;
}

/* A new group for one command: its cgroup.procs open for writing (the child joins with it) and its
 * number in *id; -1 where there are no cgroups (the child then joins none). */
int limits_group(unsigned *id)
{
	*id = 0;
	if (sandbox_fd < 0)
		return -1;
	sweep();
	char path[32];
	for (int tries = 0; tries < 4; tries++, next_group++) {
		snprintf(path, sizeof path, "%u", next_group);
		if (!mkdirat(sandbox_fd, path, 0755))
			break;
		if (errno != EEXIST) {
			logmsg("mkdir " CG_SANDBOX "/%s: %s", path, strerror(errno));
			return -1;
		}
	}
	snprintf(path, sizeof path, "%u/cgroup.procs", next_group);
	int fd = openat(sandbox_fd, path, O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		logmsg("open " CG_SANDBOX "/%s: %s", path, strerror(errno));
		return -1;
	}
	*id = next_group++;
	return fd;
}

/* The command's channel has ended: its group goes now, or once its last processes are gone. */
void limits_release(unsigned id)
{
	char name[16];
	if (!id)
		return;
	snprintf(name, sizeof name, "%u", id);
	if (!unlinkat(sandbox_fd, name, AT_REMOVEDIR) || errno != EBUSY)
		return;
	if (ndying == capdying) {
		size_t cap = capdying ? 2 * capdying : 16;
		unsigned *p = realloc(dying, cap * sizeof *p);
		if (!p)
			return;  /* not tracked: the empty group stays, harmless */
		dying = p;
		capdying = cap;
	}
	dying[ndying++] = id;
}

/* In a child before exec: give up the agent's OOM shield and join the command's group. */
int limits_join(int procs_fd)
{
	if (oom_shielded && !write_file("/proc/self/oom_score_adj", "0"))
		return -1;
	if (procs_fd >= 0 && write(procs_fd, "0", 1) != 1)
		return -1;
	return 0;
}

/* SIGKILL every process of command group `id`, also those that left the command's process group. */
void limits_kill(unsigned id)
{
	char path[48];
	if (!id)
		return;
	snprintf(path, sizeof path, CG_SANDBOX "/%u/cgroup.kill", id);
	if (!write_file(path, "1") && errno != ENOENT)
		logmsg("%s: %s", path, strerror(errno));
}

static long long refaults(void)
{
	long long file = read_key(CG_SANDBOX "/memory.stat", "workingset_refault_file");
	long long anon = read_key(CG_SANDBOX "/memory.stat", "workingset_refault_anon");
	return (file > 0 ? file : 0) + (anon > 0 ? anon : 0);
}

/* The sandbox's process with the most resident memory; 0 if none. */
static pid_t largest(long long *pages)
{
	pid_t best = 0;
	*pages = -1;
	DIR *d = opendir(CG_SANDBOX);
	if (!d)
		return 0;
	for (struct dirent *e; (e = readdir(d));) {
		if (!isdigit((unsigned char)e->d_name[0]))
			continue;
		char path[320], buf[16];
		snprintf(path, sizeof path, CG_SANDBOX "/%s/cgroup.procs", e->d_name);
		FILE *procs = fopen(path, "re");
		while (procs && fgets(buf, sizeof buf, procs)) {
			long long size = 0, rss = 0;
			snprintf(path, sizeof path, "/proc/%d/statm", atoi(buf));
			FILE *statm = fopen(path, "re");
			if (statm && fscanf(statm, "%lld %lld", &size, &rss) == 2 && rss > *pages) {
				*pages = rss;
				best = atoi(buf);
			}
			if (statm)
				fclose(statm);
		}
		if (procs)
			fclose(procs);
	}
	closedir(d);
	return best;
}

/* memory.events changed: note whether the limit is being hit, and whether the kernel's OOM killer
 * has acted. */
void limits_event(int fd)
{
	char buf[4096];
	while (read(fd, buf, sizeof buf) > 0)
		;
	long long max = read_key(CG_SANDBOX "/memory.events", "max");
	long long oom_kill = read_key(CG_SANDBOX "/memory.events", "oom_kill");
	if (oom_kill != seen_oom_kill) {
		seen_oom_kill = oom_kill;
		pressure_since = 0;  /* the kernel's OOM killer acted: start over */
	}
	if (max != seen_max) {
		seen_max = max;
		last_max_at = now;
		if (!pressure_since) {
			pressure_since = now;
			refaults_at_start = refaults();
		}
	}
}

/* After PRESSURE_MS at the limit: if it is still being hit and evicted pages are being read back in,
 * the sandbox is thrashing; kill its largest process, as the OOM killer would at last. */
void limits_timers(void)
{
	if (!pressure_since || now < pressure_since + PRESSURE_MS)
		return;
	pressure_since = 0;
	long long refaulted = refaults() - refaults_at_start;
	if (now - last_max_at > RECENT_MS || refaulted < THRASH_PAGES)
		return;
	long long pages;
	pid_t victim = largest(&pages);
	if (victim <= 0)
		return;
	logmsg("memory pressure: the sandbox thrashed at memory.max for %d ms (%lld pages refaulted): "
	       "killed pid %d (%lld KiB resident)", PRESSURE_MS, refaulted, (int)victim, pages * 4);
	kill(victim, SIGKILL);
}

int64_t limits_next_timer(void)
{
	return pressure_since ? pressure_since + PRESSURE_MS : INT64_MAX;
}
