"""Command line: ``python -m genlm_bytes`` or ``genlm-bytes``, with three subcommands.

- ``next TEXT``: the most likely next bytes after TEXT, and TEXT's log-probability;
- ``generate TEXT``: stream a continuation of TEXT to stdout (greedy or sampled;
  ``--regex`` constrains it to a pattern, ``--smc N`` samples it with N particles);
- ``score [FILE]``: log-probability and bits per byte of a file (or stdin).

TEXT is taken as the UTF-8 bytes of the argument, or read from stdin when it is
``-``. Every subcommand uses a :class:`~genlm_bytes.ByteBeamState` (``--beam``,
``--prune``) over the embedded SmolLM2-135M, or ``--model FOLDER``; the model's
EOS tokens end generation. Arguments and input files are checked before the
model loads.

Exit codes: 0 done; 2 bad input (arguments, files, a model that cannot be
loaded); 1 anything else, e.g. a TEXT the model gives probability 0 (``score``
reports that as ``logp_nats: null`` and exits 0); 130 interrupted (Ctrl-C:
``generate`` flushes what it has and prints its summary). Errors are one line
on stderr; ``-v`` logs the traceback too. Output of ``generate`` is the
continuation only, as UTF-8 text; bytes that are not valid UTF-8 appear as
``\\xNN``, and a multi-byte character is printed once it is complete. The
progress bar of ``score`` (inputs over 256 bytes) goes to stderr.

Not handled: chat templates, constraints other than one regex, several texts per call,
appending EOS when scoring (a score is that of the bytes as a prefix).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sys
import time

from genlm_bytes import BeamParams, ByteBeamState
from genlm_bytes.cli_utils import (
    Utf8Writer,
    bits_per_byte,
    format_next,
    format_score,
    int_at_least,
    prune_threshold,
    temperature,
    top_p,
)
from genlm_bytes.sampling import SamplingParams
from genlm_bytes.symbols import symbol_name

PROG = "genlm-bytes"
PROGRESS_MIN_BYTES = 256  # score shows a progress bar on stderr for longer inputs
# Not getLogger(__name__): under ``python -m`` that would be "__main__".
logger = logging.getLogger("genlm_bytes.cli")


class CliError(Exception):
    """A failure reported as one line on stderr, with exit code ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (and exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --------------------------------------------------------------------------- arguments


def engine_arg(text: str) -> tuple[str, object]:
    """``--engine-arg KEY=VALUE`` as ``(key, value)``."""
    from genlm_bytes.lm.vllm import parse_engine_arg

    try:
        return parse_engine_arg(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", metavar="PATH_OR_ID", default=None,
                        help="a local transformers model folder (or a hub id already cached); "
                             "default: the embedded SmolLM2-135M-Instruct")
    common.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    common.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                        help="hf: transformers in this process (default); vllm: vLLM's engine (GPU, "
                             "tensor/pipeline/data parallel; needs the vllm or vllm-cpu extra)")
    common.add_argument("--engine-arg", metavar="KEY=VALUE", type=engine_arg, action="append", default=[],
                        help="a vLLM engine argument, repeatable (--backend vllm), e.g. tensor_parallel_size=2")
    common.add_argument("--beam", metavar="K", type=int_at_least(1), default=5,
                        help="beam width: the most token covers kept (default: 5)")
    common.add_argument("--prune", metavar="P", type=prune_threshold, default=0.05,
                        help="drop covers below this fraction of the beam's mass; 0 keeps all "
                             "(default: 0.05)")
    common.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress (-v) or debug details (-vv) to stderr")

    parser = _Parser(prog=PROG, description="A token language model read as a byte-level language model.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{next,generate,score}",
                                parser_class=_Parser)

    p = sub.add_parser("next", parents=[common], help="the most likely next bytes after TEXT",
                       description="The most likely next bytes after TEXT, and TEXT's log-probability.")
    p.add_argument("text", metavar="TEXT", help="the text (its UTF-8 bytes), or - to read bytes from stdin")
    p.add_argument("--top", metavar="N", type=int_at_least(1), default=10,
                   help="how many bytes to list (default: 10)")

    p = sub.add_parser("generate", parents=[common], help="stream a continuation of TEXT",
                       description="Stream a continuation of TEXT to stdout until EOS, --stop or "
                                   "--max-bytes; then a summary line on stderr.")
    p.add_argument("text", metavar="TEXT", help="the prompt (its UTF-8 bytes), or - to read bytes from stdin")
    p.add_argument("--max-bytes", metavar="N", type=int_at_least(0), default=100,
                   help="the most bytes to generate (default: 100)")
    p.add_argument("--greedy", action="store_true", help="always take the most likely byte")
    p.add_argument("--temperature", metavar="T", type=temperature, default=None,
                   help="sampling temperature, 0 means greedy (default: 1)")
    p.add_argument("--top-k", metavar="K", type=int_at_least(1), default=None,
                   help="sample among the K most likely bytes")
    p.add_argument("--top-p", metavar="P", type=top_p, default=None,
                   help="sample among the most likely bytes holding mass P, in (0, 1]")
    p.add_argument("--seed", metavar="S", type=int_at_least(0), default=None,
                   help="random seed: the same seed gives the same bytes")
    p.add_argument("--stop", metavar="STR", default=None,
                   help="stop once the generated text contains STR (it is printed)")
    p.add_argument("--regex", metavar="PATTERN", default=None,
                   help="the generated text (after TEXT) must fully match PATTERN, a Python regex; "
                        "bytes that cannot lead to a match are never chosen, and EOS only where it matches")
    p.add_argument("--smc", metavar="N", type=int_at_least(1), default=None,
                   help="with --regex: run N particles (sequential Monte Carlo), which follow the model's "
                        "distribution given the pattern, and print one of their texts (not streamed)")

    p = sub.add_parser("score", parents=[common], help="log-probability and bits per byte of a file",
                       description="Log-probability (nats) and bits per byte of FILE's bytes (as a prefix: "
                                   "no EOS). Bits per byte compare across models with different tokenizers.")
    p.add_argument("file", metavar="FILE", nargs="?", default="-", help="the file, or - for stdin (default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    return parser


def read_text(arg: str) -> bytes:
    """The bytes of a TEXT argument: stdin for ``-``, else the argument's bytes as the shell gave them."""
    if arg == "-":
        return _read_stdin()
    return arg.encode("utf-8", "surrogateescape")  # undoes how Python decoded argv


def read_file(path: str) -> bytes:
    if path == "-":
        return _read_stdin()
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CliError(f"cannot read {path!r}: {e.strerror or e}") from None


def _read_stdin() -> bytes:
    if sys.stdin is None:
        raise CliError("stdin is closed: pass the text as an argument")
    stream = getattr(sys.stdin, "buffer", None)
    return stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")


def check_model(model: str | None) -> None:
    """Catch a --model that is plainly not a model folder before the (slow) load."""
    if model is None or not os.path.exists(model):
        return  # the embedded model, a hub id, or a missing path (load_model says which)
    if not os.path.isdir(model):
        raise CliError(f"--model {model!r} is a file; pass a transformers model folder")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise CliError(f"--model {model!r} has no config.json: not a transformers model folder "
                       f"(one made by save_pretrained: config.json, weights, tokenizer files)")


def check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise CliError(f"--device {device!r} is not a torch device (try cpu or cuda)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")


def check_backend(args: argparse.Namespace) -> None:
    if args.engine_arg and args.backend != "vllm":
        raise CliError("--engine-arg is for --backend vllm")
    if args.backend == "vllm" and args.device is not None:
        raise CliError("--device is for --backend hf: vLLM picks its platform (CUDA, else its CPU build)")


# --------------------------------------------------------------------------- model


def load_lm(args: argparse.Namespace):
    """The model named by ``--model`` (default: the embedded one) on ``--device``."""
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    from genlm_bytes.lm.default import load_model

    name = args.model or "the embedded model"
    t0 = time.perf_counter()
    try:
        if args.backend == "vllm":
            # vLLM logs to stdout by default: stdout carries the generated text only.
            os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
            if not args.verbose:
                os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
            lm = load_model(args.model, device=args.device, backend="vllm", **dict(args.engine_arg))
        else:
            lm = load_model(args.model, device=args.device)
    except Exception as e:  # any failure to load is reported as one line
        if args.verbose:
            logger.exception("loading %s failed", name)
        if isinstance(e, (ValueError, ImportError)) and str(e):  # the library's own messages name the model
            raise CliError(str(e).splitlines()[0]) from None
        raise CliError(f"cannot load {name}: {_one_line(e)}") from None
    logger.info("loaded %s in %.1f s", name, time.perf_counter() - t0)
    return lm


async def prefill(lm, args: argparse.Namespace, data: bytes, on_progress=None):
    """A :class:`ByteBeamState` (``--beam``, ``--prune``, the model's EOS tokens) after ``data``.

    Returns:
        ``(beam, dead_at)``: ``dead_at`` is the offset of the byte no cover survived (the
        model gives ``data`` probability 0; the beam is empty), else None.
    """
    eos = tuple(lm.byte_vocab[t] or t for t in lm.eos_token_ids)  # an id when the token has no bytes
    params = BeamParams(K=args.beam, prune_threshold=args.prune, eos_tokens=eos)
    n_done = 0

    def progress(n: int) -> None:  # called after each byte, the last surviving one or not
        nonlocal n_done
        n_done = n
        if on_progress is not None:
            on_progress(n)

    beam = await (await ByteBeamState.initial(lm, params, text_hint=data)).prefill(data, progress=progress)
    return beam, (None if beam.states else n_done - 1)


def impossible(data: bytes, dead_at: int) -> str:
    """Why ``data`` has probability 0, for messages."""
    return f"no token sequence of the model covers byte {data[dead_at]:#04x} at offset {dead_at}"


def _alive(beam, dead_at: int | None, data: bytes):
    """``beam``, or a CliError when ``data`` has probability 0."""
    if dead_at is not None:
        raise CliError(f"the model gives this text probability 0: {impossible(data, dead_at)}", code=1)
    return beam


# --------------------------------------------------------------------------- next


def cmd_next(args: argparse.Namespace) -> int:
    text = read_text(args.text)
    lm = load_lm(args)

    async def run():
        beam = _alive(*await prefill(lm, args, text), text)
        return beam.logZ, await beam.logp_next()

    logZ, logp = asyncio.run(run())
    top = [(symbol_name(sym), p) for sym, p in logp.top(args.top)]
    print(format_next(logZ, len(text), top))
    return 0


# --------------------------------------------------------------------------- generate


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
            raise CliError(f"--greedy cannot be combined with {', '.join(given)} (greedy takes the "
                           f"most likely byte)")
        return None
    if args.temperature == 0:
        return None
    try:
        return SamplingParams(temperature=1.0 if args.temperature is None else args.temperature,
                              top_k=args.top_k, top_p=args.top_p)
    except (TypeError, ValueError) as e:
        raise CliError(str(e)) from None


def regex_constraint(args: argparse.Namespace):
    """The ``--regex`` constraint (None without it), checked with ``--smc`` before the model loads."""
    if args.smc is not None:
        if args.regex is None:
            raise CliError("--smc needs --regex (the pattern the particles are conditioned on)")
        given = ["--greedy"] * args.greedy + [flag for flag, v in (
            ("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p),
            ("--stop", args.stop)) if v is not None]
        if given:
            raise CliError(f"--smc cannot be combined with {', '.join(given)} (the particles sample from the "
                           f"model's own distribution and print once at the end)")
    if args.regex is None:
        return None
    try:
        from genlm_bytes.constraints import Regex
    except ImportError as e:
        raise CliError(f"--regex needs the `regex` package ({e}): pip install regex") from None
    try:
        return Regex(args.regex)
    except ValueError as e:
        raise CliError(f"--regex: {e}") from None


async def _generate_constrained(lm, args, prompt: bytes, params, constraint, on_byte, run: GenerationRun) -> None:
    """``--regex`` (and ``--smc``): generation that must match the pattern."""
    from genlm_bytes.constraints import ConstrainedState, ConstraintError
    from genlm_bytes.sampling import as_generator
    from genlm_bytes.smc import smc

    beam = _alive(*await prefill(lm, args, prompt), prompt)
    run.t_start = time.perf_counter()
    try:
        if args.smc is None:
            final, _ = await ConstrainedState(beam, constraint).generate(
                args.max_bytes, params, rng=args.seed, greedy=params is None, stream=on_byte)
            if final.finished:
                run.reason = "EOS" if final.ended else "--regex (complete, nothing more allowed)"
            else:
                run.reason = "--max-bytes (the text does not match --regex yet)"
            return
        gen = as_generator(args.seed)
        res = await smc(beam, constraint, args.smc, args.max_bytes, rng=gen)
    except ConstraintError as e:
        raise CliError(str(e), code=1) from None
    i = int(gen.choice(len(res.particles), p=res.weights))  # one text, drawn by weight
    for byte in res.particles[i].text:
        on_byte(byte)
    run.reason = (f"{'EOS' if res.particles[i].state.ended else '--regex'}; {args.smc} particles, "
                  f"{len(res.posterior())} distinct texts, log P(match) ~ {res.log_ml:.2f} nats")


class _StopString(Exception):
    """Raised from the stream callback once the output contains ``--stop``."""


async def _generate(lm, args, prompt: bytes, params, stop: bytes | None, writer: Utf8Writer,
                    run: GenerationRun, constraint=None) -> None:
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
            await _generate_constrained(lm, args, prompt, params, constraint, on_byte, run)
            return
        beam = _alive(*await prefill(lm, args, prompt), prompt)
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
        raise CliError("--stop must not be empty")
    stop = args.stop.encode("utf-8", "surrogateescape") if args.stop is not None else None
    constraint = regex_constraint(args)
    prompt = read_text(args.text)
    lm = load_lm(args)
    writer = Utf8Writer(sys.stdout)
    run = GenerationRun()
    code = 0
    try:
        asyncio.run(_generate(lm, args, prompt, params, stop, writer, run, constraint))
    except KeyboardInterrupt:
        run.reason, code = "Ctrl-C", 130
    writer.close()
    if writer.last_char not in ("", "\n") and sys.stdout.isatty():
        print(flush=True)  # so the summary (and the shell prompt) start on a line of their own
    print(run.summary(), file=sys.stderr)
    return code


# --------------------------------------------------------------------------- score


def cmd_score(args: argparse.Namespace) -> int:
    data = read_file(args.file)
    lm = load_lm(args)
    show_bar = len(data) > PROGRESS_MIN_BYTES
    bar = None
    if show_bar:
        from tqdm import tqdm

        # On a terminal the bar redraws in place; piped, it writes a line every few seconds.
        tty = sys.stderr.isatty()
        bar = tqdm(total=len(data), unit="B", unit_scale=True, desc="scoring", file=sys.stderr, leave=False,
                   mininterval=0.1 if tty else 5.0, ascii=not tty)

    def progress(n_done: int) -> None:
        bar.update(n_done - bar.n)

    t0 = time.perf_counter()
    try:
        beam, dead_at = asyncio.run(prefill(lm, args, data, progress if bar is not None else None))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    # None: probability 0 (JSON has no -inf). The empty string has probability 1 exactly.
    logp = None if dead_at is not None else beam.logZ if data else 0.0
    result = {"logp_nats": logp, "bits_per_byte": None if logp is None else bits_per_byte(logp, len(data)),
              "n_bytes": len(data), "seconds": seconds, "zero_probability_at": dead_at,
              "model": args.model or "embedded:SmolLM2-135M-Instruct", "beam": args.beam, "prune": args.prune}
    if dead_at is not None:
        print(f"{PROG}: warning: probability 0: {impossible(data, dead_at)}", file=sys.stderr)
    print(json.dumps(result) if args.json else format_score(result))
    return 0


# --------------------------------------------------------------------------- main

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
        check_model(args.model)
        check_device(args.device)
        check_backend(args)
        return COMMANDS[args.command](args)
    except CliError as e:
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
        print(f"{PROG}: error: {_one_line(e)} (run with -v for details)", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _silence_stdout() -> None:
    # Python would report the broken pipe again when flushing stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
