"""The entry point: parse, dispatch to a command, turn every failure into one line and an exit code."""

from __future__ import annotations

import logging
import os
import sys

from genlm_bytes.cli import session
from genlm_bytes.cli.args import PROG, build_parser
from genlm_bytes.cli.generate import cmd_generate
from genlm_bytes.cli.next import cmd_next
from genlm_bytes.cli.score import cmd_score

logger = logging.getLogger("genlm_bytes.cli")  # the command line's one logger name
COMMANDS = {"next": cmd_next, "generate": cmd_generate, "score": cmd_score}


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already reported
        return e.code if isinstance(e.code, int) else 0
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        session.check_models(args)
        session.check_device(args.device)
        session.check_backend(args)
        return COMMANDS[args.command](args)
    except session.CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): stop quietly
        _silence_stdout()
        return 1
    except Exception as e:  # one line for the user; the traceback with -v
        if args.verbose:
            logger.exception("unexpected error")
        print(f"{PROG}: error: {session.one_line(e)} (run with -v for details)", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    # Python would report the broken pipe again when flushing stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
