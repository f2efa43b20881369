/* Background commands (protocol.md, Background commands): an EXEC with `detach` starts a process that
 * belongs to the agent, not to the connection. Its stdout and stderr go to one pipe that the agent
 * always reads, into a ring of the last BG_RING bytes, so a command never waits for a reader. ATTACH
 * streams the ring from an offset under the channel's window, WAIT answers when the command has
 * ended, INPUT queues stdin, KILL signals, JOBS lists. At most MAX_BG are kept: the oldest that ended
 * makes room for a new one. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define ARGV_KEPT 512  /* bytes of argv fields kept for JOBS */
#define READ_BUDGET (4 * CHUNK)

enum bg_state { BG_STARTING = 1, BG_RUNNING, BG_EXITED };

struct bg {
	uint32_t id;
	pid_t pid;
	unsigned group;
	int sfd, ifd, ofd;
	uint8_t state;
	bool reaped, timed_out, in_eof;
	int wstatus;
	int64_t started_ns, deadline, last_out;
	uint8_t *ring;       /* output at offset o is ring[o % cap], for total - cap <= o < total */
	size_t cap;
	uint64_t total;
	uint8_t *ib;         /* stdin not yet written */
	size_t ilen;
	uint8_t argv[ARGV_KEPT + 6];  /* argv fields of its JOBS entry, the last one maybe cut */
	size_t argvn;
	struct chan *starter;  /* the EXEC channel, until the start is answered */
	int readers;           /* ATTACH and WAIT channels following it */
};

static struct bg *bgs[MAX_BG];  /* oldest first */
static int nbg;
static uint32_t next_id = 1;

static struct bg *bg_find(int64_t id)
{
	for (int i = 0; i < nbg; i++)
		if (bgs[i]->id == id)
			return bgs[i];
	return NULL;
}

static void bg_free(struct bg *b)
{
	for (int i = 0; i < nbg; i++)
		if (bgs[i] == b) {
			memmove(bgs + i, bgs + i + 1, (nbg - i - 1) * sizeof *bgs);
			nbg--;
			break;
		}
	watch_close(&b->sfd);
	watch_close(&b->ifd);
	watch_close(&b->ofd);
	limits_release(b->group);
	free(b->ring);
	free(b->ib);
	free(b);
}

/* Room for one more: drop the oldest command that ended and that nobody follows. */
static bool make_room(void)
{
	if (nbg < MAX_BG)
		return true;
	for (int i = 0; i < nbg; i++)
		if (bgs[i]->state == BG_EXITED && !bgs[i]->readers) {
			bg_free(bgs[i]);
			return true;
		}
	return false;
}

static void keep_argv(struct bg *b, const struct xreq *x)
{
	for (int i = 0; i < x->argc && b->argvn + 6 < ARGV_KEPT; i++) {
		size_t n = strlen(x->s.argv[i]), room = ARGV_KEPT - b->argvn - 6;
		if (n > room)
			n = room;
		uint8_t *p = b->argv + b->argvn;
		p[0] = F_ARGV >> 8;
		p[1] = F_ARGV & 0xff;
		put32(p + 2, n);
		memcpy(p + 6, x->s.argv[i], n);
		b->argvn += 6 + n;
	}
}

void bg_launch(struct chan *ch, struct xreq *x)
{
	int fds[4];
	if (!make_room()) {
		send_error(ch->c, ch->id, EAGAIN, "too many background commands: %d kept, none of them ended", MAX_BG);
		chan_free(ch);
		return;
	}
	struct bg *b = calloc(1, sizeof *b);
	if (!b || spawn(x, true, &b->pid, fds, &b->group)) {
		int err = b ? errno : ENOMEM;
		free(b);
		send_error(ch->c, ch->id, err, "cannot start process: %s", strerror(err));
		chan_free(ch);
		return;
	}
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	b->id = next_id++;
	b->state = BG_STARTING;
	b->started_ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
	b->deadline = x->timeout ? now + x->timeout : 0;
	b->sfd = fds[0];
	b->ifd = fds[1];
	b->ofd = fds[2];
	keep_argv(b, x);
	fcntl(b->ifd, F_SETFL, fcntl(b->ifd, F_GETFL) | O_NONBLOCK);
	fcntl(b->ofd, F_SETFL, fcntl(b->ofd, F_GETFL) | O_NONBLOCK);
	watch_bg(b->sfd, W_BG_STATUS, EPOLLIN, b);
	watch_bg(b->ifd, W_BG_IN, 0, b);
	watch_bg(b->ofd, W_BG_OUT, EPOLLIN, b);
	b->starter = ch;
	ch->bg = b;
	bgs[nbg++] = b;
}

/* The EXEC channel is gone (answered, or its connection closed): the command runs on regardless. */
void bg_release(struct chan *ch)
{
	struct bg *b = ch->bg;
	ch->bg = NULL;
	if (ch->op == OP_EXEC) {
		b->starter = NULL;
		if (b->state == BG_STARTING && b->sfd < 0)
			bg_free(b);  /* failed to start, its ERROR sent */
	} else {
		b->readers--;
	}
}

static void bg_start_result(struct bg *b)
{
	int stage, err, r = read_status(b->sfd, &stage, &err);
	if (r < 0)
		return;
	watch_close(&b->sfd);
	struct chan *ch = b->starter;
	if (!r) {
		if (ch) {
			send_start_error(ch, stage, err);
			chan_free(ch);  /* frees b too */
		} else {
			bg_free(b);
		}
		return;
	}
	b->state = BG_RUNNING;
	b->last_out = now;
	if (ch) {
		struct rb rb = { 0 };
		rb_int(&rb, F_CMD, b->id);
		rb_int(&rb, F_PID, b->pid);
		send_rec(ch->c, ch->id, T_OK, &rb);
		chan_free(ch);
	}
}

static void pump_stdin(struct bg *b)
{
	while (b->ilen && b->ifd >= 0) {
		ssize_t n = write(b->ifd, b->ib, b->ilen);
		if (n > 0) {
			memmove(b->ib, b->ib + n, b->ilen - n);
			b->ilen -= n;
		} else if (n < 0 && errno == EAGAIN) {
			break;
		} else if (!(n < 0 && errno == EINTR)) {
			b->ilen = 0;  /* EPIPE: nobody reads it any more */
			watch_close(&b->ifd);
		}
	}
	if (!b->ilen && b->in_eof)
		watch_close(&b->ifd);
	if (b->ifd >= 0)
		watch_set(b->ifd, b->ilen ? EPOLLOUT : 0);
}

static void read_output(struct bg *b)
{
	for (size_t got = 0; b->ofd >= 0 && got < READ_BUDGET;) {
		if (b->total == b->cap && b->cap < BG_RING) {  /* not wrapped yet: grow in place */
			size_t cap = b->cap ? 2 * b->cap : 16384;
			uint8_t *p = realloc(b->ring, cap);
			if (!p)
				return;  /* try again on the next event */
			b->ring = p;
			b->cap = cap;
		}
		size_t at = b->total % b->cap, want = b->cap - at;
		ssize_t n = read(b->ofd, b->ring + at, want < CHUNK ? want : CHUNK);
		if (n > 0) {
			b->total += n;
			got += n;
			b->last_out = now;
		} else if (n < 0 && (errno == EINTR)) {
			continue;
		} else if (n < 0 && errno == EAGAIN) {
			return;
		} else {
			watch_close(&b->ofd);
		}
	}
}

/* Ended: the process was reaped and its output reached end of file, or was quiet for EXIT_QUIET_MS
 * (what it left in the background may hold the pipe, as for EXEC). */
static void check_ended(struct bg *b)
{
	if (b->state != BG_RUNNING || !b->reaped)
		return;
	if (b->ofd >= 0 && now < b->last_out + EXIT_QUIET_MS)
		return;
	read_output(b);
	b->state = BG_EXITED;
	b->ilen = 0;
	watch_close(&b->ofd);
	watch_close(&b->ifd);
}

void bg_event(struct bg *b, int kind)
{
	if (kind == W_BG_STATUS)
		bg_start_result(b);  /* may free b */
	else if (kind == W_BG_IN)
		pump_stdin(b);
	else
		read_output(b);
}

bool bg_reaped(pid_t pid, int status)
{
	for (int i = 0; i < nbg; i++)
		if (bgs[i]->pid == pid && !bgs[i]->reaped) {
			bgs[i]->reaped = true;
			bgs[i]->wstatus = status;
			if (bgs[i]->last_out < now)
				bgs[i]->last_out = now;
			return true;
		}
	return false;
}

void bg_timers(void)
{
	for (int i = 0; i < nbg; i++) {
		struct bg *b = bgs[i];
		if (b->deadline && now >= b->deadline) {
			b->deadline = 0;
			b->timed_out = !b->reaped;
			kill(-b->pid, SIGKILL);
			kill(b->pid, SIGKILL);
			limits_kill(b->group);
		}
		check_ended(b);
	}
}

int64_t bg_next_timer(void)
{
	int64_t t = INT64_MAX;
	for (int i = 0; i < nbg; i++) {
		struct bg *b = bgs[i];
		if (b->deadline && b->deadline < t)
			t = b->deadline;
		if (b->state == BG_RUNNING && b->reaped && b->last_out + EXIT_QUIET_MS < t)
			t = b->last_out + EXIT_QUIET_MS;
	}
	return t;
}

static void put_exit(struct rb *rb, const struct bg *b)
{
	if (WIFSIGNALED(b->wstatus))
		rb_int(rb, F_SIGNAL, WTERMSIG(b->wstatus));
	else
		rb_int(rb, F_EXIT_CODE, WEXITSTATUS(b->wstatus));
	rb_int(rb, F_TIMED_OUT, b->timed_out);
}

static uint64_t ring_start(const struct bg *b)
{
	return b->total > b->cap ? b->total - b->cap : 0;
}

static void jobs(struct conn *c, uint16_t id)
{
	for (int i = 0; i < nbg; i++) {
		struct bg *b = bgs[i];
		if (b->state == BG_STARTING)
			continue;
		struct rb rb = { 0 };
		rb_int(&rb, F_CMD, b->id);
		rb_int(&rb, F_PID, b->pid);
		rb_int(&rb, F_STATE, b->state);
		rb_int(&rb, F_STARTED_NS, b->started_ns);
		rb_int(&rb, F_OFFSET, b->total);
		rb_int(&rb, F_LOST, ring_start(b));
		if (b->state == BG_EXITED)
			put_exit(&rb, b);
		memcpy(rb.b + rb.n, b->argv, b->argvn);
		rb.n += b->argvn;
		send_rec(c, id, T_ENTRY, &rb);
	}
	struct rb rb = { 0 };
	send_rec(c, id, T_OK, &rb);
}

static void input(struct conn *c, uint16_t id, struct bg *b, const struct rec *r)
{
	const struct field *d = &r->f[F_DATA];
	size_t n = r->has[F_DATA] ? d->n : 0;
	if (b->in_eof || b->ifd < 0) {
		send_error(c, id, EPIPE, "background command %u: its stdin is closed", b->id);
		return;
	}
	if (n > BG_STDIN_MAX - b->ilen) {
		send_error(c, id, EAGAIN, "background command %u: %zu bytes of its stdin are not read yet",
			   b->id, b->ilen);
		return;
	}
	if (n) {
		uint8_t *p = realloc(b->ib, b->ilen + n);
		if (!p) {
			send_error(c, id, ENOMEM, "background command %u: %s", b->id, strerror(ENOMEM));
			return;
		}
		memcpy(p + b->ilen, d->p, n);
		b->ib = p;
		b->ilen += n;
	}
	b->in_eof = rec_int(r, F_EOF, 0) == 1;
	pump_stdin(b);
	struct rb rb = { 0 };
	rb_int(&rb, F_SIZE, n);
	send_rec(c, id, T_OK, &rb);
}

static void signal_cmd(struct conn *c, uint16_t id, struct bg *b, int64_t sig)
{
	if (sig <= 0 || sig >= NSIG) {
		send_error(c, id, EINVAL, "bad KILL: no signal %lld", (long long)sig);
		return;
	}
	if (b->reaped) {
		send_error(c, id, ECHILD, "background command %u has exited", b->id);
		return;
	}
	kill(b->pid, sig);
	kill(-b->pid, sig);
	if (sig == SIGKILL)
		limits_kill(b->group);
	struct rb rb = { 0 };
	send_rec(c, id, T_OK, &rb);
}

void bg_op(struct conn *c, uint16_t id, uint8_t type, const struct rec *r)
{
	if (type == T_JOBS) {
		jobs(c, id);
		return;
	}
	int64_t cmd = rec_int(r, F_CMD, 0);
	struct bg *b = bg_find(cmd);
	if (!b || b->state == BG_STARTING) {
		send_error(c, id, ESRCH, "no background command %lld", (long long)cmd);
		return;
	}
	if (type == T_INPUT) {
		input(c, id, b, r);
		return;
	}
	if (type == T_KILL) {
		signal_cmd(c, id, b, rec_int(r, F_SIGNAL, 0));
		return;
	}
	struct chan *ch = chan_new(c, id, OP_ATTACH);
	ch->bg = b;
	b->readers++;
	ch->quiet = type == T_WAIT;
	ch->follow = ch->quiet || rec_int(r, F_FOLLOW, 1) == 1;
	if (ch->quiet)
		return;
	int64_t from = rec_int(r, F_OFFSET, 0);
	ch->pos = from < 0 ? 0 : (uint64_t)from > b->total ? b->total : (uint64_t)from;
	if (ch->pos < ring_start(b))
		ch->pos = ring_start(b);
	struct rb rb = { 0 };
	rb_int(&rb, F_PID, b->pid);
	rb_int(&rb, F_OFFSET, ch->pos);
	send_rec(c, id, T_STARTED, &rb);
}

/* Send what an ATTACH can now; end it (EXIT once the command ended and all was sent; OK with the
 * offset reached when it does not follow, or fell behind the ring). True if only the out-queue
 * stopped it. */
bool bg_produce(struct chan *ch)
{
	struct conn *c = ch->c;
	struct bg *b = ch->bg;
	struct rb rb = { 0 };
	while (!ch->quiet && ch->pos < b->total) {
		if (ch->pos < ring_start(b)) {  /* overwritten before it was sent: the host attaches again */
			rb_int(&rb, F_OFFSET, ch->pos);
			rb_int(&rb, F_LOST, ring_start(b));
			send_rec(c, ch->id, T_OK, &rb);
			chan_free(ch);
			return false;
		}
		if (ch->out_win <= 0)
			return false;
		if (out_full(c))
			return true;
		size_t at = ch->pos % b->cap, n = b->total - ch->pos;
		if (n > b->cap - at)
			n = b->cap - at;
		if (n > CHUNK)
			n = CHUNK;
		if ((int64_t)n > ch->out_win)
			n = ch->out_win;
		send_frame(c, ch->id, T_STDOUT, b->ring + at, n);
		ch->out_win -= n;
		ch->pos += n;
	}
	if (b->state == BG_EXITED) {
		put_exit(&rb, b);
		send_rec(c, ch->id, T_EXIT, &rb);
		chan_free(ch);
	} else if (!ch->follow) {
		rb_int(&rb, F_OFFSET, ch->pos);
		send_rec(c, ch->id, T_OK, &rb);
		chan_free(ch);
	}
	return false;
}
