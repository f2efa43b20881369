"""The VM fixtures, for the tests that put the shared egress gateway in front of real sandboxes."""

from tests.vm.conftest import artifacts, cli_home  # noqa: F401
from tests.vm.test_secrets import servers  # noqa: F401
