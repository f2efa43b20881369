/* EXEC channels: a process in its own session and process group, its stdio streamed under
 * the channel's windows, and EXIT once it is gone (protocol.md, Exec and Flow control). */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
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

struct spawn {
	char **argv, **envp, *cwd;
	uid_t uid;
	gid_t gid;
	int sfd, in, out, err; /* child ends; for a PTY all three are the slave */
	bool pty;
};

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
	if (limits_join())
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

static char **strv(const struct field *f, int n, int extra)
{
	char **v = calloc(n + extra + 1, sizeof *v);
	for (int i = 0; v && i < n; i++)
		if (!(v[i] = field_str(&f[i]))) {
			free_strv(v);
			return NULL;
		}
	return v;
}

static void nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

void exec_start(struct conn *c, uint16_t id, const struct rec *r)
{
	struct spawn s = { .sfd = -1, .in = -1, .out = -1, .err = -1 };
	int sp[2] = { -1, -1 }, ip[2] = { -1, -1 }, op[2] = { -1, -1 }, ep[2] = { -1, -1 };
	int master = -1;
	int64_t uid = rec_int(r, F_UID, 0), gid = rec_int(r, F_GID, 0), timeout = rec_int(r, F_TIMEOUT_MS, 0);
	int64_t rows = rec_int(r, F_ROWS, 24), cols = rec_int(r, F_COLS, 80);

	s.pty = rec_int(r, F_PTY, 0) == 1;
	s.argv = strv(r->argv, r->nargv, 0);
	s.envp = strv(r->env, r->nenv, 1);
	s.cwd = r->has[F_CWD] ? field_str(&r->f[F_CWD]) : strdup("/");
	if (!r->nargv || !s.argv || !s.envp || !s.cwd || uid < 0 || uid >= 0xffffffff || gid < 0 ||
	    gid >= 0xffffffff || timeout < 0 || rows < 1 || rows > 0xffff || cols < 1 || cols > 0xffff) {
		send_error(c, id, EINVAL, "bad EXEC: %s", !r->nargv ? "no argv" : "NUL byte or value out of range");
		goto out;
	}
	int i;
	for (i = 0; s.envp[i] && strncmp(s.envp[i], "PATH=", 5); i++)
		;
	if (!s.envp[i])
		s.envp[r->nenv] = strdup(DEFAULT_PATH);
	s.uid = uid;
	s.gid = gid;

	if (pipe2(sp, O_CLOEXEC))
		goto fail;
	s.sfd = sp[1];
	if (s.pty) {
		char name[64];
		struct winsize ws = { .ws_row = rows, .ws_col = cols };
		if ((master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0 || unlockpt(master) ||
		    ptsname_r(master, name, sizeof name) || ioctl(master, TIOCSWINSZ, &ws) ||
		    (s.in = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0)
			goto fail;
		s.out = s.err = s.in;
	} else {
		if (pipe2(ip, O_CLOEXEC) || pipe2(op, O_CLOEXEC) || pipe2(ep, O_CLOEXEC))
			goto fail;
		s.in = ip[0];
		s.out = op[1];
		s.err = ep[1];
	}
	pid_t pid = fork();
	if (pid < 0)
		goto fail;
	if (pid == 0)
		child(&s);

	struct chan *ch = chan_new(c, id, OP_EXEC);
	ch->pid = pid;
	ch->pty = s.pty;
	ch->deadline = timeout ? now + timeout : 0;
	ch->sfd = sp[0];
	sp[0] = -1;
	watch_add(ch->sfd, W_STATUS, EPOLLIN, c, ch);
	if (s.pty) {
		ch->ifd = ch->ofd = master;
		master = -1;
		nonblock(ch->ofd);
		watch_add(ch->ofd, W_PTY, 0, c, ch);
	} else {
		ch->ifd = ip[1];
		ch->ofd = op[0];
		ch->efd = ep[0];
		ip[1] = op[0] = ep[0] = -1;
		nonblock(ch->ifd);
		nonblock(ch->ofd);
		nonblock(ch->efd);
		watch_add(ch->ifd, W_STDIN, 0, c, ch);
		watch_add(ch->ofd, W_STDOUT, 0, c, ch);
		watch_add(ch->efd, W_STDERR, 0, c, ch);
	}
	goto out;
fail:
	send_error(c, id, errno, "cannot start process: %s", strerror(errno));
out:
	/* What is left open here are the child's ends and anything of a failed start. */
	if (s.pty && s.in >= 0)
		close(s.in);
	int fds[] = { sp[0], sp[1], ip[0], ip[1], op[0], op[1], ep[0], ep[1], master };
	for (size_t k = 0; k < sizeof fds / sizeof *fds; k++)
		if (fds[k] >= 0)
			close(fds[k]);
	free_strv(s.argv);
	free_strv(s.envp);
	free(s.cwd);
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

static void stdin_close(struct chan *ch)
{
	if (ch->in_closed)
		return;
	ch->in_closed = true;
	if (!ch->pty) {
		watch_close(&ch->ifd);
		return;
	}
	/* A terminal has no half-close: type the EOF character, as a user at it would. */
	struct termios t;
	if (ch->ifd >= 0 && !tcgetattr(ch->ifd, &t) && write(ch->ifd, &t.c_cc[VEOF], 1) < 0) {
		/* the process is gone or not reading: nothing to tell it */
	}
}

static void stdin_pump(struct chan *ch)
{
	while (ch->ilen && !ch->in_closed) {
		ssize_t n = write(ch->ifd, ch->ib + ch->ihead, ch->ilen);
		if (n > 0) {
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

static void status_ready(struct chan *ch)
{
	int msg[2];
	ssize_t n = read(ch->sfd, msg, sizeof msg);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	watch_close(&ch->sfd);
	if (n != 0) {
		/* The child failed before exec; it exits 127 and is reaped as an orphan. */
		int stage = n == sizeof msg && msg[0] >= 0 && msg[0] <= S_EXEC ? msg[0] : S_EXEC;
		int err = n == sizeof msg ? msg[1] : EIO;
		send_error(ch->c, ch->id, err, "%s: %s", stage_name[stage], strerror(err));
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

/* The group may outlive its leader; the leader may not have called setsid yet. */
void exec_signal(struct chan *ch, int sig)
{
	if (!ch->exited)
		kill(ch->pid, sig);
	kill(-ch->pid, sig);
}

void exec_resize(struct chan *ch, int64_t rows, int64_t cols)
{
	struct winsize ws = { .ws_row = rows, .ws_col = cols };
	if (ch->pty && ch->ofd >= 0 && rows > 0 && rows <= 0xffff && cols > 0 && cols <= 0xffff)
		ioctl(ch->ofd, TIOCSWINSZ, &ws);
}

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
	watch_close(&ch->sfd);
	if (ch->pty)
		ch->ifd = -1;  /* the same fd as ofd */
	watch_close(&ch->ifd);
	watch_close(&ch->ofd);
	watch_close(&ch->efd);
}
