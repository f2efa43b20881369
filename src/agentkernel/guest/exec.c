/* EXEC channels: a process in its own session and process group, its stdio streamed under
 * the channel's windows, and EXIT once it is gone (protocol.md, Exec and Flow control). */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

#define DEFAULT_PATH "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

extern char **environ;

/* What the child was doing when it failed, reported through the status pipe with errno. */
enum stage { S_LIMITS, S_SETSID, S_TTY, S_STDIO, S_GROUPS, S_GID, S_UID, S_CHDIR, S_EXEC };
static const char *const stage_name[] = { "resource limits", "setsid", "controlling tty", "stdio",
					  "setgroups", "setgid", "setuid", "chdir", "exec" };

static void child_fail(int sfd, int stage)
{
	int msg[2] = { stage, errno };
	if (write(sfd, msg, sizeof msg) < 0) {
		/* the parent will see EOF and then exit status 127 */
	}
	_exit(127);
}

static void child(const struct spawn *s)
{
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL);
	if (limits_join(s->cg))
		child_fail(s->sfd, S_LIMITS);
	if (setsid() < 0)
		child_fail(s->sfd, S_SETSID);
	if (s->pty && ioctl(s->in, TIOCSCTTY, 0))
		child_fail(s->sfd, S_TTY);
	/* The originals are close-on-exec; the dup2 copies are not. */
	if (dup2(s->in, 0) < 0 || dup2(s->out, 1) < 0 || dup2(s->err, 2) < 0)
		child_fail(s->sfd, S_STDIO);
	setrlimit(RLIMIT_NOFILE, &child_nofile);
	if (setgroups(1, &s->gid))
		child_fail(s->sfd, S_GROUPS);
	if (setgid(s->gid))
		child_fail(s->sfd, S_GID);
	if (setuid(s->uid))
		child_fail(s->sfd, S_UID);
	if (chdir(s->cwd))
		child_fail(s->sfd, S_CHDIR);
	environ = s->envp;  /* execvp searches this environment's PATH */
	execvp(s->argv[0], s->argv);
	child_fail(s->sfd, S_EXEC);
}

static void free_strv(char **v)
{
	for (char **p = v; p && *p; p++)
		free(*p);
	free(v);
}

static void nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

void xreq_free(struct xreq *x)
{
	free_strv(x->s.argv);
	free_strv(x->s.envp);
	free(x->s.cwd);
	free(x);
}

/* Append fields to a NULL-terminated array, keeping room for one more entry and the NULL. */
static int strv_add(char ***v, int *n, int *cap, const struct field *f, int nf)
{
	if (*n + nf + 2 > *cap) {
		int want = *cap ? *cap : 16;
		while (*n + nf + 2 > want)
			want *= 2;
		char **grown = realloc(*v, want * sizeof *grown);
		if (!grown)
			return ENOMEM;
		*v = grown;
		*cap = want;
		grown[*n] = NULL;
	}
	for (int i = 0; i < nf; i++) {
		if (!((*v)[*n] = field_str(&f[i])))
			return memchr(f[i].p, 0, f[i].n) ? EINVAL : ENOMEM;
		(*v)[++*n] = NULL;
	}
	return 0;
}

/* Add a record's argv and env to the request; 0, or the errno that ends it. */
static int xreq_add(struct xreq *x, const struct rec *r)
{
	for (int i = 0; i < r->nargv + r->nenv; i++) {
		const struct field *f = i < r->nargv ? &r->argv[i] : &r->env[i - r->nargv];
		if (f->n >= EXEC_ARG_STRLEN)
			return E2BIG;
		x->size += f->n + 1 + sizeof(char *);
	}
	if (x->size > EXEC_ARG_MAX)
		return E2BIG;
	int err = strv_add(&x->s.argv, &x->argc, &x->argcap, r->argv, r->nargv);
	return err ? err : strv_add(&x->s.envp, &x->envc, &x->envcap, r->env, r->nenv);
}

/* Start the process of a request: fds gets the status pipe, then the process's stdin, stdout and
 * stderr (a PTY master is all three; with `merge` stderr goes to the stdout pipe and fds[3] is -1),
 * each close-on-exec. 0, or -1 with errno. */
int spawn(struct xreq *x, bool merge, pid_t *pid, int fds[4], unsigned *group)
{
	struct spawn *s = &x->s;
	int sp[2] = { -1, -1 }, ip[2] = { -1, -1 }, op[2] = { -1, -1 }, ep[2] = { -1, -1 };
	int master = -1, rc = -1;

	int i;
	for (i = 0; i < x->envc && strncmp(s->envp[i], "PATH=", 5); i++)
		;
	if (i == x->envc) {  /* strv_add kept room for it */
		s->envp[x->envc++] = strdup(DEFAULT_PATH);
		s->envp[x->envc] = NULL;
		if (!s->envp[x->envc - 1])
			goto out;
	}
	if (pipe2(sp, O_CLOEXEC))
		goto out;
	s->sfd = sp[1];
	if (s->pty) {
		char name[64];
		struct winsize ws = { .ws_row = x->rows, .ws_col = x->cols };
		if ((master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0 || unlockpt(master) ||
		    ptsname_r(master, name, sizeof name) || ioctl(master, TIOCSWINSZ, &ws) ||
		    (s->in = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0)
			goto out;
		s->out = s->err = s->in;
	} else {
		if (pipe2(ip, O_CLOEXEC) || pipe2(op, O_CLOEXEC) || (!merge && pipe2(ep, O_CLOEXEC)))
			goto out;
		s->in = ip[0];
		s->out = op[1];
		s->err = merge ? op[1] : ep[1];
	}
	s->cg = limits_group(group);
	if ((*pid = fork()) < 0)
		goto out;
	if (*pid == 0)
		child(s);
	fds[0] = sp[0];
	sp[0] = -1;
	if (s->pty) {
		fds[1] = fds[2] = master;
		fds[3] = -1;
		master = -1;
	} else {
		fds[1] = ip[1];
		fds[2] = op[0];
		fds[3] = ep[0];
		ip[1] = op[0] = ep[0] = -1;
	}
	rc = 0;
out:;
	/* What is left open here are the child's ends and anything of a failed start. */
	int err = errno;
	if (s->pty && s->in >= 0)
		close(s->in);
	if (s->cg >= 0)
		close(s->cg);
	s->in = s->cg = -1;
	int left[] = { sp[0], sp[1], ip[0], ip[1], op[0], op[1], ep[0], ep[1], master };
	for (size_t k = 0; k < sizeof left / sizeof *left; k++)
		if (left[k] >= 0)
			close(left[k]);
	errno = err;
	return rc;
}

static char *clip(const char *s)
{
	return strndup(s ? s : "", 200);  /* enough to name it in a message */
}

/* Start the process of a complete request on its channel; on failure ERROR ends the channel. */
static void launch(struct chan *ch, struct xreq *x)
{
	int fds[4];
	if (!x->argc) {
		send_error(ch->c, ch->id, EINVAL, "bad EXEC: no argv");
		chan_free(ch);
		return;
	}
	ch->prog = clip(x->s.argv[0]);
	ch->cwd = clip(x->s.cwd);
	if (x->detach) {
		bg_launch(ch, x);
		return;
	}
	if (spawn(x, false, &ch->pid, fds, &ch->group)) {
		send_error(ch->c, ch->id, errno, "cannot start process: %s", strerror(errno));
		chan_free(ch);
		return;
	}
	ch->pty = x->s.pty;
	ch->deadline = x->timeout ? now + x->timeout : 0;
	ch->sfd = fds[0];
	watch_add(ch->sfd, W_STATUS, EPOLLIN, ch->c, ch);
	ch->ifd = fds[1];
	ch->ofd = fds[2];
	nonblock(ch->ofd);
	if (ch->pty) {
		watch_add(ch->ofd, W_PTY, 0, ch->c, ch);
		return;
	}
	ch->efd = fds[3];
	nonblock(ch->ifd);
	nonblock(ch->efd);
	watch_add(ch->ifd, W_STDIN, 0, ch->c, ch);
	watch_add(ch->ofd, W_STDOUT, 0, ch->c, ch);
	watch_add(ch->efd, W_STDERR, 0, ch->c, ch);
}

/* The message of a start that failed at `stage` with `err`, naming the program or the directory;
 * `code` gets the exit status a shell would give (or -1), `cause` "command" or "cwd" (or NULL). */
static const char *start_failure(const struct chan *ch, int stage, int err, int *code, const char **cause)
{
	static char msg[512];
	const char *prog = ch->prog ? ch->prog : "", *cwd = ch->cwd ? ch->cwd : "";
	*code = -1;
	*cause = NULL;
	if (stage == S_EXEC && err == ENOENT && prog[0] == '/' && !access(prog, F_OK)) {
		*code = 127;
		*cause = "command";
		snprintf(msg, sizeof msg, "exec: %s: its interpreter or loader is missing", prog);
	} else if (stage == S_EXEC && err == ENOENT) {
		*code = 127;
		*cause = "command";
		snprintf(msg, sizeof msg, "exec: %s: %s", prog, strchr(prog, '/') ? "no such file" : "command not found");
	} else if (stage == S_EXEC && (err == EACCES || err == ENOEXEC || err == EISDIR || err == ENOTDIR)) {
		*code = 126;
		*cause = "command";
		snprintf(msg, sizeof msg, "exec: %s: %s", prog, err == ENOEXEC ? "not an executable format" :
			 err == EISDIR ? "is a directory" : strerror(err));
	} else if (stage == S_CHDIR) {
		*cause = "cwd";
		snprintf(msg, sizeof msg, "cwd %s: %s", cwd, err == ENOENT ? "no such directory" :
			 err == ENOTDIR ? "not a directory" : strerror(err));
	} else {
		snprintf(msg, sizeof msg, "%s: %s", stage_name[stage], strerror(err));
	}
	return msg;
}

void exec_start(struct conn *c, uint16_t id, const struct rec *r)
{
	int64_t uid = rec_int(r, F_UID, 0), gid = rec_int(r, F_GID, 0);
	struct xreq *x = calloc(1, sizeof *x);
	if (!x) {
		send_error(c, id, ENOMEM, "cannot start process: %s", strerror(ENOMEM));
		return;
	}
	x->s = (struct spawn){ .sfd = -1, .in = -1, .out = -1, .err = -1, .cg = -1 };
	x->s.pty = rec_int(r, F_PTY, 0) == 1;
	x->s.cwd = r->has[F_CWD] ? field_str(&r->f[F_CWD]) : strdup("/");
	x->s.uid = uid;
	x->s.gid = gid;
	x->timeout = rec_int(r, F_TIMEOUT_MS, 0);
	x->rows = rec_int(r, F_ROWS, 24);
	x->cols = rec_int(r, F_COLS, 80);
	x->detach = rec_int(r, F_DETACH, 0) == 1;
	if (!x->s.cwd || uid < 0 || uid >= 0xffffffff || gid < 0 || gid >= 0xffffffff || x->timeout < 0 ||
	    x->rows < 1 || x->rows > 0xffff || x->cols < 1 || x->cols > 0xffff) {
		send_error(c, id, EINVAL, "bad EXEC: NUL byte or value out of range");
		xreq_free(x);
		return;
	}
	if (x->detach && x->s.pty) {
		send_error(c, id, EINVAL, "bad EXEC: a background command runs without a terminal");
		xreq_free(x);
		return;
	}
	struct chan *ch = chan_new(c, id, OP_EXEC);
	ch->xreq = x;
	exec_args(ch, r);
}

/* The EXEC record, or an ARGS record that continues it: the last one (without `continued`) starts
 * the process. ARGS for a channel whose process already runs is not for it: ignored. */
void exec_args(struct chan *ch, const struct rec *r)
{
	struct xreq *x = ch->xreq;
	if (!x)
		return;
	int err = xreq_add(x, r);
	if (err == E2BIG)
		send_error(ch->c, ch->id, err, "argument list too long: over %d bytes in all (ARG_MAX) or %d "
			   "in one string (MAX_ARG_STRLEN)", EXEC_ARG_MAX, EXEC_ARG_STRLEN - 1);
	else if (err)
		send_error(ch->c, ch->id, err, "bad EXEC: %s", err == EINVAL ? "NUL byte in an argument" : strerror(err));
	if (err) {
		chan_free(ch);
		return;
	}
	if (rec_int(r, F_CONTINUED, 0) == 1)
		return;
	ch->xreq = NULL;
	launch(ch, x);
	xreq_free(x);
}

/* A SIGNAL before the process exists (its ARGS still coming) drops the request: ERROR ends the
 * channel, so the host's request to end it is answered as for a process. */
void exec_host_signal(struct chan *ch, int sig)
{
	if (!ch->xreq) {
		exec_signal(ch, sig);
		return;
	}
	send_error(ch->c, ch->id, ECANCELED, "cancelled before the command started");
	chan_free(ch);
}

/* Read interest follows the window and the out-queue; write interest follows queued stdin. */
void exec_update(struct chan *ch)
{
	bool rd = ch->started && ch->out_win > 0 && !out_full(ch->c);
	bool wr = ch->started && ch->ilen > 0 && !ch->in_closed;
	if (ch->pty) {
		if (ch->ofd >= 0)
			watch_set(ch->ofd, (rd ? EPOLLIN : 0) | (wr ? EPOLLOUT : 0));
		return;
	}
	if (ch->ofd >= 0)
		watch_set(ch->ofd, rd ? EPOLLIN : 0);
	if (ch->efd >= 0)
		watch_set(ch->efd, rd ? EPOLLIN : 0);
	if (ch->ifd >= 0)
		watch_set(ch->ifd, wr ? EPOLLOUT : 0);
}

static bool blocked(struct chan *ch)
{
	return ch->out_win <= 0 || out_full(ch->c);
}

/* Send EXIT and end the channel once the process is gone and its output has ended, or has been
 * quiet for EXIT_QUIET_MS (a background process may hold the pipes). True if the channel ended. */
static bool check_done(struct chan *ch)
{
	if (!ch->started || !ch->exited)
		return false;
	if ((ch->ofd >= 0 || ch->efd >= 0) && (now < ch->last_out + EXIT_QUIET_MS || blocked(ch)))
		return false;
	struct rb b = { 0 };
	if (WIFSIGNALED(ch->wstatus))
		rb_int(&b, F_SIGNAL, WTERMSIG(ch->wstatus));
	else
		rb_int(&b, F_EXIT_CODE, WEXITSTATUS(ch->wstatus));
	rb_int(&b, F_TIMED_OUT, ch->timed_out);
	send_rec(ch->c, ch->id, T_EXIT, &b);
	chan_free(ch);
	return true;
}

/* Whether a canonical-mode terminal has ended its line after input byte `c`. */
static bool line_end(const struct termios *t, uint8_t c)
{
	if (c == '\n' || (c == '\r' && (t->c_iflag & ICRNL) && !(t->c_iflag & IGNCR)))
		return true;
	return c != _POSIX_VDISABLE && (c == t->c_cc[VEOF] || c == t->c_cc[VEOL] || c == t->c_cc[VEOL2]);
}

static void stdin_close(struct chan *ch)
{
	if (ch->in_closed)
		return;
	ch->in_closed = true;
	if (!ch->pty) {
		watch_close(&ch->ifd);
		return;
	}
	/* A terminal has no half-close: type the EOF character, as a user at it would. In canonical
	 * mode it ends the input only at the start of a line: after a partial line the first one just
	 * passes that line on, so a second one is typed. */
	struct termios t;
	if (ch->ifd < 0 || tcgetattr(ch->ifd, &t))
		return;
	cc_t eof[2] = { t.c_cc[VEOF], t.c_cc[VEOF] };
	bool partial = (t.c_lflag & ICANON) && ch->in_wrote && !line_end(&t, ch->in_last);
	if (write(ch->ifd, eof, partial ? 2 : 1) < 0) {
		/* the process is gone or not reading: nothing to tell it */
	}
}

static void stdin_pump(struct chan *ch)
{
	while (ch->ilen && !ch->in_closed) {
		ssize_t n = write(ch->ifd, ch->ib + ch->ihead, ch->ilen);
		if (n > 0) {
			ch->in_wrote = true;
			ch->in_last = ch->ib[ch->ihead + n - 1];
			ch->ihead += n;
			ch->ilen -= n;
			ch->ack += n;
		} else if (n < 0 && errno == EAGAIN) {
			break;
		} else if (!(n < 0 && errno == EINTR)) {
			stdin_close(ch);  /* EPIPE, or EIO from a PTY whose process is gone */
		}
	}
	if (ch->in_closed) {
		/* Nobody will read it: count it as passed on, so a host that sends more is not stuck. */
		ch->ack += ch->ilen;
		ch->ilen = 0;
	}
	if (!ch->ilen) {
		ch->ihead = 0;
		if (ch->in_eof)
			stdin_close(ch);
	}
	grant(ch, false);
}

void exec_stdin(struct chan *ch, const uint8_t *p, size_t n)
{
	ch->in_win -= n;
	if (!n)
		ch->in_eof = true;
	else if (ch->in_eof || ch->in_closed)
		ch->ack += n;
	else
		ibuf_push(ch, p, n);
	if (ch->started)
		stdin_pump(ch);
	exec_update(ch);
}

/* Read one of the process's outputs while the window and the out-queue allow. */
static void read_out(struct chan *ch, int *fd, uint8_t type)
{
	struct conn *c = ch->c;
	while (*fd >= 0 && !blocked(ch)) {
		size_t want = ch->out_win < CHUNK ? ch->out_win : CHUNK;
		ssize_t n = read(*fd, data_reserve(c, want), want);
		if (n > 0) {
			data_commit(c, ch->id, type, n);
			ch->out_win -= n;
			ch->last_out = now;
			if ((size_t)n < want)
				break;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			break;
		/* End of file; a PTY master reports EIO once no process has the terminal open. */
		if (n < 0 && errno != EIO)
			logmsg("channel %u: read: %s", ch->id, strerror(errno));
		watch_close(fd);
		if (ch->pty) {
			ch->ifd = -1;
			ch->in_closed = true;
			stdin_pump(ch);
		}
	}
}

/* ERROR for a start that failed: the message, errno, and where known the exit status a shell would
 * give (127: no such command) and what was missing (protocol.md, Exec). */
void send_start_error(struct chan *ch, int stage, int err)
{
	int code;
	const char *cause, *msg = start_failure(ch, stage, err, &code, &cause);
	struct rb b = { 0 };
	rb_bytes(&b, F_MESSAGE, msg, strlen(msg));
	rb_int(&b, F_ERRNO, err);
	if (code >= 0)
		rb_int(&b, F_EXIT_CODE, code);
	if (cause)
		rb_bytes(&b, F_CAUSE, cause, strlen(cause));
	send_rec(ch->c, ch->id, T_ERROR, &b);
}

/* Read a status pipe: 1 once the exec succeeded (end of file: the pipe is close-on-exec), 0 when the
 * child failed before it (its stage and errno in *stage, *err; it exits 127 and is reaped as an
 * orphan), -1 when there is nothing to read yet. */
int read_status(int fd, int *stage, int *err)
{
	int msg[2];
	ssize_t n = read(fd, msg, sizeof msg);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return -1;
	if (n == 0)
		return 1;
	*stage = n == sizeof msg && msg[0] >= 0 && msg[0] <= S_EXEC ? msg[0] : S_EXEC;
	*err = n == sizeof msg ? msg[1] : EIO;
	return 0;
}

static void status_ready(struct chan *ch)
{
	int stage, err, r = read_status(ch->sfd, &stage, &err);
	if (r < 0)
		return;
	watch_close(&ch->sfd);
	if (!r) {
		send_start_error(ch, stage, err);
		chan_free(ch);
		return;
	}
	/* End of file: the exec succeeded (the pipe is close-on-exec). */
	struct rb b = { 0 };
	rb_int(&b, F_PID, ch->pid);
	send_rec(ch->c, ch->id, T_STARTED, &b);
	ch->started = true;
	ch->last_out = now;
	stdin_pump(ch);
	exec_update(ch);
	check_done(ch);
}

void exec_event(struct chan *ch, int kind, uint32_t events)
{
	switch (kind) {
	case W_STATUS:
		status_ready(ch);
		return;
	case W_STDIN:
		stdin_pump(ch);
		break;
	case W_STDOUT:
		read_out(ch, &ch->ofd, T_STDOUT);
		break;
	case W_STDERR:
		read_out(ch, &ch->efd, T_STDERR);
		break;
	case W_PTY:
		if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
			stdin_pump(ch);
		if (events & (EPOLLIN | EPOLLERR | EPOLLHUP))
			read_out(ch, &ch->ofd, T_STDOUT);
		break;
	}
	if (!check_done(ch))
		exec_update(ch);
}

/* The group may outlive its leader; the leader may not have called setsid yet. SIGKILL (a timeout, a
 * closed connection, or the host's) also goes to the command's cgroup: every process it started. */
void exec_signal(struct chan *ch, int sig)
{
	if (ch->pid <= 0)
		return;  /* no process yet: kill(0) would signal the agent's own group */
	if (!ch->exited)
		kill(ch->pid, sig);
	kill(-ch->pid, sig);
	if (sig == SIGKILL)
		limits_kill(ch->group);
}

void exec_resize(struct chan *ch, int64_t rows, int64_t cols)
{
	struct winsize ws = { .ws_row = rows, .ws_col = cols };
	if (ch->pty && ch->ofd >= 0 && rows > 0 && rows <= 0xffff && cols > 0 && cols <= 0xffff)
		ioctl(ch->ofd, TIOCSWINSZ, &ws);
}

/* The main process has exited: the command is over; what it sent to the background runs on. */
void exec_reaped(struct chan *ch, int status)
{
	ch->exited = true;
	ch->wstatus = status;
	if (ch->last_out < now)
		ch->last_out = now;
	check_done(ch);
}

void exec_timers(struct chan *ch)
{
	if (ch->deadline && now >= ch->deadline) {
		ch->deadline = 0;
		ch->timed_out = !ch->exited;
		exec_signal(ch, SIGKILL);
	}
	if (!ch->started || !ch->exited || now < ch->last_out + EXIT_QUIET_MS)
		return;
	/* Quiet for 100 ms as far as events say; but a busy loop may not have seen them all yet. */
	read_out(ch, &ch->ofd, T_STDOUT);
	read_out(ch, &ch->efd, T_STDERR);
	if (!check_done(ch))
		exec_update(ch);
}

int64_t exec_next_timer(struct chan *ch)
{
	int64_t t = ch->deadline ? ch->deadline : INT64_MAX;
	/* While blocked, the quiet timer waits for the host: a WINDOW or a flush wakes the loop. */
	if (ch->started && ch->exited && !blocked(ch) && ch->last_out + EXIT_QUIET_MS < t)
		t = ch->last_out + EXIT_QUIET_MS;
	return t;
}

void exec_release(struct chan *ch)
{
	free(ch->prog);
	free(ch->cwd);
	if (ch->bg)
		bg_release(ch);
	if (ch->xreq)
		xreq_free(ch->xreq);
	limits_release(ch->group);
	watch_close(&ch->sfd);
	if (ch->pty)
		ch->ifd = -1;  /* the same fd as ofd */
	watch_close(&ch->ifd);
	watch_close(&ch->ofd);
	watch_close(&ch->efd);
}
