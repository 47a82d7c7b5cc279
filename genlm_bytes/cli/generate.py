"""``genlm-bytes generate TEXT``: stream a continuation of TEXT (greedy, sampled, or constrained).

Not handled here: reading the prompt and loading the model (:mod:`genlm_bytes.cli.session`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time

from genlm_bytes.cli import constrain, session
from genlm_bytes.cli.args import PROG
from genlm_bytes.cli.format import Utf8Writer
from genlm_bytes.sampling import SamplingParams


@dataclasses.dataclass
class GenerationRun:
    """What ``generate`` has done so far (kept outside the coroutine so Ctrl-C can report it)."""

    n_bytes: int = 0
    reason: str = "--max-bytes"  # why it stopped
    t_start: float | None = None  # when the first byte was chosen (after the prompt)

    def summary(self) -> str:
        seconds = time.perf_counter() - self.t_start if self.t_start is not None else 0.0
        rate = f"{self.n_bytes / seconds:.1f}" if seconds > 0 else "n/a"
        return f"{PROG}: {self.n_bytes} bytes in {seconds:.2f} s ({rate} bytes/s), stopped by {self.reason}"


def sampling_params(args: argparse.Namespace):
    """None for greedy decoding, else the validated SamplingParams."""
    given = [flag for flag, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                  ("--top-p", args.top_p)) if v is not None]
    if args.greedy:
        if given:
            raise session.CliError(f"--greedy cannot be combined with {', '.join(given)} (greedy takes the "
                           f"most likely byte)")
        return None
    if args.temperature == 0:
        return None
    try:
        return SamplingParams(temperature=1.0 if args.temperature is None else args.temperature,
                              top_k=args.top_k, top_p=args.top_p)
    except (TypeError, ValueError) as e:
        raise session.CliError(str(e)) from None


def constraint_of(args: argparse.Namespace):
    """``(constraint, flag)`` of ``--regex`` / ``--json-schema`` / ``--grammar`` (``(None, None)``
    without one), checked with ``--smc`` before the model loads."""
    flag = constrain.constraint_flag(args)
    if args.smc is not None:
        if flag is None:
            raise session.CliError("--smc needs --regex, --json-schema or --grammar (the constraint the "
                                   "particles are conditioned on)")
        given = ["--greedy"] * args.greedy + [name for name, v in (
            ("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p),
            ("--stop", args.stop)) if v is not None]
        if given:
            raise session.CliError(f"--smc cannot be combined with {', '.join(given)} (the particles sample from the "
                           f"model's own distribution and print once at the end)")
    return constrain.build_constraint(args)


async def _start(lms, args, prompt: bytes, chat):
    """The beam generation starts from: after ``prompt``, or at the start of the reply to ``chat``."""
    if chat is not None:
        return await session.chat_beam(lms, args, chat)
    return session.alive(*await session.prefill(lms, args, prompt), prompt)


async def _generate_constrained(lms, args, prompt: bytes, params, constraint, on_byte, run: GenerationRun,
                                chat=None, flag: str = "--regex") -> None:
    """A constraint flag (and ``--smc``): generation that the constraint accepts."""
    from genlm_bytes.constraints import ConstrainedState, ConstraintError
    from genlm_bytes.sampling import as_generator
    from genlm_bytes.smc import smc

    beam = await _start(lms, args, prompt, chat)
    run.t_start = time.perf_counter()
    try:
        if args.smc is None:
            final, _ = await ConstrainedState(beam, constraint).generate(
                args.max_bytes, params, rng=args.seed, greedy=params is None, stream=on_byte)
            if final.finished:
                run.reason = "EOS" if final.ended else f"{flag} (complete, nothing more allowed)"
            else:
                run.reason = f"--max-bytes (the text does not satisfy {flag} yet)"
            return
        gen = as_generator(args.seed)
        res = await smc(beam, constraint, args.smc, args.max_bytes, rng=gen)
    except ConstraintError as e:
        raise session.CliError(str(e), code=1) from None
    i = int(gen.choice(len(res.particles), p=res.weights))  # one text, drawn by weight
    for byte in res.particles[i].text:
        on_byte(byte)
    run.reason = (f"{'EOS' if res.particles[i].state.ended else flag}; {args.smc} particles, "
                  f"{len(res.posterior())} distinct texts, log P(match) ~ {res.log_ml:.2f} nats")


class _StopString(Exception):
    """Raised from the stream callback once the output contains ``--stop``."""


async def _generate(lms, args, prompt: bytes, params, stop: bytes | None, writer: Utf8Writer,
                    run: GenerationRun, constraint=None, chat=None, flag: str | None = None) -> None:
    """Generate after ``prompt`` with :meth:`StatefulByteLM.sample`, writing each byte as it comes."""
    out = bytearray()

    def on_byte(byte: int) -> None:
        out.append(byte)
        writer.write(bytes([byte]))
        run.n_bytes += 1
        if stop is not None and out.endswith(stop):
            raise _StopString

    try:
        if constraint is not None:
            await _generate_constrained(lms, args, prompt, params, constraint, on_byte, run, chat, flag)
            return
        beam = await _start(lms, args, prompt, chat)
        run.t_start = time.perf_counter()
        await beam.sample(b"", args.max_bytes, params, rng=args.seed, greedy=params is None, stream=on_byte)
    except _StopString:
        run.reason = "--stop"
        return
    if run.n_bytes < args.max_bytes:
        run.reason = "EOS"


def cmd_generate(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    if args.stop == "":
        raise session.CliError("--stop must not be empty")
    stop = args.stop.encode("utf-8", "surrogateescape") if args.stop is not None else None
    chat = constrain.chat_messages(args)
    constraint, flag = constraint_of(args)
    prompt = session.read_text(args.text) if chat is None else b""
    lms = session.load_lms(args)
    writer = Utf8Writer(sys.stdout)
    run = GenerationRun()
    code = 0
    try:
        asyncio.run(_generate(lms, args, prompt, params, stop, writer, run, constraint, chat, flag))
    except KeyboardInterrupt:
        run.reason, code = "Ctrl-C", 130
    writer.close()
    if writer.last_char not in ("", "\n") and sys.stdout.isatty():
        print(flush=True)  # so the summary (and the shell prompt) start on a line of their own
    print(run.summary(), file=sys.stderr)
    return code
