"""``genlm-bytes next TEXT``: the most likely next bytes after TEXT, and TEXT's log-probability."""

from __future__ import annotations

import argparse
import asyncio

from genlm_bytes.cli import session
from genlm_bytes.cli.format import format_next
from genlm_bytes.symbols import symbol_name


def cmd_next(args: argparse.Namespace) -> int:
    text = session.read_text(args.text)
    lms = session.load_lms(args)

    async def run():
        beam = session.alive(*await session.prefill(lms, args, text), text)
        return beam.logZ, await beam.logp_next()

    logZ, logp = asyncio.run(run())
    top = [(symbol_name(sym), p) for sym, p in logp.top(args.top)]
    print(format_next(logZ, len(text), top))
    return 0
