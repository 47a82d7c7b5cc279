"""What every command does before its own work: read the input, load the model(s), prefill a beam
(or, with two or more models, an ensemble of beams).

Errors are :class:`CliError` (one line on stderr, an exit code); arguments and files are checked
before the (slow) model load. Not handled here: the commands' own output.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
import time

from genlm_bytes import BeamParams, ByteBeamState
from genlm_bytes.ensemble import EnsembleState

# Not getLogger(__name__) for messages users see with -v: one name for the whole command line.
logger = logging.getLogger("genlm_bytes.cli")


class CliError(Exception):
    """A failure reported as one line on stderr, with exit code ``code``."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def one_line(e: BaseException) -> str:
    """``Type: first line of the message``, for reports."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


# --------------------------------------------------------------------------- input


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


# --------------------------------------------------------------------------- model


def check_model(model: str | None) -> None:
    """Catch a --model that is plainly not a model folder before the (slow) load."""
    if model is None or not os.path.exists(model):
        return  # the embedded model, a hub id, or a missing path (load_model says which)
    if not os.path.isdir(model):
        raise CliError(f"--model {model!r} is a file; pass a transformers model folder")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise CliError(f"--model {model!r} has no config.json: not a transformers model folder "
                       f"(one made by save_pretrained: config.json, weights, tokenizer files)")


def ensemble_kind(args: argparse.Namespace) -> str | None:
    """``--ensemble`` (default mixture) with two or more ``--model``; None for one model."""
    return (args.ensemble or "mixture") if len(args.model or ()) > 1 else None


def check_models(args: argparse.Namespace) -> None:
    """Every ``--model``, and ``--ensemble`` / ``--weights`` against their number, before the loads."""
    for model in args.model or [None]:
        check_model(model)
    kind = ensemble_kind(args)
    if kind is None:
        if args.ensemble is not None or args.weights is not None:
            raise CliError("--ensemble and --weights need two or more --model (the models to combine)")
        return
    from genlm_bytes.ensemble import check_weights

    try:
        check_weights(args.weights, len(args.model), kind)
    except (TypeError, ValueError) as e:
        raise CliError(f"--weights: {e}") from None


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


def load_lm(args: argparse.Namespace, model: str | None = None):
    """The model ``model`` (a name, a folder, or None: the embedded one) on ``--device`` (``--backend``)."""
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    from genlm_bytes.lm.default import load_model

    name = model or "the embedded model"
    t0 = time.perf_counter()
    try:
        if args.backend == "vllm":
            # vLLM logs to stdout by default: stdout carries the generated text only.
            os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
            if not args.verbose:
                os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
            lm = load_model(model, backend="vllm", **dict(args.engine_arg))
        else:
            lm = load_model(model, device=args.device)
    except Exception as e:  # any failure to load is reported as one line
        if args.verbose:
            logger.exception("loading %s failed", name)
        if isinstance(e, (ValueError, ImportError)) and str(e):  # the library's own messages name the model
            raise CliError(str(e).splitlines()[0]) from None
        raise CliError(f"cannot load {name}: {one_line(e)}") from None
    logger.info("loaded %s in %.1f s", name, time.perf_counter() - t0)
    return lm


def load_lms(args: argparse.Namespace) -> list:
    """Every model named by ``--model``, in order (default: the embedded one)."""
    return [load_lm(args, model) for model in args.model or [None]]


# --------------------------------------------------------------------------- the beam


async def prefill(lms: list, args: argparse.Namespace, data: bytes, on_progress=None):
    """A :class:`ByteBeamState` (``--beam``, ``--prune``, the model's EOS tokens) after ``data``; with
    two or more models, the :class:`EnsembleState` of their beams (``--ensemble``, ``--weights``).

    Returns:
        ``(state, dead_at)``: ``dead_at`` is the offset of the byte that made ``data`` impossible
        (the state has ``logZ = -inf``), else None.
    """
    params = [BeamParams(K=args.beam, prune_threshold=args.prune,
                         eos_tokens=tuple(lm.byte_vocab[t] or t for t in lm.eos_token_ids))  # an id: no bytes
              for lm in lms]
    n_done = 0

    def progress(n: int) -> None:  # called after each byte, the last surviving one or not
        nonlocal n_done
        n_done = n
        if on_progress is not None:
            on_progress(n)

    kind = ensemble_kind(args)
    if kind is None:
        state = await ByteBeamState.initial(lms[0], params[0], text_hint=data)
    else:
        state = await EnsembleState.initial(lms, params, args.weights, kind, text_hint=data)
    state = await state.prefill(data, progress=progress)
    return state, (None if state.logZ > -math.inf else n_done - 1)


async def chat_beam(lms: list, args: argparse.Namespace, messages: list[dict]):
    """A :class:`ByteBeamState` (``--beam``, ``--prune``) at the start of the reply to ``messages``
    (each model's own chat template; with two or more, their :class:`EnsembleState`); EOS is the
    chat template's end of turn (or the model's EOS)."""
    params = BeamParams(K=args.beam, prune_threshold=args.prune)
    try:
        beams = await asyncio.gather(*(ByteBeamState.initial(lm, params, chat=messages) for lm in lms))
    except ValueError as e:  # no tokenizer or no chat template
        raise CliError(f"--chat: {str(e).splitlines()[0]}") from None
    kind = ensemble_kind(args)
    return beams[0] if kind is None else EnsembleState(list(beams), args.weights, kind)


def impossible(data: bytes, dead_at: int, ensemble: bool = False) -> str:
    """Why ``data`` has probability 0, for messages."""
    if ensemble:
        return f"the ensemble gives byte {data[dead_at]:#04x} at offset {dead_at} probability 0"
    return f"no token sequence of the model covers byte {data[dead_at]:#04x} at offset {dead_at}"


def alive(state, dead_at: int | None, data: bytes):
    """``state``, or a CliError when ``data`` has probability 0."""
    if dead_at is not None:
        ensemble = isinstance(state, EnsembleState)
        raise CliError(f"the {'ensemble' if ensemble else 'model'} gives this text probability 0: "
                       f"{impossible(data, dead_at, ensemble)}", code=1)
    return state
