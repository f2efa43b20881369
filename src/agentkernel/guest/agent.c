/* agentkernel guest agent: PID 1 of every sandbox VM.
 *
 * Sets the system up, then serves docs/protocol.md on vsock port 52000 and on every
 * virtio-serial port named agentkernel.*, all connections from one single-threaded epoll loop.
 * In a container (AGENTKERNEL_LISTEN=/path/agent.sock) it is PID 1 of the container instead and
 * serves the protocol on that Unix socket; the runtime has set the system up.
 * Connection fds are edge-triggered (can_read/can_write remember unconsumed readiness);
 * process pipes are level-triggered and leave the epoll set while they must not be read,
 * which is how flow control reaches the processes. */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define VSOCK_PORT 52000
#define MAX_STREAM_CONNS 64   /* vsock or Unix socket connections */
#define LISTEN_ENV "AGENTKERNEL_LISTEN"
#define IN_CAP (HDR_LEN + MAX_PAYLOAD + CHUNK)
#define READS_PER_TURN 16     /* fairness between connections */
#define PORTS_DIR "/sys/class/virtio-ports"
#define PORT_PREFIX "agentkernel."

/* Not in musl's headers: <linux/vm_sockets.h> and <linux/netlink.h>. */
struct sockaddr_vm {
	sa_family_t svm_family;
	unsigned short svm_reserved1;
	unsigned int svm_port, svm_cid;
	unsigned char svm_flags, svm_zero[3];
};
#define VMADDR_CID_ANY 0xffffffffu
#define IOCTL_VM_SOCKETS_GET_LOCAL_CID _IO(7, 0xb9)
struct sockaddr_nl { sa_family_t nl_family; unsigned short nl_pad; uint32_t nl_pid, nl_groups; };
#define NETLINK_KOBJECT_UEVENT 15

int64_t now;
struct rlimit child_nofile;  /* the limits the kernel gave PID 1, restored for processes */
bool container;

static int ep = -1;
static struct conn *conns;
static int nstreams;
static int unix_lfd = -1;
static struct rec rec;       /* the record of the frame being handled */

/* Registered fds, indexed by fd. The generation in each epoll event's data rejects events for
 * an fd that was closed (and maybe reused) earlier in the same batch. */
struct watch {
	uint32_t gen, events;
	uint8_t kind;
	bool in_ep;
	struct conn *c;
	struct chan *ch;
	struct bg *bg;
};
static struct watch *watches;
static int nwatches;

int64_t mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void logmsg(const char *fmt, ...)
{
	char buf[600];
	int n = snprintf(buf, sizeof buf, "agentkernel-agent: ");
	va_list ap;
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof buf - n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	if (write(2, buf, n) < 0) {
		/* nowhere to report it */
	}
}

/* A set-up step failed. In a container the runtime has done the set-up and the agent lacks the
 * privileges to redo it (no CAP_SYS_ADMIN and such): that is expected and said once, not per step. */
void setup_failed(const char *what)
{
	static bool told;
	if (!container || (errno != EPERM && errno != EACCES && errno != EROFS)) {
		logmsg("%s: %s", what, strerror(errno));
		return;
	}
	if (!told)
		logmsg("%s: %s (in a container the runtime sets the system up; such failures are not reported "
		       "again)", what, strerror(errno));
	told = true;
}

static void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n);
	if (!p) {
		/* Everything is bounded, so this means the VM is out of memory: nothing sensible is left. */
		logmsg("out of memory, rebooting");
		reboot(RB_AUTOBOOT);
		_exit(1);
	}
	return p;
}

/* ---- epoll registrations ---- */

static void ep_ctl(int op, int fd, struct watch *w)
{
	struct epoll_event ev = { .events = w->events, .data.u64 = (uint64_t)w->gen << 32 | (uint32_t)fd };
	if (epoll_ctl(ep, op, fd, &ev))
		logmsg("epoll_ctl(%d, fd %d): %s", op, fd, strerror(errno));
}

/* events == 0 keeps fd out of the epoll set: a pipe's HUP or ERR would otherwise be reported
 * on every wait while we are not reading it. */
void watch_add(int fd, int kind, uint32_t events, struct conn *c, struct chan *ch)
{
	if (fd >= nwatches) {
		int n = nwatches ? nwatches : 64;
		while (n <= fd)
			n *= 2;
		watches = xrealloc(watches, n * sizeof *watches);
		memset(watches + nwatches, 0, (n - nwatches) * sizeof *watches);
		nwatches = n;
	}
	struct watch *w = &watches[fd];
	w->gen++;
	w->kind = kind;
	w->events = events;
	w->c = c;
	w->ch = ch;
	w->bg = NULL;
	w->in_ep = events != 0;
	if (w->in_ep)
		ep_ctl(EPOLL_CTL_ADD, fd, w);
}

void watch_bg(int fd, int kind, uint32_t events, struct bg *b)
{
	watch_add(fd, kind, events, NULL, NULL);
	watches[fd].bg = b;
}

void watch_set(int fd, uint32_t events)
{
	struct watch *w = &watches[fd];
	if (w->events == events)
		return;
	w->events = events;
	if (!events) {
		ep_ctl(EPOLL_CTL_DEL, fd, w);
		w->in_ep = false;
	} else {
		ep_ctl(w->in_ep ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, w);
		w->in_ep = true;
	}
}

void watch_close(int *fd)
{
	if (*fd < 0)
		return;
	struct watch *w = &watches[*fd];
	if (w->in_ep)
		ep_ctl(EPOLL_CTL_DEL, *fd, w);
	w->gen++;
	w->kind = W_NONE;
	w->events = 0;
	w->in_ep = false;
	close(*fd);
	*fd = -1;
}

/* ---- out-queue ---- */

static uint8_t *out_reserve(struct conn *c, size_t n)
{
	if (c->ocap - c->olen < n && c->ofrm > 0) {
		memmove(c->out, c->out + c->ofrm, c->olen - c->ofrm);
		c->olen -= c->ofrm;
		c->ohead -= c->ofrm;
		c->ofrm = 0;
	}
	if (c->ocap - c->olen < n) {
		size_t cap = c->ocap ? c->ocap : 65536;
		while (cap - c->olen < n)
			cap *= 2;
		c->out = xrealloc(c->out, cap);
		c->ocap = cap;
	}
	return c->out + c->olen;
}

static void put_header(uint8_t *h, uint32_t n, uint16_t ch, uint8_t type)
{
	put32(h, n);
	h[4] = ch >> 8;
	h[5] = ch;
	h[6] = type;
	h[7] = 0;
}

void send_frame(struct conn *c, uint16_t ch, uint8_t type, const void *p, size_t n)
{
	if (c->dead)
		return;
	uint8_t *h = out_reserve(c, HDR_LEN + n);
	put_header(h, n, ch, type);
	if (n)
		memcpy(h + HDR_LEN, p, n);
	c->olen += HDR_LEN + n;
}

void send_rec(struct conn *c, uint16_t ch, uint8_t type, const struct rb *b)
{
	send_frame(c, ch, type, b->b, b->n);
}

void send_error(struct conn *c, uint16_t ch, int err, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	struct rb b = { 0 };
	rb_bytes(&b, F_MESSAGE, msg, strlen(msg));
	if (err)
		rb_int(&b, F_ERRNO, err);
	send_rec(c, ch, T_ERROR, &b);
}

/* Data is read straight into the queue: reserve room for a frame, then commit what arrived. */
uint8_t *data_reserve(struct conn *c, size_t n)
{
	return out_reserve(c, HDR_LEN + n) + HDR_LEN;
}

void data_commit(struct conn *c, uint16_t ch, uint8_t type, size_t n)
{
	put_header(c->out + c->olen, n, ch, type);
	c->olen += HDR_LEN + n;
}

/* Producers ask this before each chunk; once over OUTQ_HIGH the connection stays throttled
 * until a flush brings it back under. */
bool out_full(struct conn *c)
{
	if (c->olen - c->ohead >= OUTQ_HIGH)
		c->throttled = true;
	return c->throttled;
}

/* Forget queued frames, but finish a frame already partly written so the stream stays framed. */
static void out_drop_unsent(struct conn *c)
{
	if (c->ofrm < c->ohead)
		c->olen = c->ofrm + HDR_LEN + get32(c->out + c->ofrm);
	else
		c->olen = c->ohead;
}

/* ---- channels ---- */

struct chan *chan_new(struct conn *c, uint16_t id, uint8_t op)
{
	struct chan *ch = xrealloc(NULL, sizeof *ch);
	memset(ch, 0, sizeof *ch);
	ch->c = c;
	ch->id = id;
	ch->op = op;
	ch->out_win = ch->in_win = INIT_WINDOW;
	ch->sfd = ch->ifd = ch->ofd = ch->efd = ch->fd = -1;
	c->ch[c->nch++] = ch;
	return ch;
}

void chan_free(struct chan *ch)
{
	struct conn *c = ch->c;
	if (ch->op == OP_EXEC)
		exec_release(ch);
	else if (ch->op == OP_ATTACH)
		bg_release(ch);
	else if (ch->op == OP_WATCH)
		watch_release(ch);
	else if (ch->op == OP_TCP)
		tcp_release(ch);
	else
		file_release(ch);
	for (int i = 0; i < c->nch; i++)
		if (c->ch[i] == ch) {
			c->ch[i] = c->ch[--c->nch];
			break;
		}
	free(ch->ib);
	free(ch);
}

static struct chan *chan_find(struct conn *c, uint16_t id)
{
	for (int i = 0; i < c->nch; i++)
		if (c->ch[i]->id == id)
			return c->ch[i];
	return NULL;
}

/* End a channel without a word to the host: the connection is going away or starting afresh. */
static void chan_abort(struct chan *ch)
{
	if (ch->op == OP_EXEC)
		exec_signal(ch, SIGKILL);
	chan_free(ch);
}

void ibuf_push(struct chan *ch, const uint8_t *p, size_t n)
{
	if (ch->ihead + ch->ilen + n > ch->icap) {
		memmove(ch->ib, ch->ib + ch->ihead, ch->ilen);
		ch->ihead = 0;
	}
	if (ch->ilen + n > ch->icap) {
		size_t cap = ch->icap ? ch->icap : 4096;
		while (cap < ch->ilen + n)
			cap *= 2;
		ch->ib = xrealloc(ch->ib, cap);
		ch->icap = cap;
	}
	memcpy(ch->ib + ch->ihead + ch->ilen, p, n);
	ch->ilen += n;
}

/* Return window to the host for bytes passed on. Batched while input is still queued. */
void grant(struct chan *ch, bool force)
{
	if (ch->ack <= 0 || !(force || ch->ilen == 0 || ch->ack >= INIT_WINDOW / 4))
		return;
	struct rb b = { 0 };
	rb_int(&b, F_BYTES, ch->ack);
	send_rec(ch->c, ch->id, T_WINDOW, &b);
	ch->in_win += ch->ack;
	ch->ack = 0;
}

/* ---- connections ---- */

static struct conn *conn_new(int fd, bool serial, const char *name)
{
	struct conn *c = xrealloc(NULL, sizeof *c);
	memset(c, 0, sizeof *c);
	c->fd = fd;
	c->serial = serial;
	c->can_read = c->can_write = true;
	snprintf(c->name, sizeof c->name, "%s", name);
	c->in = xrealloc(NULL, IN_CAP);
	c->next = conns;
	conns = c;
	watch_add(fd, W_CONN, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, c, NULL);
	return c;
}

static void session_end(struct conn *c)
{
	while (c->nch)
		chan_abort(c->ch[c->nch - 1]);
}

static void conn_close(struct conn *c)
{
	session_end(c);
	watch_close(&c->fd);
	c->dead = true;
	if (!c->serial)
		nstreams--;
}

/* The host side of a port went away: everything of the session goes, the port waits for HELLO.
 * Input already read is kept: the scan for HELLO skips what is stale. */
static void port_hangup(struct conn *c)
{
	c->host_up = false;
	session_end(c);
	c->ohead = c->olen = c->ofrm = 0;
	c->synced = false;
	c->can_write = false;
}

static void conn_broken(struct conn *c, const char *what, int err)
{
	if (what)
		logmsg("%s: %s: %s", c->name, what, strerror(err));
	if (c->serial && err != ENODEV)
		port_hangup(c);
	else
		conn_close(c);
}

static void conn_flush(struct conn *c)
{
	while (c->can_write && c->ohead < c->olen) {
		ssize_t n = write(c->fd, c->out + c->ohead, c->olen - c->ohead);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN) {
			c->can_write = false;
			break;
		}
		if (n < 0) {
			conn_broken(c, errno == EPIPE || errno == ECONNRESET ? NULL : "write", errno);
			return;
		}
		c->ohead += n;
		while (c->ofrm < c->olen) {
			size_t end = c->ofrm + HDR_LEN + get32(c->out + c->ofrm);
			if (end > c->ohead)
				break;
			c->ofrm = end;
		}
	}
	if (c->ohead == c->olen)
		c->ohead = c->olen = c->ofrm = 0;
	if (c->throttled && c->olen - c->ohead < OUTQ_HIGH) {
		c->throttled = false;
		for (int i = 0; i < c->nch; i++)
			if (c->ch[i]->op == OP_EXEC)
				exec_update(c->ch[i]);
			else if (c->ch[i]->op == OP_TCP)
				tcp_update(c->ch[i]);
	}
}

/* ---- frames ---- */

static bool hello_ok(const uint8_t *p, size_t n)
{
	return !rec_parse(&rec, p, n) && rec.has[F_VERSION] && rec.has[F_MAGIC] &&
	       rec.f[F_MAGIC].n == 8 && !memcmp(rec.f[F_MAGIC].p, "AGENTKRN", 8);
}

/* <linux/random.h> is not among musl's headers: the two ioctls, as the kernel defines them. */
#define RNDADDENTROPY 0x40085203   /* _IOW('R', 0x03, int[2]) */
#define RNDRESEEDCRNG 0x5207       /* _IO('R', 0x07) */
#define MAX_ENTROPY 512

/* Host randomness from HELLO, credited and used at once: a VM resumed from a snapshot would
 * otherwise draw the same random numbers as every other copy of that snapshot. */
static void reseed(const struct field *f)
{
	struct { int bits, size; uint8_t buf[MAX_ENTROPY]; } info;
	int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		setup_failed("open /dev/urandom");
		return;
	}
	info.size = f->n < MAX_ENTROPY ? (int)f->n : MAX_ENTROPY;
	info.bits = info.size * 8;
	memcpy(info.buf, f->p, (size_t)info.size);
	if (ioctl(fd, RNDADDENTROPY, &info) || ioctl(fd, RNDRESEEDCRNG))
		setup_failed("reseeding the random number generator");
	close(fd);
}

static const char *do_hello(struct conn *c, const uint8_t *p, size_t n)
{
	if (!hello_ok(p, n))
		return "malformed HELLO";
	session_end(c);
	out_drop_unsent(c);
	c->synced = true;
	if (rec.has[F_HOSTNAME] && sethostname((const char *)rec.f[F_HOSTNAME].p, rec.f[F_HOSTNAME].n))
		setup_failed("sethostname");
	int64_t t = rec_int(&rec, F_TIME_NS, 0);
	if (t > 0) {
		struct timespec ts = { t / 1000000000, t % 1000000000 };
		if (clock_settime(CLOCK_REALTIME, &ts))
			setup_failed("clock_settime");
	}
	if (rec.has[F_ENTROPY])
		reseed(&rec.f[F_ENTROPY]);
	limits_apply(&rec);
	/* Answer with the host's version where it is older: it then hears what it knows (protocol.md). */
	int64_t version = rec_int(&rec, F_VERSION, PROTO_VERSION);
	version = version < 1 ? 1 : version > PROTO_VERSION ? PROTO_VERSION : version;
	char desc[48];
	int dn = snprintf(desc, sizeof desc, "agentkernel-agent protocol %d", PROTO_VERSION);
	struct rb b = { 0 };
	rb_int(&b, F_VERSION, version);
	rb_bytes(&b, F_MAGIC, "AGENTKRN", 8);
	rb_bytes(&b, F_MESSAGE, desc, dn);
	send_rec(c, 0, T_HELLO, &b);
	return NULL;
}

static void do_shutdown(void)
{
	logmsg("shutting down");
	kill(-1, SIGKILL);
	/* Give the killed processes a moment to let go of their files so / can go read-only. */
	for (int i = 0; i < 50 && waitpid(-1, NULL, WNOHANG) >= 0; i++)
		usleep(10000);
	sync();
	if (container) {
		if (unix_lfd >= 0)
			unlink(getenv(LISTEN_ENV));
		_exit(0);  /* the container ends with its PID 1 */
	}
	mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL);  /* best effort: all was synced */
	/* Without a power-off driver the kernel turns RB_POWER_OFF into a halt that never returns, so
	 * only ask for it where ACPI can do it. Otherwise reboot: the host runs the VM so that a reboot
	 * ends it (QEMU: reboot=t and -no-reboot; Firecracker exits on reboot). */
	if (!access("/sys/firmware/acpi", F_OK))
		reboot(RB_POWER_OFF);
	reboot(RB_AUTOBOOT);
	logmsg("reboot: %s", strerror(errno));
}

static bool from_host(uint8_t type)
{
	switch (type) {
	case T_HELLO: case T_PING: case T_SHUTDOWN: case T_EXEC: case T_STDIN: case T_SIGNAL: case T_RESIZE:
	case T_WINDOW: case T_DATA: case T_GET: case T_PUT: case T_STAT: case T_LIST: case T_MKDIR: case T_REMOVE:
	case T_ARGS: case T_RENAME: case T_WATCH: case T_JOBS: case T_ATTACH: case T_INPUT: case T_KILL: case T_WAIT:
	case T_CONNECT:
		return true;
	}
	return false;
}

/* Handle one complete frame; returns why the connection is broken, or NULL. */
static const char *handle_frame(struct conn *c, uint16_t id, uint8_t type, const uint8_t *p, uint32_t n)
{
	if (!from_host(type))
		return "unknown frame type";
	bool control = type == T_HELLO || type == T_PING || type == T_SHUTDOWN;
	if (control != (id == 0))
		return control ? "control frame on an operation channel" : "operation frame on channel 0";
	if (!c->synced && type != T_HELLO)
		return "first frame is not HELLO";
	struct chan *ch = id ? chan_find(c, id) : NULL;

	switch (type) {
	case T_HELLO:
		return do_hello(c, p, n);
	case T_PING:
		if (n > MAX_PING)
			return "PING payload over 64 bytes";
		send_frame(c, 0, T_PONG, p, n);
		return NULL;
	case T_SHUTDOWN:
		do_shutdown();
		return NULL;
	case T_EXEC: case T_GET: case T_PUT: case T_STAT: case T_LIST: case T_MKDIR: case T_REMOVE:
	case T_RENAME: case T_WATCH: case T_JOBS: case T_ATTACH: case T_INPUT: case T_KILL: case T_WAIT:
	case T_CONNECT:
		if (rec_parse(&rec, p, n))
			return "malformed record";
		if (ch) {
			/* The host lost track of this channel: end it, so exactly one ending frame answers. */
			chan_abort(ch);
			send_error(c, id, EBUSY, "channel %u is already open", id);
		} else if (c->nch >= MAX_CHANS)
			send_error(c, id, EMFILE, "too many open channels");
		else if (type == T_EXEC)
			exec_start(c, id, &rec);
		else if (type == T_CONNECT)
			tcp_start(c, id, &rec);
		else if (type >= T_JOBS)
			bg_op(c, id, type, &rec);
		else
			file_op(c, id, type, &rec);
		return NULL;
	case T_STDIN:
	case T_DATA:
		/* Frames for a channel that already ended are expected (they crossed its end): drop them. */
		if (!ch || (type == T_STDIN ? ch->op != OP_EXEC : ch->op != OP_PUT && ch->op != OP_TCP))
			return NULL;
		if (n > ch->in_win)
			return "data beyond the window";
		if (type == T_STDIN)
			exec_stdin(ch, p, n);
		else if (ch->op == OP_TCP)
			tcp_data(ch, p, n);
		else
			file_data(ch, p, n);
		return NULL;
	default:  /* ARGS, WINDOW, SIGNAL, RESIZE */
		if (rec_parse(&rec, p, n))
			return "malformed record";
		if (!ch)
			return NULL;
		if (type == T_ARGS) {
			if (ch->op == OP_EXEC)
				exec_args(ch, &rec);
		} else if (type == T_WINDOW) {
			int64_t b = rec_int(&rec, F_BYTES, 0);
			if (b < 0 || b > (1LL << 40))
				return "bad WINDOW";
			ch->out_win += b;
			if (ch->out_win > (1LL << 40))
				ch->out_win = 1LL << 40;
			if (ch->op == OP_EXEC)
				exec_update(ch);
			else if (ch->op == OP_TCP)
				tcp_update(ch);
		} else if (ch->op != OP_EXEC) {
			/* nothing to signal or resize */
		} else if (type == T_SIGNAL) {
			int64_t sig = rec_int(&rec, F_SIGNAL, 0);
			if (sig > 0 && sig < NSIG)
				exec_host_signal(ch, sig);
		} else
			exec_resize(ch, rec_int(&rec, F_ROWS, 0), rec_int(&rec, F_COLS, 0));
		return NULL;
	}
}

/* On a port before HELLO: find a complete, well-formed HELLO frame at or after *off. If there is
 * none yet, advance *off past what can no longer start one and return false. */
static bool scan_hello(struct conn *c, size_t *off)
{
	size_t keep = c->inlen >= HDR_LEN - 1 ? c->inlen - (HDR_LEN - 1) : 0;
	for (size_t i = *off; i + HDR_LEN <= c->inlen; i++) {
		const uint8_t *h = c->in + i;
		if (h[4] || h[5] || h[6] != T_HELLO || h[7] || get32(h) > MAX_PAYLOAD)
			continue;
		if (c->inlen - i - HDR_LEN < get32(h)) {
			if (i < keep)
				keep = i;
			continue;
		}
		if (hello_ok(h + HDR_LEN, get32(h))) {
			*off = i;
			return true;
		}
	}
	if (keep > *off)
		*off = keep;
	return false;
}

static void conn_input(struct conn *c)
{
	size_t off = 0;
	while (!c->dead) {
		if (c->serial && !c->synced && !scan_hello(c, &off))
			break;
		size_t avail = c->inlen - off;
		if (avail < HDR_LEN)
			break;
		const uint8_t *h = c->in + off;
		uint32_t len = get32(h);
		const char *err = NULL;
		if (len > MAX_PAYLOAD)
			err = "frame over 256 KiB";
		else if (h[7])
			err = "non-zero flags";
		else if (avail - HDR_LEN < len)
			break;
		else
			err = handle_frame(c, get16(h + 4), h[6], h + HDR_LEN, len);
		if (!err) {
			off += HDR_LEN + len;
			continue;
		}
		logmsg("%s: protocol error: %s (type %u, channel %u)", c->name, err, h[6], get16(h + 4));
		if (!c->serial) {
			conn_close(c);
			return;
		}
		/* A port goes back to scanning for HELLO, from the next byte on. */
		session_end(c);
		out_drop_unsent(c);
		c->synced = false;
		off++;
	}
	if (c->dead)
		return;
	memmove(c->in, c->in + off, c->inlen - off);
	c->inlen -= off;
}

static void conn_read(struct conn *c)
{
	for (int turn = 0; turn < READS_PER_TURN && c->can_read && !c->dead && !out_full(c); turn++) {
		size_t room = IN_CAP - c->inlen;
		ssize_t n = read(c->fd, c->in + c->inlen, room < CHUNK ? room : CHUNK);
		if (n > 0) {
			c->inlen += n;
			conn_input(c);
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && errno == EAGAIN) {
			c->can_read = false;
		} else if (n == 0 && c->serial) {
			c->can_read = false;
			if (c->host_up)
				port_hangup(c);
		} else {
			conn_broken(c, n == 0 || errno == ECONNRESET ? NULL : "read", errno);
		}
	}
}

/* A port polls HUP (and reads end-of-file) while its host side is not connected. Only a change from
 * connected counts as a hangup: a new client's first bytes can arrive before the guest kernel learns
 * that it connected, and must not be taken for the end of the old one. */
static void conn_event(struct conn *c, uint32_t ev)
{
	if (c->serial && !(ev & EPOLLHUP))
		c->host_up = true;
	else if (c->serial && c->host_up)
		port_hangup(c);
	if (ev & EPOLLOUT)
		c->can_write = true;
	if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
		c->can_read = true;
}

/* ---- transports ---- */

static void open_ports(void)
{
	DIR *d = opendir(PORTS_DIR);
	if (!d)
		return;
	struct dirent *e;
	while ((e = readdir(d))) {
		char path[300], name[64] = "";
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof path, PORTS_DIR "/%s/name", e->d_name);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			continue;  /* the host has not named it yet: a uevent follows when it does */
		ssize_t n = read(fd, name, sizeof name - 1);
		close(fd);
		name[n > 0 ? n : 0] = 0;
		name[strcspn(name, "\n")] = 0;
		if (strncmp(name, PORT_PREFIX, strlen(PORT_PREFIX)))
			continue;
		struct conn *c;
		for (c = conns; c && (c->dead || strcmp(c->name, name)); c = c->next)
			;
		if (c)
			continue;
		snprintf(path, sizeof path, "/dev/%s", e->d_name);
		fd = open(path, O_RDWR | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
		if (fd < 0) {
			if (errno != ENOENT)
				logmsg("open %s: %s", path, strerror(errno));
			continue;
		}
		conn_new(fd, true, name);
	}
	closedir(d);
}

static void uevent_read(int fd)
{
	char buf[4096];
	bool ports = false;
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof buf, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == ENOBUFS) {
			ports = true;  /* the socket overflowed: the uevent we want may be among those lost */
			continue;
		}
		if (n <= 0)
			break;
		if (memmem(buf, n, "SUBSYSTEM=virtio-ports", 22))
			ports = true;
	}
	if (ports)
		open_ports();
}

static int uevent_open(void)
{
	int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT);
	struct sockaddr_nl sa = { .nl_family = AF_NETLINK, .nl_groups = 1 };
	if (fd >= 0 && bind(fd, (struct sockaddr *)&sa, sizeof sa)) {
		close(fd);
		fd = -1;
	}
	if (fd < 0)
		logmsg("uevent socket: %s (ports named late are not seen)", strerror(errno));
	return fd;
}

static int vsock_listen(void)
{
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	struct sockaddr_vm sa = { .svm_family = AF_VSOCK, .svm_port = VSOCK_PORT, .svm_cid = VMADDR_CID_ANY };
	if (bind(fd, (struct sockaddr *)&sa, sizeof sa) || listen(fd, 16)) {
		logmsg("vsock port %d: %s", VSOCK_PORT, strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

/* The guest's CID, or VMADDR_CID_ANY when there is no vsock device. */
static unsigned vsock_cid(void)
{
	unsigned cid = VMADDR_CID_ANY;
	int fd = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		if (ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid))
			cid = VMADDR_CID_ANY;
		close(fd);
	}
	return cid;
}

/* A container's transport: a Unix stream socket in a directory the host bind-mounted in. */
static int unix_listen(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	if (strlen(path) >= sizeof sa.sun_path) {
		logmsg("%s: socket path too long", path);
		return -1;
	}
	strcpy(sa.sun_path, path);
	if (!lstat(path, &st) && S_ISSOCK(st.st_mode))
		unlink(path);  /* left by an earlier run of this sandbox */
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) || listen(fd, 16)) {
		logmsg("listen on %s: %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

static void stream_accept(int lfd)
{
	const char *name = lfd == unix_lfd ? "unix" : "vsock";
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			if (errno != EAGAIN)
				logmsg("%s accept: %s", name, strerror(errno));
			return;
		}
		if (nstreams >= MAX_STREAM_CONNS) {
			logmsg("%s: over %d connections, refusing one", name, MAX_STREAM_CONNS);
			close(fd);
			continue;
		}
		nstreams++;
		conn_new(fd, false, name);
	}
}

/* ---- children ---- */

static struct chan *exec_by_pid(pid_t pid)
{
	for (struct conn *c = conns; c; c = c->next)
		for (int i = 0; i < c->nch; i++)
			if (c->ch[i]->op == OP_EXEC && c->ch[i]->pid == pid && !c->ch[i]->exited)
				return c->ch[i];
	return NULL;
}

static void reap(int sfd)
{
	struct signalfd_siginfo si;
	while (read(sfd, &si, sizeof si) > 0)
		;
	int status;
	pid_t pid;
	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		struct chan *ch = exec_by_pid(pid);
		if (ch)
			exec_reaped(ch, status);
		else
			bg_reaped(pid, status);  /* anything else is an orphan: just reaped */
	}
}

/* ---- system setup ---- */

bool is_mountpoint(const char *dir)
{
	char parent[64];
	struct stat a, b;
	snprintf(parent, sizeof parent, "%s/..", dir);
	return !stat(dir, &a) && !stat(parent, &b) && a.st_dev != b.st_dev;
}

static void mount_fs(const char *type, const char *dir, unsigned long flags, const char *opts)
{
	if (mkdir(dir, 0755) && errno != EEXIST)
		logmsg("mkdir %s: %s", dir, strerror(errno));
	if (is_mountpoint(dir))
		return;  /* e.g. /dev, mounted by the kernel (CONFIG_DEVTMPFS_MOUNT) */
	if (mount(type, dir, type, flags, opts) && errno != EBUSY) {
		char what[128];
		snprintf(what, sizeof what, "mount %s on %s", type, dir);
		setup_failed(what);
	}
}

/* Bring lo up with 127.0.0.1, unless it is up already (a container runtime does that). */
static void loopback_up(void)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr = { 0 };
	struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
	strcpy(ifr.ifr_name, "lo");
	if (s >= 0 && !ioctl(s, SIOCGIFFLAGS, &ifr) && (ifr.ifr_flags & IFF_UP)) {
		close(s);
		return;
	}
	sin->sin_family = AF_INET;
	sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	bool ok = s >= 0 && !ioctl(s, SIOCSIFADDR, &ifr);
	sin->sin_addr.s_addr = htonl(0xff000000);
	ok = ok && !ioctl(s, SIOCSIFNETMASK, &ifr) && !ioctl(s, SIOCGIFFLAGS, &ifr);
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	if (!ok || ioctl(s, SIOCSIFFLAGS, &ifr))
		setup_failed("loopback");
	if (s >= 0)
		close(s);
}

static void setup_system(void)
{
	mount_fs("proc", "/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_fs("sysfs", "/sys", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_fs("devtmpfs", "/dev", MS_NOSUID, "mode=0755");
	mount_fs("devpts", "/dev/pts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666");
	mount_fs("tmpfs", "/dev/shm", MS_NOSUID | MS_NODEV, "mode=1777");
	mount_fs("tmpfs", "/tmp", MS_NOSUID | MS_NODEV, "mode=1777");
	mount_fs("tmpfs", "/run", MS_NOSUID | MS_NODEV, "mode=0755");

	/* devtmpfs has /dev/ptmx, which finds the devpts instance at /dev/pts; without it, use that one's. */
	static const char *const links[][2] = {
		{ "/dev/ptmx", "pts/ptmx" }, { "/dev/fd", "/proc/self/fd" }, { "/dev/stdin", "/proc/self/fd/0" },
		{ "/dev/stdout", "/proc/self/fd/1" }, { "/dev/stderr", "/proc/self/fd/2" },
	};
	struct stat st;
	for (size_t i = 0; i < sizeof links / sizeof *links; i++)
		if (lstat(links[i][0], &st) && symlink(links[i][1], links[i][0]))
			logmsg("symlink %s: %s", links[i][0], strerror(errno));

	/* The kernel opens /dev/console as fds 0-2 only if it existed; keep them taken either way. */
	for (int fd = 0; fd < 3; fd++)
		if (fcntl(fd, F_GETFD) < 0) {
			int n = open("/dev/console", O_RDWR | O_NOCTTY);
			if (n < 0)
				n = open("/dev/null", O_RDWR);
			if (n >= 0 && n != fd) {
				dup2(n, fd);
				close(n);
			}
		}

	if (!container && sethostname("sandbox", 7))  /* a container's hostname is the runtime's */
		setup_failed("sethostname");
	loopback_up();

	/* The agent holds several fds per channel; processes get the kernel's usual limits back. */
	getrlimit(RLIMIT_NOFILE, &child_nofile);
	struct rlimit big = { 65536, 65536 }, hard = { child_nofile.rlim_max, child_nofile.rlim_max };
	if (setrlimit(RLIMIT_NOFILE, &big) && setrlimit(RLIMIT_NOFILE, &hard))  /* in a container: its hard limit */
		setup_failed("RLIMIT_NOFILE");
	umask(022);
}

/* ---- main loop ---- */

static int next_timeout(void)
{
	int64_t next = INT64_MAX;
	for (struct conn *c = conns; c; c = c->next)
		for (int i = 0; i < c->nch; i++)
			if (c->ch[i]->op == OP_EXEC) {
				int64_t t = exec_next_timer(c->ch[i]);
				if (t < next)
					next = t;
			}
	if (limits_next_timer() < next)
		next = limits_next_timer();
	if (bg_next_timer() < next)
		next = bg_next_timer();
	if (next == INT64_MAX)
		return -1;
	return next <= now ? 0 : next - now > 60000 ? 60000 : (int)(next - now);
}

/* Move data for every connection; true if some work is left that no fd event will announce. */
static bool service(void)
{
	bool more = false;
	for (struct conn *c = conns; c; c = c->next) {
		if (c->dead)
			continue;
		for (int i = c->nch - 1; i >= 0; i--)
			if (c->ch[i]->op == OP_EXEC)
				exec_timers(c->ch[i]);
		conn_flush(c);
		conn_read(c);
		bool want = false;
		for (int i = c->nch - 1; i >= 0 && !c->dead; i--)
			if (c->ch[i]->op == OP_GET || c->ch[i]->op == OP_LIST)
				want |= file_produce(c->ch[i]);
			else if (c->ch[i]->op == OP_ATTACH)
				want |= bg_produce(c->ch[i]);
			else if (c->ch[i]->op == OP_WATCH)
				want |= watch_produce(c->ch[i]);
		if (c->dead)
			continue;
		conn_flush(c);
		if (!c->dead && !out_full(c) && (want || c->can_read))
			more = true;
	}
	return more;
}

/* VM: vsock and the virtio-serial ports (also those named later, announced by uevents). */
static void open_vm_transports(void)
{
	int ufd = uevent_open();
	if (ufd >= 0)
		watch_add(ufd, W_UEVENT, EPOLLIN, NULL, NULL);
	int lfd = vsock_listen();
	if (lfd >= 0)
		watch_add(lfd, W_LISTEN, EPOLLIN, NULL, NULL);
	open_ports();

	char ready[256];
	int n = 0;
	unsigned cid = vsock_cid();
	if (lfd >= 0 && cid != VMADDR_CID_ANY && cid > 2)  /* 1 and 2 are local and host: no device */
		n += snprintf(ready + n, sizeof ready - n, " vsock:%d(cid %u)", VSOCK_PORT, cid);
	else if (lfd >= 0)
		n += snprintf(ready + n, sizeof ready - n, " vsock:%d(no device)", VSOCK_PORT);
	for (struct conn *c = conns; c && n < (int)sizeof ready - 64; c = c->next)
		n += snprintf(ready + n, sizeof ready - n, " %s", c->name);
	logmsg("ready:%s", n ? ready : " no transport yet");
}

int main(void)
{
	const char *listen_path = getenv(LISTEN_ENV);
	container = listen_path && *listen_path;
	if (getpid() != 1) {
		/* SHUTDOWN kills every process it can see: only safe as the init of its own pid namespace. */
		logmsg("must run as PID 1 (the init of a sandbox VM or container)");
		return 1;
	}
	setup_system();

	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	sigprocmask(SIG_BLOCK, &set, NULL);
	signal(SIGPIPE, SIG_IGN);
	ep = epoll_create1(EPOLL_CLOEXEC);
	int sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	if (ep < 0 || sfd < 0) {
		logmsg("epoll/signalfd: %s", strerror(errno));
		do_shutdown();
		for (;;)
			pause();
	}
	watch_add(sfd, W_SIGNAL, EPOLLIN, NULL, NULL);
	limits_init();  /* after the epoll set: it watches the sandbox's memory events */
	if (!container) {
		open_vm_transports();
	} else if ((unix_lfd = unix_listen(listen_path)) >= 0) {
		watch_add(unix_lfd, W_LISTEN, EPOLLIN, NULL, NULL);
		logmsg("ready: unix:%s", listen_path);
	} else {
		return 1;  /* nothing to serve: the container ends, and the host sees why in its log */
	}

	bool more = false;
	for (;;) {
		now = mono_ms();
		struct epoll_event evs[64];
		int nev = epoll_wait(ep, evs, 64, more ? 0 : next_timeout());
		now = mono_ms();
		for (int i = 0; i < nev; i++) {
			int fd = (int)(uint32_t)evs[i].data.u64;
			struct watch *w = &watches[fd];
			if (w->gen != evs[i].data.u64 >> 32)
				continue;  /* closed earlier in this batch */
			switch (w->kind) {
			case W_SIGNAL: reap(fd); break;
			case W_LISTEN: stream_accept(fd); break;
			case W_UEVENT: uevent_read(fd); break;
			case W_LIMITS: limits_event(fd); break;
			case W_CONN: conn_event(w->c, evs[i].events); break;
			case W_NONE: case W_INOTIFY: break;  /* service() reads inotify for its channel */
			case W_BG_STATUS: case W_BG_IN: case W_BG_OUT: bg_event(w->bg, w->kind); break;
			case W_TCP: tcp_event(w->ch, evs[i].events); break;
			default: exec_event(w->ch, w->kind, evs[i].events); break;
			}
		}
		limits_timers();
		bg_timers();
		more = service();
		for (struct conn **pc = &conns; *pc;) {
			struct conn *c = *pc;
			if (c->dead) {
				*pc = c->next;
				free(c->in);
				free(c->out);
				free(c);
			} else
				pc = &c->next;
		}
	}
}
