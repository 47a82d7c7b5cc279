"""``genlm-bytes score [FILE]``: log-probability (nats) and bits per byte of a file's bytes."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from genlm_bytes.cli import session
from genlm_bytes.cli.args import PROG
from genlm_bytes.cli.format import bits_per_byte, format_score

PROGRESS_MIN_BYTES = 256  # longer inputs show a progress bar on stderr (shorter ones finish at once)


def _progress_bar(n_bytes: int):
    """A tqdm bar on stderr: redrawn in place on a terminal, a line every few seconds when piped."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=n_bytes, unit="B", unit_scale=True, desc="scoring", file=sys.stderr, leave=False,
                mininterval=0.1 if tty else 5.0, ascii=not tty)


def cmd_score(args: argparse.Namespace) -> int:
    data = session.read_file(args.file)
    lms = session.load_lms(args)
    bar = _progress_bar(len(data)) if len(data) > PROGRESS_MIN_BYTES else None

    def progress(n_done: int) -> None:
        bar.update(n_done - bar.n)

    t0 = time.perf_counter()
    try:
        state, dead_at = asyncio.run(session.prefill(lms, args, data, progress if bar is not None else None))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    # None: probability 0 (JSON has no -inf). The empty string has probability 1 exactly.
    logp = None if dead_at is not None else state.logZ if data else 0.0
    result = {"logp_nats": logp, "bits_per_byte": None if logp is None else bits_per_byte(logp, len(data)),
              "n_bytes": len(data), "seconds": seconds, "zero_probability_at": dead_at,
              "model": ",".join(args.model) if args.model else "embedded:SmolLM2-135M-Instruct",
              "beam": args.beam, "prune": args.prune}
    kind = session.ensemble_kind(args)
    if kind is not None:
        result.update(ensemble=kind, weights=[float(w) for w in state.weights])
    if dead_at is not None:
        why = session.impossible(data, dead_at, kind is not None)
        print(f"{PROG}: warning: probability 0: {why}", file=sys.stderr)
    print(json.dumps(result) if args.json else format_score(result))
    return 0
