/* agentkernel guest agent: shared definitions. The wire protocol is docs/protocol.md. */
#ifndef AGENT_H
#define AGENT_H

#define _GNU_SOURCE
#include <dirent.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/types.h>

#define HDR_LEN 8
#define MAX_PAYLOAD 262144
#define MAX_FIELDS 4096
#define MAX_CHANS 1024
#define INIT_WINDOW 262144
#define MAX_PING 64
#define CHUNK 65536           /* largest data frame the agent sends */
#define OUTQ_HIGH (1 << 20)   /* above this many queued bytes, stop producing output */
#define EXIT_QUIET_MS 100     /* the 100 ms rule for EXIT (protocol.md, Exec) */
#define PROTO_VERSION 4
#define MAX_BG 64             /* background commands kept (protocol.md, Background commands) */
#define BG_RING (1 << 20)     /* output kept per background command */
#define BG_STDIN_MAX (256 << 10) /* stdin queued per background command */
/* Linux's bounds on what execve takes (protocol.md, Exec): argv and env together, each string with
 * its NUL plus a pointer to it, at most a quarter of the 8 MiB stack limit; one string at most
 * MAX_ARG_STRLEN (32 pages) with its NUL. The agent holds no more than that for an EXEC. */
#define EXEC_ARG_MAX (2 << 20)
#define EXEC_ARG_STRLEN (128 << 10)

enum ftype {
	T_HELLO = 1, T_PING = 2, T_PONG = 3, T_SHUTDOWN = 4,
	T_EXEC = 16, T_STARTED, T_STDIN, T_STDOUT, T_STDERR, T_EXIT, T_SIGNAL, T_RESIZE,
	T_WINDOW, T_ERROR, T_DATA, T_OK, T_INFO, T_ENTRY, T_ARGS,
	T_GET = 32, T_PUT, T_STAT, T_LIST, T_MKDIR, T_REMOVE, T_RENAME, T_WATCH,
	T_JOBS = 48, T_ATTACH, T_INPUT, T_KILL, T_WAIT, T_CONNECT,
};

enum tag {
	F_VERSION = 1, F_MAGIC, F_ARGV, F_ENV, F_CWD, F_UID, F_GID, F_TIMEOUT_MS, F_PID,
	F_EXIT_CODE, F_SIGNAL, F_MESSAGE, F_ERRNO, F_ROWS, F_COLS, F_PTY, F_BYTES, F_TIMED_OUT,
	F_HOSTNAME, F_TIME_NS, F_PATH, F_MODE, F_SIZE, F_MTIME_NS, F_KIND, F_NAME, F_PARENTS,
	F_RECURSIVE, F_MAX_PROCS, F_MEMORY_MB, F_ENTROPY, F_CONTINUED, F_DETACH, F_CMD, F_OFFSET, F_FOLLOW,
	F_STATE, F_STARTED_NS, F_DATA, F_EOF, F_CAUSE, F_TO, F_LOST, F_EVENT, F_PORT, NTAGS
};

enum kind { K_FILE = 1, K_DIR, K_SYMLINK, K_OTHER };

/* A parsed record: values point into the frame payload. */
struct field { const uint8_t *p; uint32_t n; };
struct rec {
	bool has[NTAGS];
	struct field f[NTAGS];
	struct field argv[MAX_FIELDS], env[MAX_FIELDS];
	int nargv, nenv;
};
int rec_parse(struct rec *r, const uint8_t *p, size_t n);
int64_t rec_int(const struct rec *r, int tag, int64_t def);
char *field_str(const struct field *f); /* malloc'd C string; NULL if it holds a NUL */

/* A record being built. Agent records are small: names <= 255 bytes, short messages. */
struct rb { size_t n; uint8_t b[1024]; };
void rb_int(struct rb *b, int tag, int64_t v);
void rb_bytes(struct rb *b, int tag, const void *p, size_t n);

uint16_t get16(const uint8_t *p);
uint32_t get32(const uint8_t *p);
void put32(uint8_t *p, uint32_t v);

struct chan;

struct conn {
	struct conn *next;
	int fd;
	bool serial;     /* virtio-serial port (kept open; resyncs on HELLO) or a vsock/Unix stream */
	bool synced;     /* a HELLO was accepted; before that a port scans for one */
	bool host_up;    /* a port's host side was last seen connected */
	bool dead;       /* closed, freed at the end of the loop iteration */
	bool can_read, can_write; /* edge-triggered readiness not yet consumed */
	bool throttled;  /* out-queue went over OUTQ_HIGH; producers are paused */
	char name[48];
	uint8_t *in;     /* input: at most one frame plus one read */
	size_t inlen;
	uint8_t *out;    /* out-queue: [ohead, olen) unsent; ofrm = start of the frame at ohead */
	size_t ohead, olen, ocap, ofrm;
	struct chan *ch[MAX_CHANS];
	int nch;
};

enum op { OP_EXEC = 1, OP_GET, OP_PUT, OP_LIST, OP_ATTACH, OP_WATCH, OP_TCP };

struct bg;
struct watcher;

struct chan {
	struct conn *c;
	uint16_t id;
	uint8_t op;
	int64_t out_win;     /* data bytes the agent may still send */
	int64_t in_win;      /* data bytes the host may still send */
	int64_t ack;         /* bytes passed on, not yet returned with WINDOW */
	uint8_t *ib;         /* host data not yet passed on: [ihead, ihead+ilen), at most INIT_WINDOW */
	size_t ihead, ilen, icap;
	bool in_eof;         /* host ended its data (empty STDIN) */
	bool in_closed;      /* the process's stdin is closed */
	bool in_wrote;       /* some stdin was passed on; in_last is its last byte (for a PTY's EOF) */
	uint8_t in_last;
	/* exec */
	struct xreq *xreq;   /* an EXEC still taking ARGS frames; NULL once it ran (or failed to) */
	pid_t pid;
	int sfd, ifd, ofd, efd; /* status pipe, stdin, stdout, stderr; a PTY master is ifd == ofd */
	bool pty, started, exited, timed_out;
	int wstatus;
	unsigned group;      /* the process's cgroup (limits.c); 0: none */
	int64_t deadline;    /* monotonic ms for timeout_ms, 0 = none */
	int64_t last_out;    /* monotonic ms of the last output, for the 100 ms rule */
	char *prog, *cwd;    /* argv[0] and the working directory, for the messages of a failed start */
	/* background: the command an EXEC with `detach` starts, or that ATTACH or WAIT follows */
	struct bg *bg;
	uint64_t pos;        /* ATTACH: offset of the next output byte to send */
	bool follow, quiet;  /* ATTACH: until the command ends; WAIT: no output */
	struct watcher *watcher;  /* WATCH */
	/* CONNECT (tcp.c): the socket is `fd` */
	int port;
	bool tcp_up, tcp_rd_eof, tcp_wr_shut;  /* connected; the server ended its data; ours ended */
	/* files */
	int fd;
	DIR *dir;
	char *tmp, *path;  /* PUT: temporary file and target */
	int mode;
	int64_t size;
};

struct spawn {
	char **argv, **envp, *cwd;
	uid_t uid;
	gid_t gid;
	int sfd, in, out, err; /* child ends; for a PTY all three are the slave */
	int cg;                /* the command's cgroup.procs (limits.c), or -1 */
	bool pty;
};

/* An EXEC as its frames arrive: the settings of the EXEC record, and argv and env from it and from
 * the ARGS frames that continue it (protocol.md, Exec). */
struct xreq {
	struct spawn s;            /* argv and envp are NULL-terminated arrays of argc, envc strings */
	int argc, envc, argcap, envcap;
	size_t size;               /* argv and env as Linux counts them against EXEC_ARG_MAX */
	int64_t timeout, rows, cols;
	bool detach;               /* a background command (bg.c) */
};

/* agent.c */
extern int64_t now;  /* monotonic ms, refreshed every loop iteration */
extern struct rlimit child_nofile;
extern bool container;  /* run by a container runtime (AGENTKERNEL_LISTEN), not booted as a VM's init */
int64_t mono_ms(void);
void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void setup_failed(const char *what);
bool is_mountpoint(const char *dir);
enum wkind { W_NONE, W_SIGNAL, W_LISTEN, W_UEVENT, W_LIMITS, W_CONN, W_STATUS, W_STDIN, W_STDOUT, W_STDERR,
	     W_PTY, W_BG_STATUS, W_BG_IN, W_BG_OUT, W_INOTIFY, W_TCP };
void watch_add(int fd, int kind, uint32_t events, struct conn *c, struct chan *ch);
void watch_bg(int fd, int kind, uint32_t events, struct bg *b);
void watch_set(int fd, uint32_t events);
void watch_close(int *fd);
void send_frame(struct conn *c, uint16_t ch, uint8_t type, const void *p, size_t n);
void send_rec(struct conn *c, uint16_t ch, uint8_t type, const struct rb *b);
void send_error(struct conn *c, uint16_t ch, int err, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
uint8_t *data_reserve(struct conn *c, size_t n);
void data_commit(struct conn *c, uint16_t ch, uint8_t type, size_t n);
bool out_full(struct conn *c);
struct chan *chan_new(struct conn *c, uint16_t id, uint8_t op);
void chan_free(struct chan *ch);
void ibuf_push(struct chan *ch, const uint8_t *p, size_t n);
void grant(struct chan *ch, bool force);

/* exec.c */
void exec_start(struct conn *c, uint16_t id, const struct rec *r);
void exec_args(struct chan *ch, const struct rec *r);
void exec_host_signal(struct chan *ch, int sig);
void exec_event(struct chan *ch, int kind, uint32_t events);
void exec_stdin(struct chan *ch, const uint8_t *p, size_t n);
void exec_signal(struct chan *ch, int sig);
void exec_resize(struct chan *ch, int64_t rows, int64_t cols);
void exec_reaped(struct chan *ch, int status);
void exec_update(struct chan *ch);
void exec_timers(struct chan *ch);
int64_t exec_next_timer(struct chan *ch);
void exec_release(struct chan *ch);
int spawn(struct xreq *x, bool merge, pid_t *pid, int fds[4], unsigned *group);
int read_status(int fd, int *stage, int *err);
void send_start_error(struct chan *ch, int stage, int err);
void xreq_free(struct xreq *x);

/* bg.c */
void bg_launch(struct chan *ch, struct xreq *x);
void bg_op(struct conn *c, uint16_t id, uint8_t type, const struct rec *r);
void bg_event(struct bg *b, int kind);
bool bg_reaped(pid_t pid, int status);
void bg_timers(void);
int64_t bg_next_timer(void);
bool bg_produce(struct chan *ch);
void bg_release(struct chan *ch);

/* limits.c */
void limits_init(void);
void limits_apply(const struct rec *r);
int limits_group(unsigned *id);
int limits_join(int procs_fd);
void limits_kill(unsigned id);
void limits_release(unsigned id);
void limits_event(int fd);
void limits_timers(void);
int64_t limits_next_timer(void);

/* files.c */
void file_op(struct conn *c, uint16_t id, uint8_t type, const struct rec *r);
void file_data(struct chan *ch, const uint8_t *p, size_t n);
bool file_produce(struct chan *ch);
void file_rename(struct conn *c, uint16_t id, const char *from, const struct rec *r);

/* watch.c */
void watch_start(struct conn *c, uint16_t id, const char *path, bool recursive);
bool watch_produce(struct chan *ch);
void watch_release(struct chan *ch);
void file_release(struct chan *ch);

/* tcp.c */
void tcp_start(struct conn *c, uint16_t id, const struct rec *r);
void tcp_data(struct chan *ch, const uint8_t *p, size_t n);
void tcp_event(struct chan *ch, uint32_t events);
void tcp_update(struct chan *ch);
void tcp_release(struct chan *ch);

#endif
