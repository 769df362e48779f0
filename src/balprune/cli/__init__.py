"""The ``balprune`` command: runs the Typer app and maps every outcome to one line and an exit code.

Project errors print ``balprune: error: <message>`` on stderr and exit with their code (see
balprune.errors); Click usage errors exit 2; SIGINT/SIGTERM exit 130/143 after the atomic writers
have removed their temp files; anything else is an internal error (70). ``--debug`` (or
BALPRUNE_DEBUG=1) shows tracebacks.
"""

from __future__ import annotations

import os
import signal
import sys

from ..container import COMMITTED
from ..errors import EXIT_INTERNAL, BalpruneError, Interrupted


def _raise_interrupted(signum, frame):  # pragma: no cover - exercised through subprocess tests
    raise Interrupted(signum, COMMITTED)


#: Longest error message printed whole. Messages quote file and command-line text (a recipe's task name,
#: a path, a tensor name), which can be any length; a line past this keeps its head (what is wrong, where)
#: and its tail (the hint) and says how much of the middle it left out.
MAX_ERROR_CHARS = 2000
_HEAD, _TAIL = 1400, 500


def bounded(message: str) -> str:
    """``message`` if it is at most MAX_ERROR_CHARS long, else its head and tail around a count of what was cut."""
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return f"{message[:_HEAD]} [... {len(message) - _HEAD - _TAIL} characters left out ...] {message[-_TAIL:]}"


def _fail(message: str, code: int) -> int:
    """Print the one error line. Messages quote file and command-line text (tensor names, paths, report
    fields), so the whole line goes through render.visible: control characters, lone surrogates and
    characters stderr's encoding cannot hold are escaped, never sent to the terminal raw; then it is
    bounded (an escaped hostile name can be megabytes)."""
    from .render import visible

    print(f"balprune: error: {bounded(visible(message))}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    import typer
    import typer.main

    from .app import _STATE, app

    # Typer vendors Click in recent releases and uses the click package in older ones: accept both.
    exit_types: tuple[type, ...] = (typer.Exit,)
    abort_types: tuple[type, ...] = (typer.Abort,)
    usage_types: tuple[type, ...] = (typer.TyperException,)
    try:
        import click

        exit_types += (click.exceptions.Exit,)
        abort_types += (click.exceptions.Abort,)
        usage_types += (click.ClickException,)
    except ImportError:
        pass

    COMMITTED.clear()  # the outputs of this command (in-process callers run several)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("BALPRUNE_DEBUG") == "1"
    command = typer.main.get_command(app)
    try:
        # Without standalone mode, Click returns an Exit's code instead of raising it.
        rv = command.main(args=args, prog_name="balprune", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except exit_types as exc:
        return exc.exit_code
    except abort_types:
        return _fail("aborted", 130)
    except usage_types as exc:
        ctx = getattr(exc, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        return _fail(f"{where}{exc.format_message()}", getattr(exc, "exit_code", 2))
    except Interrupted as exc:
        return _fail(exc.one_line(), exc.exit_code)
    except BalpruneError as exc:
        if debug or _STATE.get("debug"):
            raise
        return _fail(exc.one_line(), exc.exit_code)
    except BrokenPipeError:
        return 0
    except MemoryError:
        return _fail("out of memory; exclude large tensors or use a machine with more memory", 4)
    except Exception as exc:  # a bug: one line, a code, and the way to get the traceback
        if debug or _STATE.get("debug"):
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", EXIT_INTERNAL)


def entry_point() -> None:
    code = main()
    # The command is over (its outputs committed or removed, its line printed): a signal from here to
    # the process's end must not kill it with the signal's status, which would say "interrupted" about
    # work that completed.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)
