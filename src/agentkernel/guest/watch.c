/* WATCH (protocol.md, Files): inotify on a directory (and, recursively, on those under it), each
 * event sent to the host as a record in DATA frames under the channel's window. While the host does
 * not take them, the agent stops reading the inotify queue: the kernel holds what comes meanwhile, up
 * to its own bound, past which it reports an overflow, which the host is told of. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_WATCHES 1024  /* directories one WATCH follows */
#define MAX_DEPTH 32      /* levels below the root it follows (each costs stack here) */
#define MASK (IN_CREATE | IN_DELETE | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB | \
	      IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)

/* Event codes of the `event` field. */
enum { E_CREATE = 1, E_WRITE, E_REMOVE, E_MOVED_FROM, E_MOVED_TO, E_CHMOD, E_OVERFLOW, E_GONE };

struct watcher {
	bool recursive;
	int nw;
	int wd[MAX_WATCHES];
	char *rel[MAX_WATCHES];  /* each watched directory's path relative to the root ("" for it) */
	char *root;
	uint8_t *pend;           /* event records not sent yet: [phead, plen) */
	size_t phead, plen, pcap;
	bool gone;               /* the root went away: end once the rest is sent */
};

static int depth_of(const char *rel)
{
	int d = *rel ? 1 : 0;
	for (; *rel; rel++)
		d += *rel == '/';
	return d;
}

static void add_dir(struct watcher *w, int ifd, const char *rel)
{
	if (w->nw >= MAX_WATCHES || depth_of(rel) > MAX_DEPTH)
		return;
	char path[PATH_MAX];
	snprintf(path, sizeof path, "%s%s%s", w->root, *rel ? "/" : "", rel);
	int wd = inotify_add_watch(ifd, path, MASK);
	if (wd < 0)
		return;
	for (int i = 0; i < w->nw; i++)
		if (w->wd[i] == wd)
			return;  /* already watched (a directory moved within the tree) */
	if (!(w->rel[w->nw] = strdup(rel))) {
		inotify_rm_watch(ifd, wd);
		return;
	}
	w->wd[w->nw++] = wd;
	if (!w->recursive)
		return;
	DIR *d = opendir(path);
	struct dirent *e;
	while (d && (e = readdir(d))) {
		if (e->d_type != DT_DIR || !strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		char sub[PATH_MAX];
		snprintf(sub, sizeof sub, "%s%s%s", rel, *rel ? "/" : "", e->d_name);
		add_dir(w, ifd, sub);
	}
	if (d)
		closedir(d);
}

void watch_start(struct conn *c, uint16_t id, const char *path, bool recursive)
{
	struct stat st;
	if (stat(path, &st)) {
		send_error(c, id, errno, "watch %s: %s", path, strerror(errno));
		return;
	}
	if (!S_ISDIR(st.st_mode)) {
		send_error(c, id, ENOTDIR, "watch %s: not a directory", path);
		return;
	}
	int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
	struct watcher *w = calloc(1, sizeof *w);
	if (fd < 0 || !w || !(w->root = strdup(path))) {
		int err = fd < 0 ? errno : ENOMEM;
		send_error(c, id, err, "watch %s: %s", path, strerror(err));
		if (fd >= 0)
			close(fd);
		free(w);
		return;
	}
	size_t n = strlen(w->root);
	while (n > 1 && w->root[n - 1] == '/')
		w->root[--n] = 0;
	w->recursive = recursive;
	add_dir(w, fd, "");
	if (!w->nw) {
		send_error(c, id, errno, "watch %s: %s", path, strerror(errno));
		close(fd);
		free(w->root);
		free(w);
		return;
	}
	struct chan *ch = chan_new(c, id, OP_WATCH);
	ch->fd = fd;
	ch->watcher = w;
	watch_add(fd, W_INOTIFY, EPOLLIN, c, ch);
	send_rec(c, id, T_STARTED, &(struct rb){ 0 });
}

static void queue_event(struct watcher *w, int event, const char *rel, const char *name, bool dir)
{
	char full[PATH_MAX];
	int n = snprintf(full, sizeof full, "%s%s%s", rel, *rel && *name ? "/" : "", name);
	if (n >= (int)sizeof full)
		n = sizeof full - 1;
	size_t need = 3 * 6 + n + 16;
	if (w->plen + need > w->pcap) {
		size_t cap = w->pcap ? w->pcap : 4096;
		while (cap < w->plen + need)
			cap *= 2;
		uint8_t *p = realloc(w->pend, cap);
		if (!p)
			return;
		w->pend = p;
		w->pcap = cap;
	}
	/* `name`, `kind`, then `event`: the last field of each event (the host's cue). */
	uint8_t *p = w->pend + w->plen;
	p[0] = F_NAME >> 8, p[1] = F_NAME & 0xff;
	put32(p + 2, n);
	memcpy(p + 6, full, n);
	p += 6 + n;
	int64_t vals[2] = { dir ? K_DIR : K_FILE, event };
	int tags[2] = { F_KIND, F_EVENT };
	for (int i = 0; i < 2; i++, p += 14) {
		p[0] = tags[i] >> 8, p[1] = tags[i] & 0xff;
		put32(p + 2, 8);
		for (int k = 0; k < 8; k++)
			p[6 + k] = (uint64_t)vals[i] >> (56 - 8 * k);
	}
	w->plen = p - w->pend;
}

/* Read what the kernel has queued into the pending records (called only when none are pending). */
static void read_events(struct chan *ch)
{
	struct watcher *w = ch->watcher;
	char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
	ssize_t len = read(ch->fd, buf, sizeof buf);
	for (char *p = buf; len > 0 && p < buf + len;) {
		struct inotify_event *ev = (struct inotify_event *)p;
		p += sizeof *ev + ev->len;
		if (ev->mask & IN_Q_OVERFLOW) {
			queue_event(w, E_OVERFLOW, "", "", false);
			continue;
		}
		int i;
		for (i = 0; i < w->nw && w->wd[i] != ev->wd; i++)
			;
		if (i == w->nw)
			continue;  /* a watch already dropped */
		const char *rel = w->rel[i], *name = ev->len ? ev->name : "";
		bool dir = ev->mask & IN_ISDIR;
		if (ev->mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED)) {
			if (i == 0 && !w->gone) {
				w->gone = true;
				queue_event(w, E_GONE, "", "", true);
			}
			continue;
		}
		int event = ev->mask & IN_CREATE ? E_CREATE : ev->mask & IN_CLOSE_WRITE ? E_WRITE :
			    ev->mask & IN_DELETE ? E_REMOVE : ev->mask & IN_MOVED_FROM ? E_MOVED_FROM :
			    ev->mask & IN_MOVED_TO ? E_MOVED_TO : E_CHMOD;
		queue_event(w, event, rel, name, dir);
		if (dir && w->recursive && (event == E_CREATE || event == E_MOVED_TO)) {
			char sub[PATH_MAX];
			snprintf(sub, sizeof sub, "%s%s%s", rel, *rel ? "/" : "", name);
			add_dir(w, ch->fd, sub);
		}
	}
}

/* Send pending events as the window and the out-queue allow, reading more once all were sent; ends
 * the channel with OK once the watched directory is gone. True if only the out-queue stopped it. */
bool watch_produce(struct chan *ch)
{
	struct watcher *w = ch->watcher;
	for (;;) {
		if (w->phead == w->plen) {
			w->phead = w->plen = 0;
			if (w->gone) {
				send_rec(ch->c, ch->id, T_OK, &(struct rb){ 0 });
				chan_free(ch);
				return false;
			}
			read_events(ch);
			if (!w->plen) {
				watch_set(ch->fd, EPOLLIN);  /* the kernel's queue is empty: wait for it */
				return false;
			}
		}
		/* Blocked: leave the events in the kernel's queue until the host takes some. */
		if (ch->out_win <= 0 || out_full(ch->c)) {
			watch_set(ch->fd, 0);
			return ch->out_win > 0;
		}
		size_t n = w->plen - w->phead;
		if (n > CHUNK)
			n = CHUNK;
		if ((int64_t)n > ch->out_win)
			n = ch->out_win;
		send_frame(ch->c, ch->id, T_DATA, w->pend + w->phead, n);
		ch->out_win -= n;
		w->phead += n;
	}
}

void watch_release(struct chan *ch)
{
	struct watcher *w = ch->watcher;
	ch->watcher = NULL;
	watch_close(&ch->fd);
	for (int i = 0; w && i < w->nw; i++)
		free(w->rel[i]);
	if (w) {
		free(w->root);
		free(w->pend);
		free(w);
	}
}
