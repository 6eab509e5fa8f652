"""Ctrl-C while the ddpm-fast command is still starting (importing torch takes seconds) ends like
Ctrl-C anywhere else in it: one line and exit status 130, no traceback (DESIGN §9, files).

Imported first by ddpm_fast/__init__.py, before anything heavy, so it imports nothing but the
standard library. It acts only when this process runs the command (the ddpm-fast script, or
python -m ddpm_fast.cli as torchrun starts it) and Python's own SIGINT handler is in place (a
process started with SIGINT ignored keeps ignoring it); cli.main hands SIGINT back to Python
once it can catch KeyboardInterrupt itself. A program that imports ddpm_fast is never affected.
"""
import os
import signal
import sys

MODULES = ("ddpm_fast.cli", "ddpm_fast.cli.__main__")
INTERRUPTED = "ddpm-fast: interrupted"


def running_the_command(argv: list[str]) -> bool:
    """Whether the interpreter's command line `argv` (sys.orig_argv) runs the ddpm-fast command."""
    args = iter(argv[1:])
    for arg in args:
        if arg in ("-X", "-W", "--check-hash-based-pycs"):  # options whose value is the next word
            next(args, None)
        elif arg == "-m" or arg.startswith("-m"):
            return (arg[2:] or next(args, "")) in MODULES
        elif not arg.startswith("-") or arg == "-c":
            return os.path.basename(arg) == "ddpm-fast"
    return False


def _interrupted(signum, frame):
    print(f"{INTERRUPTED} while starting: nothing was done", file=sys.stderr)
    raise SystemExit(130)


def started() -> None:
    """The command can catch KeyboardInterrupt now: SIGINT back to Python's handler."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)


if running_the_command(getattr(sys, "orig_argv", sys.argv)) and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted)
