"""Command lines' user errors as one line, and their exit codes.

    if __name__ == "__main__":
        cli.run_absl(main)                        # absl programs (experiments.train, experiments.sample)
        sys.exit(cli.run(main))                   # argparse programs, with parser = cli.ArgumentParser(...)

A user error (a bad flag or config field, a missing file, a dataset not prepared) prints one line,
`error: <what was wrong and the fix>`, on stderr and exits with USER_ERROR; `--debug` on the command line
or MOE_JAX_DEBUG=1 in the environment shows the traceback instead. A user error is a ValueError or OSError
raised by this repository's own code (which validates its inputs and names the field or file); the same
exception types raised inside a library (JAX, orbax, ...) are unexpected and keep their traceback. Exit codes:
  0  done;  1  an unexpected error (a traceback: please report it);  2  a user error (USER_ERROR);
  75 preempted (PREEMPTED, sysexits' EX_TEMPFAIL): SIGTERM arrived, a checkpoint was written, and the
     same command resumes the run. A scheduler should restart it, e.g. a Kubernetes Job's
     podFailurePolicy rule {action: Ignore, onExitCodes: {operator: In, values: [75]}}.
  3  stopped by a routing alarm (STOPPED; config.health.stop_on_alarm): a checkpoint holds the step, and
     summary.json's `stopped` names the layer and the metric.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable

DEBUG_ENV = "MOE_JAX_DEBUG"
USER_ERROR = 2
PREEMPTED = 75
STOPPED = 3  # a routing alarm stopped the run (config.health.stop_on_alarm); its checkpoint is written
# ValueError: a bad value (config fields are validated into ValueErrors naming the field); OSError: a missing
# or unreadable file (FileNotFoundError names it).
USER_ERRORS = (ValueError, OSError)


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = ("moe_jax", "experiments", "configs", "benchmarks", "pallas_kernels")


def is_user_error(e: BaseException) -> bool:
    """A ValueError / OSError whose innermost frame is in this repository's packages (moe_jax, experiments,
    configs, benchmarks, pallas_kernels)."""
    if not isinstance(e, USER_ERRORS):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return True
    rel = os.path.relpath(os.path.abspath(tb.tb_frame.f_code.co_filename), _ROOT)
    return rel.split(os.sep)[0] in _OURS


def debug_requested(argv=None) -> bool:
    argv = sys.argv if argv is None else argv
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0") or "--debug" in argv or "--debug=true" in argv


def one_line(message: str) -> str:
    """The message on one line; an embedded traceback (ml_collections quotes one when a config file fails)
    is reduced to its last line, the exception itself."""
    text = str(message)
    if "Traceback (most recent call last)" in text:
        head, tail = text.split("Traceback (most recent call last)", 1)
        last = [line for line in tail.splitlines() if line.strip()][-1:]
        text = head + " " + " ".join(last)
    return " ".join(text.split())


def fail(message: str, code: int = USER_ERROR):
    """Prints `error: <message>` (one line) on stderr and exits with `code`."""
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(main: Callable[[], int | None]) -> int:
    """Calls `main()`; a user error becomes one line and USER_ERROR (unless --debug / MOE_JAX_DEBUG=1)."""
    try:
        return main() or 0
    except USER_ERRORS as e:
        if debug_requested() or not is_user_error(e):
            raise
        fail(str(e) or type(e).__name__)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a `--debug` flag and one-line errors (argparse prints the usage block first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")

    def error(self, message):
        fail(f"{self.prog}: {message} (--help lists the flags)")


def _unknown_override(error: AttributeError, argv) -> str:
    """ml_collections raises AttributeError("'key'\\nDid you mean \"keys\"...") for `--config.a.key=`."""
    text = str(error)
    key = re.search(r"([A-Za-z_]\w*)", text)
    close = re.search(r'Did you mean \\?"(\w+)\\?"', text)
    key = key.group(1) if key else "?"
    flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--") and "." in a.split("=")[0]
                 and key in a.split("=")[0][2:].split(".")), None)
    where = f"{flag}: " if flag else ""
    hint = f"; did you mean {close.group(1)}?" if close else ""
    return (f"{where}{key!r} is not a known field{hint} (--print_config lists the fields)")


def parse_absl_flags(argv):
    """absl's flag parsing with one-line errors (absl prints 'FATAL Flags parsing error' and a hint)."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if debug_requested(argv):
            raise
        hint = " (--helpshort lists the flags)" if isinstance(e, flags.UnrecognizedFlagError) else ""
        fail(f"{e}{hint}")
    except AttributeError as e:  # an unknown field in a --config.<section>.<field> override
        if debug_requested(argv):
            raise
        fail(_unknown_override(e, argv))
    except USER_ERRORS as e:
        if debug_requested(argv):
            raise
        fail(str(e))


def run_absl(main, flags_parser=parse_absl_flags) -> None:
    """`absl.app.run(main)` with a `--debug` flag, one-line flag errors and one-line user errors from main."""
    from absl import app, flags

    if "debug" not in flags.FLAGS:
        flags.DEFINE_bool("debug", False, f"Show the traceback of an error (or set {DEBUG_ENV}=1).")

    def guarded(argv):
        try:
            return main(argv)
        except USER_ERRORS as e:
            if debug_requested() or not is_user_error(e):
                raise
            fail(str(e) or type(e).__name__)

    app.run(guarded, flags_parser=flags_parser)
