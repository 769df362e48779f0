"""One exception hierarchy for balprune; every error carries the exit code the CLI returns.

The exit codes are defined here (one class per code); README's "Exit codes" table lists every
case each one covers, and must name a case before code raises it:

    0  ok
    1  benchmark regression found (``compare``)
    2  usage error (a bad option value or combination, two outputs on one file; before any file is opened
       where it can be: a --kernel is checked against the base report, a pattern option against --config)
    3  refused for safety (pickle payloads, an output that is an input)
    4  invalid or unsupported input (checkpoint, packed file, config, recipe, report; non-regular files,
       nesting and size bombs; a shortfall under --strict)
    5  output error (cannot write, disk full, output exists without --force, non-regular output)
    6  no usable GPU
    7  GPU runtime failure (one of balprune's own paths; a failing peer library is not one)
    70 internal error (a bug: please report it)
    130 interrupted (SIGINT), 143 terminated (SIGTERM)
"""

from __future__ import annotations


class BalpruneError(Exception):
    """Base class: a user-facing error with a one-line message and an exit code."""

    exit_code: int = 70

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message the CLI prints: what is wrong, where, and what to do."""
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(BalpruneError):
    """An option or argument value is malformed or out of range."""

    exit_code = 2


class UnsafeInputError(BalpruneError):
    """Refused for safety: executing payloads, whole pickled modules, writing over an input."""

    exit_code = 3


class InvalidInputError(BalpruneError):
    """A checkpoint, packed file or config is malformed, inconsistent or unsupported."""

    exit_code = 4


class ConfigError(InvalidInputError):
    """A TOML config file is malformed or holds unknown keys or bad values."""


class FormatError(InvalidInputError):
    """A packed balprune file breaks the format spec (FORMAT.md)."""


class OutputError(BalpruneError):
    """The output cannot be written (missing folder, exists without --force, I/O error)."""

    exit_code = 5


class NoGpuError(BalpruneError):
    """No usable GPU, or CuPy cannot use it."""

    exit_code = 6


class GpuRuntimeError(BalpruneError):
    """A GPU failure during a run (out of memory, kernel fault)."""

    exit_code = 7


class Interrupted(BalpruneError):
    """The run was interrupted by a signal; the exit code is 128 + the signal number."""

    def __init__(self, signum: int, committed=()) -> None:
        """``committed``: the outputs this command had already written completely (container.COMMITTED)
        when the signal came; the message names them instead of saying nothing was written."""
        import signal

        name = signal.Signals(signum).name
        done = [str(p) for p in committed]
        written = ("no output was written" if not done else
                   ", ".join(done[-3:]) + (" ..." if len(done) > 3 else "") + " had been written completely")
        super().__init__(f"interrupted by {name}; {written}")
        self.exit_code = 128 + signum


EXIT_REGRESSION = 1
EXIT_INTERNAL = 70
