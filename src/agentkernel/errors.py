"""Errors that reach the user as one clear line."""


class AgentkernelError(Exception):
    """An expected failure: the CLI prints its message on one line and exits non-zero."""

    exit_code = 1


class MissingToolError(AgentkernelError):
    """A system program is missing; the message names the package that provides it."""

    def __init__(self, program: str, package: str) -> None:
        super().__init__(
            f"'{program}' is not installed: install it with `apt-get install -y {package}` "
            "(or run scripts/install-system-deps.sh)"
        )
        self.program = program
        self.package = package
