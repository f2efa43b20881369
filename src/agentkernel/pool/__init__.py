"""The warm pool: a daemon keeps ready sandboxes per kind, and `run` takes one instead of booting.

`kinds` says which kinds a daemon keeps (every image `run` would choose where it is started) and how
many of each; `wire` is how clients talk to the daemon (its socket, one request); `daemon` is the
service process; `control` starts, stops and asks it. The key of a kind of sandbox is
`service.service.pool_key`.
"""
