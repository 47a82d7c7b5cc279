"""The constraint and chat flags of ``generate``, turned into library objects before the model loads.

- ``--regex PATTERN``, ``--json-schema FILE|JSON``, ``--grammar FILE`` (at most one): a
  :class:`~genlm_bytes.constraints.Constraint`; a bad pattern, schema or grammar is a
  :class:`~genlm_bytes.cli.session.CliError` naming the flag (exit 2).
- ``--chat MESSAGE [--system TEXT]``: the messages of a chat prompt (the reply is generated
  after the model's chat template).

Not handled: several constraints at once (intersect them in Python: ``a & b``), several chat
turns (use ``ByteBeamState.initial(lm, params, chat=[...])``).
"""

from __future__ import annotations

import argparse
import os

from genlm_bytes.cli.session import CliError, read_file

#: (flag, argparse dest) of the constraint flags.
CONSTRAINT_FLAGS = (("--regex", "regex"), ("--json-schema", "json_schema"), ("--grammar", "grammar"))


def constraint_flag(args: argparse.Namespace) -> str | None:
    """The one constraint flag given (None: none); a CliError for several."""
    given = [flag for flag, dest in CONSTRAINT_FLAGS if getattr(args, dest) is not None]
    if len(given) > 1:
        raise CliError(f"{' and '.join(given)} cannot be combined: give one constraint")
    return given[0] if given else None


def _schema_text(value: str) -> str:
    """The JSON text of ``--json-schema``: a file's content, or the argument itself."""
    if os.path.isfile(value):
        return _utf8(read_file(value), "--json-schema", value)
    if value.lstrip().startswith(("{", "true", "false")):
        return value
    raise CliError(f"--json-schema {value!r} is neither a file nor JSON text (e.g. '{{\"type\": \"integer\"}}')")


def _utf8(data: bytes, flag: str, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"{flag} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def build_constraint(args: argparse.Namespace):
    """``(constraint, flag)`` from the constraint flags, or ``(None, None)`` without one."""
    flag = constraint_flag(args)
    if flag is None:
        return None, None
    from genlm_bytes.constraints import Grammar, JsonSchema, Regex

    try:
        if flag == "--regex":
            return Regex(args.regex), flag
        if flag == "--json-schema":
            return JsonSchema(_schema_text(args.json_schema)), flag
        return Grammar(_utf8(read_file(args.grammar), flag, args.grammar)), flag
    except (ValueError, TypeError) as e:
        raise CliError(f"{flag}: {str(e).splitlines()[0]}") from None


def chat_messages(args: argparse.Namespace) -> list[dict] | None:
    """The chat of ``--chat`` / ``--system`` (None without ``--chat``); checks TEXT is given otherwise."""
    if args.chat is None:
        if args.system is not None:
            raise CliError("--system needs --chat (it is the system message of the chat)")
        if args.text is None:
            raise CliError("give TEXT (a prompt to continue) or --chat MESSAGE (a message to reply to)")
        return None
    if args.text is not None:
        raise CliError("give TEXT or --chat MESSAGE, not both (with --chat the reply follows the chat template)")
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    return [*system, {"role": "user", "content": args.chat}]
