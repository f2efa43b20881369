/* CONNECT channels (protocol version 4): a TCP connection to 127.0.0.1:PORT in the guest, its bytes
 * relayed both ways as DATA frames under the channel's windows, each side half-closed by an empty
 * DATA (protocol.md, Ports). Like an EXEC's pipes, the socket leaves the epoll set while the window
 * or the out-queue is shut, so a host that does not read slows the guest's server instead of filling
 * the agent's memory; the host's bytes wait in the channel's input buffer, bounded by its window. */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static bool blocked(struct chan *ch)
{
	return ch->out_win <= 0 || out_full(ch->c);
}

void tcp_update(struct chan *ch)
{
	if (ch->fd < 0)
		return;
	if (!ch->tcp_up) {
		watch_set(ch->fd, EPOLLOUT);  /* the connect's completion */
		return;
	}
	bool rd = !ch->tcp_rd_eof && !blocked(ch);
	bool wr = ch->ilen > 0 && !ch->tcp_wr_shut;
	watch_set(ch->fd, (rd ? EPOLLIN : 0) | (wr ? EPOLLOUT : 0));
}

/* The channel's ending frame: OK once both directions ended cleanly, else ERROR naming the cause. */
static void finish(struct chan *ch, int err)
{
	if (err)
		send_error(ch->c, ch->id, err, "connection to 127.0.0.1:%d in the sandbox: %s", ch->port,
			   strerror(err));
	else
		send_frame(ch->c, ch->id, T_OK, NULL, 0);
	chan_free(ch);
}

static bool check_done(struct chan *ch)
{
	if (!ch->tcp_rd_eof || !ch->tcp_wr_shut)
		return false;
	finish(ch, 0);
	return true;
}

/* Pass the host's bytes on to the socket; after the host's end of data, half-close it. False if the
 * channel ended. */
static bool pump(struct chan *ch)
{
	while (ch->ilen && !ch->tcp_wr_shut) {
		ssize_t n = send(ch->fd, ch->ib + ch->ihead, ch->ilen, MSG_NOSIGNAL);
		if (n > 0) {
			ch->ihead += n;
			ch->ilen -= n;
			ch->ack += n;
		} else if (n < 0 && errno == EAGAIN) {
			break;
		} else if (!(n < 0 && errno == EINTR)) {
			int err = n < 0 ? errno : EPIPE;
			if (!ch->tcp_rd_eof) {
				finish(ch, err);
				return false;
			}
			/* The server closed after its answer: what it would not take is dropped. */
			ch->tcp_wr_shut = true;
			ch->ack += ch->ilen;
			ch->ilen = 0;
		}
	}
	if (!ch->ilen) {
		ch->ihead = 0;
		if (ch->in_eof && !ch->tcp_wr_shut) {
			shutdown(ch->fd, SHUT_WR);
			ch->tcp_wr_shut = true;
		}
	}
	grant(ch, false);
	return !check_done(ch);
}

/* Read the socket while the window and the out-queue allow. False if the channel ended. */
static bool drain(struct chan *ch)
{
	struct conn *c = ch->c;
	while (!ch->tcp_rd_eof && !blocked(ch)) {
		size_t want = ch->out_win < CHUNK ? ch->out_win : CHUNK;
		ssize_t n = recv(ch->fd, data_reserve(c, want), want, 0);
		if (n > 0) {
			data_commit(c, ch->id, T_DATA, n);
			ch->out_win -= n;
			if ((size_t)n < want)
				break;
		} else if (n == 0) {
			ch->tcp_rd_eof = true;
			send_frame(c, ch->id, T_DATA, NULL, 0);  /* the server's end of data */
		} else if (errno == EAGAIN) {
			break;
		} else if (errno != EINTR) {
			finish(ch, errno);
			return false;
		}
	}
	return !check_done(ch);
}

static void connected(struct chan *ch)
{
	int err = 0;
	socklen_t len = sizeof err;
	if (getsockopt(ch->fd, SOL_SOCKET, SO_ERROR, &err, &len))
		err = errno;
	if (err == EINPROGRESS || err == EALREADY)
		return;
	if (err) {
		finish(ch, err);
		return;
	}
	ch->tcp_up = true;
	send_frame(ch->c, ch->id, T_STARTED, NULL, 0);
	if (pump(ch))
		tcp_update(ch);
}

void tcp_event(struct chan *ch, uint32_t events)
{
	if (!ch->tcp_up) {
		connected(ch);
		return;
	}
	if ((events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && !pump(ch))
		return;
	if ((events & (EPOLLIN | EPOLLERR | EPOLLHUP)) && !drain(ch))
		return;
	tcp_update(ch);
}

void tcp_start(struct conn *c, uint16_t id, const struct rec *r)
{
	int64_t port = rec_int(r, F_PORT, 0);
	if (port < 1 || port > 65535) {
		send_error(c, id, EINVAL, "bad CONNECT: port %lld is not 1 to 65535", (long long)port);
		return;
	}
	struct chan *ch = chan_new(c, id, OP_TCP);
	ch->port = (int)port;
	ch->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (ch->fd < 0) {
		finish(ch, errno);
		return;
	}
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	watch_add(ch->fd, W_TCP, 0, c, ch);
	if (connect(ch->fd, (struct sockaddr *)&sa, sizeof sa) && errno != EINPROGRESS) {
		finish(ch, errno);
		return;
	}
	tcp_update(ch);  /* loopback connects at once or fails at once; EPOLLOUT tells either way */
}

void tcp_data(struct chan *ch, const uint8_t *p, size_t n)
{
	ch->in_win -= n;
	if (!n)
		ch->in_eof = true;
	else if (ch->in_eof || ch->tcp_wr_shut)
		ch->ack += n;  /* after the end, or for a server that closed: dropped, and counted as passed */
	else
		ibuf_push(ch, p, n);
	if (ch->tcp_up && pump(ch))
		tcp_update(ch);
}

void tcp_release(struct chan *ch)
{
	watch_close(&ch->fd);
}
