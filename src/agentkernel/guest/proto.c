/* Record encoding and decoding (protocol.md, Records). */
#include "agent.h"

#include <stdlib.h>
#include <string.h>

uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

void put32(uint8_t *p, uint32_t v)
{
	p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static bool int_tag(int tag)
{
	switch (tag) {
	case F_VERSION: case F_UID: case F_GID: case F_TIMEOUT_MS: case F_PID: case F_EXIT_CODE:
	case F_SIGNAL: case F_ERRNO: case F_ROWS: case F_COLS: case F_PTY: case F_BYTES:
	case F_TIMED_OUT: case F_TIME_NS: case F_MODE: case F_SIZE: case F_MTIME_NS: case F_KIND:
	case F_PARENTS: case F_RECURSIVE: case F_MAX_PROCS: case F_MEMORY_MB: case F_CONTINUED:
	case F_DETACH: case F_CMD: case F_OFFSET: case F_FOLLOW: case F_STATE: case F_STARTED_NS: case F_EOF:
	case F_LOST: case F_EVENT:
		return true;
	}
	return false;
}

/* Fields must tile the payload exactly; known int fields are 8 bytes; str fields hold no NUL. */
int rec_parse(struct rec *r, const uint8_t *p, size_t n)
{
	size_t off = 0;
	int count = 0;

	memset(r->has, 0, sizeof r->has);
	r->nargv = r->nenv = 0;
	while (off < n) {
		if (n - off < 6 || ++count > MAX_FIELDS)
			return -1;
		int tag = get16(p + off);
		uint32_t size = get32(p + off + 2);
		off += 6;
		if (size > n - off)
			return -1;
		struct field f = { p + off, size };
		off += size;
		if (int_tag(tag) && size != 8)
			return -1;
		if (tag == F_MESSAGE && memchr(f.p, 0, size))
			return -1;
		if (tag == F_ARGV)
			r->argv[r->nargv++] = f;
		else if (tag == F_ENV)
			r->env[r->nenv++] = f;
		else if (tag < NTAGS) {
			r->has[tag] = true;
			r->f[tag] = f;
		}
	}
	return 0;
}

int64_t rec_int(const struct rec *r, int tag, int64_t def)
{
	if (!r->has[tag])
		return def;
	uint64_t v = 0;
	for (int i = 0; i < 8; i++)
		v = v << 8 | r->f[tag].p[i];
	return (int64_t)v;
}

char *field_str(const struct field *f)
{
	if (memchr(f->p, 0, f->n))
		return NULL;
	char *s = malloc(f->n + 1);
	if (s) {
		memcpy(s, f->p, f->n);
		s[f->n] = 0;
	}
	return s;
}

void rb_bytes(struct rb *b, int tag, const void *p, size_t n)
{
	if (n > sizeof b->b - 6 - b->n)  /* only a too-long message can hit this: truncate it */
		n = sizeof b->b - 6 - b->n;
	b->b[b->n] = tag >> 8;
	b->b[b->n + 1] = tag;
	put32(b->b + b->n + 2, n);
	memcpy(b->b + b->n + 6, p, n);
	b->n += 6 + n;
}

void rb_int(struct rb *b, int tag, int64_t v)
{
	uint8_t x[8];
	for (int i = 0; i < 8; i++)
		x[i] = (uint64_t)v >> (56 - 8 * i);
	rb_bytes(b, tag, x, 8);
}
