/* File operations: GET, PUT, STAT, LIST, MKDIR, REMOVE, RENAME, and the start of WATCH (protocol.md, Files). GET and LIST are
 * produced a chunk at a time as the window and the out-queue allow; the rest run to completion. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int kind_of(mode_t m)
{
	return S_ISREG(m) ? K_FILE : S_ISDIR(m) ? K_DIR : S_ISLNK(m) ? K_SYMLINK : K_OTHER;
}

static void put_stat(struct rb *b, const struct stat *st)
{
	rb_int(b, F_KIND, kind_of(st->st_mode));
	rb_int(b, F_SIZE, st->st_size);
	rb_int(b, F_MODE, st->st_mode & 07777);
	rb_int(b, F_MTIME_NS, (int64_t)st->st_mtim.tv_sec * 1000000000 + st->st_mtim.tv_nsec);
}

static void fail(struct conn *c, uint16_t id, const char *what, const char *path)
{
	int err = errno;
	send_error(c, id, err, "%s %s: %s", what, path, strerror(err));
}

static void ok(struct conn *c, uint16_t id, const struct rb *b)
{
	send_rec(c, id, T_OK, b);
}

static void get_start(struct conn *c, uint16_t id, char *path)
{
	struct stat st;
	int fd = open(path, O_RDONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st)) {
		fail(c, id, "get", path);
	} else if (!S_ISREG(st.st_mode)) {
		/* Devices and FIFOs could block the agent or never end. */
		send_error(c, id, S_ISDIR(st.st_mode) ? EISDIR : EINVAL, "get %s: not a regular file", path);
	} else {
		struct rb b = { 0 };
		put_stat(&b, &st);
		send_rec(c, id, T_INFO, &b);
		chan_new(c, id, OP_GET)->fd = fd;
		return;
	}
	if (fd >= 0)
		close(fd);
}

static void put_start(struct conn *c, uint16_t id, char *path, int64_t mode)
{
	static unsigned seq;
	const char *slash = strrchr(path, '/'), *base = slash + 1;
	size_t len = strlen(path) + 32;
	char *tmp = malloc(len);
	int fd = -1;
	if (!*base) {
		errno = EISDIR;
	} else if (tmp) {
		/* Hidden, beside the target so the rename stays within one filesystem. */
		for (int tries = 0; fd < 0 && tries < 100; tries++) {
			unsigned r = (unsigned)now * 2654435761u + ++seq * 40503u;
			snprintf(tmp, len, "%.*s/.%.200s.%08x.tmp", (int)(slash - path), path, base, r);
			fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
			if (fd < 0 && errno != EEXIST)
				break;
		}
	}
	if (fd < 0) {
		fail(c, id, "put", path);
		free(tmp);
		free(path);
		return;
	}
	struct chan *ch = chan_new(c, id, OP_PUT);
	ch->fd = fd;
	ch->tmp = tmp;
	ch->path = path;
	ch->mode = mode & 07777;
}

void file_data(struct chan *ch, const uint8_t *p, size_t n)
{
	struct conn *c = ch->c;
	ch->in_win -= n;
	if (n) {
		for (size_t off = 0; off < n;) {
			ssize_t w = write(ch->fd, p + off, n - off);
			if (w < 0 && errno == EINTR)
				continue;
			if (w < 0) {
				fail(c, ch->id, "put: write", ch->path);
				chan_free(ch);
				return;
			}
			off += w;
		}
		ch->size += n;
		ch->ack += n;
		grant(ch, true);
		return;
	}
	/* Empty DATA: the file is complete. Make it durable, then put it in place. */
	int fd = ch->fd;
	ch->fd = -1;
	bool done = !fchmod(fd, ch->mode) && !fsync(fd);
	done = !close(fd) && done;
	if (!done || rename(ch->tmp, ch->path)) {
		fail(c, ch->id, "put", ch->path);
	} else {
		free(ch->tmp);
		ch->tmp = NULL;  /* renamed: nothing to clean up */
		struct rb b = { 0 };
		rb_int(&b, F_SIZE, ch->size);
		ok(c, ch->id, &b);
	}
	chan_free(ch);
}

static void stat_path(struct conn *c, uint16_t id, const char *path)
{
	struct stat st;
	if (stat(path, &st)) {
		fail(c, id, "stat", path);
		return;
	}
	struct rb b = { 0 };
	put_stat(&b, &st);
	ok(c, id, &b);
}

static void list_start(struct conn *c, uint16_t id, const char *path)
{
	DIR *d = opendir(path);
	if (!d)
		fail(c, id, "list", path);
	else
		chan_new(c, id, OP_LIST)->dir = d;
}

static void make_dir(struct conn *c, uint16_t id, char *path, mode_t mode, bool parents)
{
	struct stat st;
	for (char *s = path + 1; parents && *s; s++) {
		if (*s != '/')
			continue;
		*s = 0;
		int r = mkdir(path, 0755);
		*s = '/';
		if (r && errno != EEXIST) {
			fail(c, id, "mkdir", path);
			return;
		}
	}
	if (!mkdir(path, mode)) {
		if (chmod(path, mode)) {  /* the exact mode, past the umask */
			fail(c, id, "chmod", path);
			return;
		}
	} else {
		int err = errno;
		if (!(err == EEXIST && parents && !stat(path, &st) && S_ISDIR(st.st_mode))) {
			errno = err;
			fail(c, id, "mkdir", path);
			return;
		}
	}
	struct rb b = { 0 };
	ok(c, id, &b);
}

/* Remove name (relative to dfd) and, if it is a directory, everything under it. Symlinks are
 * removed, never followed. Keeps going past errors and reports the first. */
static int remove_tree(int dfd, const char *name)
{
	int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOTDIR || errno == ELOOP ? unlinkat(dfd, name, 0) : -1;
	DIR *d = fdopendir(fd);
	if (!d) {
		close(fd);
		return -1;
	}
	int err = 0;
	struct dirent *e;
	while ((e = readdir(d))) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		int r = e->d_type == DT_DIR || e->d_type == DT_UNKNOWN ? remove_tree(fd, e->d_name)
								      : unlinkat(fd, e->d_name, 0);
		if (r && errno != ENOENT && !err)
			err = errno;
	}
	closedir(d);
	if (err) {
		errno = err;
		return -1;
	}
	return unlinkat(dfd, name, AT_REMOVEDIR);
}

static void remove_path(struct conn *c, uint16_t id, const char *path, bool recursive)
{
	struct stat st;
	int r = lstat(path, &st);
	if (!r)
		r = !S_ISDIR(st.st_mode) ? unlink(path) : recursive ? remove_tree(AT_FDCWD, path) : rmdir(path);
	if (r) {
		fail(c, id, "remove", path);
		return;
	}
	struct rb b = { 0 };
	ok(c, id, &b);
}

/* rename(2): a file or directory to a new path in the same filesystem, replacing a file there. */
void file_rename(struct conn *c, uint16_t id, const char *from, const struct rec *r)
{
	char *to = r->has[F_TO] ? field_str(&r->f[F_TO]) : NULL;
	if (!to || to[0] != '/')
		send_error(c, id, EINVAL, "to: %s", to ? "not absolute" : "missing or holds a NUL byte");
	else if (rename(from, to))
		send_error(c, id, errno, "rename %s to %s: %s", from, to, strerror(errno));
	else
		ok(c, id, &(struct rb){ 0 });
	free(to);
}

void file_op(struct conn *c, uint16_t id, uint8_t type, const struct rec *r)
{
	char *path = r->has[F_PATH] ? field_str(&r->f[F_PATH]) : NULL;
	if (!path || path[0] != '/') {
		send_error(c, id, EINVAL, "path: %s", path ? "not absolute" : "missing or holds a NUL byte");
		free(path);
		return;
	}
	switch (type) {
	case T_GET:
		get_start(c, id, path);
		break;
	case T_PUT:
		put_start(c, id, path, rec_int(r, F_MODE, 0644));
		return;  /* the channel owns path */
	case T_STAT:
		stat_path(c, id, path);
		break;
	case T_LIST:
		list_start(c, id, path);
		break;
	case T_MKDIR:
		make_dir(c, id, path, rec_int(r, F_MODE, 0755) & 07777, rec_int(r, F_PARENTS, 0) == 1);
		break;
	case T_REMOVE:
		remove_path(c, id, path, rec_int(r, F_RECURSIVE, 0) == 1);
		break;
	case T_RENAME:
		file_rename(c, id, path, r);
		break;
	case T_WATCH:
		watch_start(c, id, path, rec_int(r, F_RECURSIVE, 0) == 1);
		break;
	}
	free(path);
}

/* Produce what GET or LIST can now; true if it stopped only because the out-queue is full. */
bool file_produce(struct chan *ch)
{
	struct conn *c = ch->c;
	struct rb b = { 0 };
	if (ch->op == OP_GET) {
		while (ch->out_win > 0) {
			if (out_full(c))
				return true;
			size_t want = ch->out_win < CHUNK ? ch->out_win : CHUNK;
			ssize_t n = read(ch->fd, data_reserve(c, want), want);
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0) {
				send_error(c, ch->id, errno, "get: read: %s", strerror(errno));
			} else if (n == 0) {
				send_frame(c, ch->id, T_DATA, NULL, 0);
				rb_int(&b, F_SIZE, ch->size);
				ok(c, ch->id, &b);
			} else {
				data_commit(c, ch->id, T_DATA, n);
				ch->out_win -= n;
				ch->size += n;
				continue;
			}
			chan_free(ch);
			return false;
		}
		return false;
	}
	for (;;) {
		if (out_full(c))
			return true;
		errno = 0;
		struct dirent *e = readdir(ch->dir);
		if (!e) {
			if (errno)
				send_error(c, ch->id, errno, "list: %s", strerror(errno));
			else
				ok(c, ch->id, &b);
			chan_free(ch);
			return false;
		}
		struct stat st;
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..") ||
		    fstatat(dirfd(ch->dir), e->d_name, &st, AT_SYMLINK_NOFOLLOW))
			continue;  /* an entry removed meanwhile is skipped */
		b.n = 0;
		rb_bytes(&b, F_NAME, e->d_name, strlen(e->d_name));
		put_stat(&b, &st);
		send_rec(c, ch->id, T_ENTRY, &b);
	}
}

void file_release(struct chan *ch)
{
	if (ch->fd >= 0)
		close(ch->fd);
	if (ch->dir)
		closedir(ch->dir);
	if (ch->tmp)
		unlink(ch->tmp);
	free(ch->tmp);
	free(ch->path);
}
