"""The warm pool: a daemon keeps ready sandboxes per kind, and `run` takes one instead of booting.

`wire` is what clients need (the socket, the pool key, one request), kept free of heavy imports so a
`run` through the pool starts fast; `daemon` is the service process; `control` starts and stops it.
"""
