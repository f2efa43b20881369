"""Many hosts behind one API: nodes register in etcd (node.py), stateless routers place sandboxes on
them by transactions in etcd (store.py) and pass every call on a sandbox to its node (router.py)."""

ETCD_ENV = "AGENTKERNEL_ETCD"
NODE_KEY_ENV = "AGENTKERNEL_NODE_KEY"
DEFAULT_TTL = 5
"""Seconds of a node's lease: a node silent for this long is gone and its sandboxes show as lost."""
