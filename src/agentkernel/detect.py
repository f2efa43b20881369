"""Which image a command should run in, when nothing says so.

The caller decides with this precedence: `--image` on the command line, else `base_image` from
agentkernel.toml, else detect_image(). Detection looks, in order, at:

1. the command's program: the basename of argv[0], looking through `env [-i] [VAR=1 ...] prog`,
   leading `VAR=1` assignments, `exec`/`nohup`, and `sh -c "script"` / `bash -lc "script"` (the
   script's first word, looked through the same way);
2. marker files in the project directory (the first found, in the order of PROJECT_FILES);
3. the program of the first process in a Procfile;
4. else `base`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

DEFAULT_IMAGE = "base"

PROGRAMS = {
    **dict.fromkeys(("python", "python3", "pip", "pip3", "pytest", "uv", "poetry", "ipython"), "python"),
    **dict.fromkeys(("node", "npm", "npx", "yarn", "pnpm"), "node"),
    **dict.fromkeys(("cargo", "rustc"), "rust"),
    **dict.fromkeys(("go", "gofmt"), "go"),
}
VERSIONED_PYTHON = re.compile(r"(python|pip)3\.\d+")  # python3.12, pip3.11

PROJECT_FILES = (
    ("pyproject.toml", "python"),
    ("requirements.txt", "python"),
    ("setup.py", "python"),
    ("Pipfile", "python"),
    ("package.json", "node"),
    ("Cargo.toml", "rust"),
    ("go.mod", "go"),
)

WRAPPERS = frozenset({"exec", "nohup"})  # run the next word as the program
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ash", "ksh"})
ENV_OPTIONS_WITH_VALUE = frozenset({"-u", "--unset", "-C", "--chdir"})
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)
PROCFILE_LINE = re.compile(r"([A-Za-z0-9_-]+):\s*(.*)")


def detect_image(command: Sequence[str], project_dir: Path) -> tuple[str, str]:
    """(image name, reason), like ("python", "command is pytest") or ("base", "default")."""
    program = program_of(command)
    if program is not None and (image := image_for_program(program)):
        return image, f"command is {program}"
    for filename, image in PROJECT_FILES:
        if (project_dir / filename).is_file():
            return image, f"found {filename}"
    found = _procfile_program(project_dir / "Procfile")
    if found is not None:
        process, program = found
        if image := image_for_program(program):
            return image, f"Procfile process {process} runs {program}"
    return DEFAULT_IMAGE, "default"


def image_for_program(program: str) -> str | None:
    """The image for a program name (a basename), or None if it says nothing."""
    if VERSIONED_PYTHON.fullmatch(program):
        return "python"
    return PROGRAMS.get(program)


def program_of(command: Sequence[str]) -> str | None:
    """The basename of the program `command` ends up running, or None if there is none."""
    args = list(command)
    while args:
        while args and ASSIGNMENT.fullmatch(args[0]):
            args = args[1:]
        if not args:
            return None
        program = PurePosixPath(args[0]).name
        if program == "env":
            args = _skip_env_options(args[1:])
        elif program in WRAPPERS:
            args = args[1:]
        elif program in SHELLS and (script := _shell_script(args)) is not None:
            args = _split(script)
        else:
            return program or None
    return None


def _skip_env_options(args: list[str]) -> list[str]:
    """The arguments of `env` after its options (assignments are skipped by the caller)."""
    while args and args[0].startswith("-"):
        option = args.pop(0)
        if option == "--":
            break
        if option in ENV_OPTIONS_WITH_VALUE and args:
            args.pop(0)
    return args


def _shell_script(args: list[str]) -> str | None:
    """SCRIPT of `sh [options] -c SCRIPT` (`-c` may be combined, as in `-lc`), else None."""
    has_c, i = False, 1
    while i < len(args) and args[i].startswith(("-", "+")):
        option = args[i]
        if option in ("-o", "+o"):  # takes an option name
            i += 1
        elif not option.startswith("--"):
            has_c = has_c or "c" in option[1:]
        i += 1
    return args[i] if has_c and i < len(args) else None


def _split(script: str) -> list[str]:
    try:
        return shlex.split(script, comments=True)
    except ValueError:  # unbalanced quotes: the first words are still useful
        return script.split()


def _procfile_program(procfile: Path) -> tuple[str, str] | None:
    """(process name, program) of the first process in a Procfile, or None."""
    try:
        lines = procfile.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if match := PROCFILE_LINE.fullmatch(line.strip()):
            program = program_of(_split(match[2]))
            return (match[1], program) if program else None
    return None
