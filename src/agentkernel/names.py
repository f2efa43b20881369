"""The pattern of sandbox (and snapshot) names, on the standard library only: shared by agentkernel.toml's
checks (`config`) and the service's (`service.checks`), which the thin command line imports too."""

from __future__ import annotations

import re

SANDBOX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
