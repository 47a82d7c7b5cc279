"""Token-level generation from an AsyncLM: :func:`generate_tokens` and :func:`generate`.

Every step sends the live sequences to the model as one
``batch_next_token_logprobs`` call (the backend batches them and reuses each
sequence's KV cache) and picks one token per row with the samplers of
:mod:`genlm_bytes.sampling`. The rows of a step are the live sequences in batch
order, so a sequence's draws depend on the batch it is in (as with ``model.generate``).

Example:
    >>> from genlm_bytes import MockLM
    >>> seqs = generate_sync(MockLM(), [[0, 72, 105], [0, 72]], max_new_tokens=4, top_p=0.9, rng=0)
    >>> seqs.shape[0], seqs.shape[1] <= 3 + 4
    (2, True)

Not handled here: beam search, repetition penalties, stop strings. Byte-level
generation is :meth:`genlm_bytes.StatefulByteLM.sample`.
"""

from __future__ import annotations

import asyncio
import logging
import numbers
from collections.abc import Callable, Sequence
from typing import TypedDict

import numpy as np
import torch

from genlm_bytes.lm.base import AsyncLM, _no_running_loop, check_token_ids
from genlm_bytes.sampling import (
    RngLike,
    SamplingParams,
    _argmax,
    _categorical,
    as_generator,
    temperature_sampling,
)

logger = logging.getLogger(__name__)

#: ``fn(logprobs (A, V), rng) -> tokens (A,)``: how :func:`generate_tokens` picks each token.
TokenSampleFn = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]


def _prefixes(tokens, mask, vocab_size: int, tokens_name: str, mask_name: str) -> list[list[int]]:
    """The real tokens of each row: a list of ``B`` non-empty lists of ints."""
    if isinstance(tokens, (torch.Tensor, np.ndarray)):
        arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise ValueError(f"{tokens_name} must have shape (B, L) or (L,), got {tuple(arr.shape)}")
        rows = [list(r) for r in arr]
    elif isinstance(tokens, Sequence) and not isinstance(tokens, (str, bytes, bytearray)):
        rows = [r.tolist() if isinstance(r, (np.ndarray, torch.Tensor))
                else list(r) if isinstance(r, Sequence) and not isinstance(r, (str, bytes)) else r
                for r in tokens]
        if rows and all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in rows):
            rows = [rows]  # one prompt given as a flat list of ids
        elif not all(isinstance(r, list) for r in rows):
            raise TypeError(f"{tokens_name} must be a (B, L) tensor/array, a list of token-id lists, "
                            f"or one list of token ids")
    else:
        raise TypeError(f"{tokens_name} must be a (B, L) tensor/array or a list of token-id lists, "
                        f"got {type(tokens).__name__}")
    if mask is not None:
        try:
            m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        except ValueError:
            raise ValueError(f"{mask_name} must be a rectangular (B, L) array of 0/1 or booleans") from None
        lengths = {len(r) for r in rows}
        shape = (len(rows), lengths.pop()) if len(lengths) == 1 else None
        if m.ndim == 1 and len(rows) == 1:
            m = m[None, :]
        if shape is None or m.shape != shape:
            given = (len(rows), "ragged") if shape is None else shape
            raise ValueError(f"{mask_name} has shape {tuple(m.shape)} but {tokens_name} has shape "
                             f"{given}; they must match")
        if m.dtype != np.bool_:
            if not np.isin(m, (0, 1)).all():
                raise ValueError(f"{mask_name} must hold only 0/1 or booleans")
            m = m.astype(bool)
        out = []
        for b, (row, mrow) in enumerate(zip(rows, m)):
            where = np.flatnonzero(mrow)
            if where.size == 0:
                raise ValueError(f"{mask_name}[{b}] marks no token: every sequence needs at least one "
                                 f"real token (e.g. the model's initial_context)")
            if where[-1] - where[0] + 1 != where.size:
                raise ValueError(f"{mask_name}[{b}] has gaps: the real tokens of a row must be one "
                                 f"contiguous run (left or right padding)")
            out.append(row[where[0]:where[-1] + 1])
        rows = out
    result = []
    for b, row in enumerate(rows):
        try:
            result.append(check_token_ids(row, vocab_size))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{tokens_name}[{b}]: {e}") from None
    return result


def _check_lm(lm) -> None:
    if not isinstance(lm, AsyncLM):
        raise TypeError(f"lm must be an AsyncLM, got {type(lm).__name__}")


async def _decode(lm: AsyncLM, prefixes: list[list[int]], budgets: list[int], stop_ids: frozenset[int],
                  choose) -> list[list[tuple]]:
    """Extend every prefix until it emits a stop id or has used its budget of new tokens.

    All live sequences are stepped together: one ``lm.batch_next_token_logprobs``
    call per step (the backend batches them and reuses each sequence's KV cache).
    ``choose(logps (A, V)) -> list of A tuples (token, *extras)``.

    Returns:
        for each sequence, the list of ``(token, *extras)`` it generated.
    """
    seqs = [list(p) for p in prefixes]
    out: list[list[tuple]] = [[] for _ in prefixes]
    live = [i for i, n in enumerate(budgets) if n > 0]
    steps = 0
    while live:
        logps = await lm.batch_next_token_logprobs([list(seqs[i]) for i in live])  # (A, V)
        if tuple(logps.shape) != (len(live), lm.vocab_size):
            raise RuntimeError(f"{type(lm).__name__}.batch_next_token_logprobs returned shape "
                               f"{tuple(logps.shape)}, expected ({len(live)}, {lm.vocab_size})")
        picks = choose(logps)
        still = []
        for i, pick in zip(live, picks):
            seqs[i].append(pick[0])
            out[i].append(pick)
            if pick[0] not in stop_ids and len(out[i]) < budgets[i]:
                still.append(i)
        live = still
        steps += 1
    logger.debug("decoded %d sequences in %d steps", len(prefixes), steps)
    return out


def _check_max(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


async def generate_tokens(lm: AsyncLM, prefix_tokens, prefix_mask=None, max_length: int = 2048,
                          eod_token_id: int = -1, token_sample_fn: TokenSampleFn = temperature_sampling,
                          rng: RngLike = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue a batch of prefixes of different lengths up to ``max_length`` tokens each.

    Args:
        lm: the model.
        prefix_tokens: int ``(B, L)`` tensor/array, or a list of ``B`` token-id lists
            (ragged allowed when ``prefix_mask`` is None), or one list of ids (``B = 1``).
        prefix_mask: bool or 0/1 ``(B, L)``, True on real prefix tokens; the real tokens
            of a row must be one contiguous run (left or right padding both work).
            None: every token is real.
        max_length: total length (prefix + generated) of every output row; must be at
            least the longest prefix.
        eod_token_id: when ``>= 0``, a sequence stops after producing it, and generation
            stops as soon as every sequence has. ``-1``: always run to ``max_length``.
        token_sample_fn: ``fn(logprobs (A, V) float, rng: np.random.Generator) -> (A,)``
            token ids, e.g. :func:`temperature_sampling`, :func:`greedy_sampling`,
            ``functools.partial(temperature_sampling, temperature=0.7)`` or
            ``SamplingParams(...).sample``. The rows are normalized log-probs.
        rng: ``None``, an int seed or a ``np.random.Generator``.

    Returns:
        ``(tokens, valid)``: ``tokens`` int64 ``(B, max_length)``, each row left-aligned:
        its real prefix tokens, then the generated ones; ``valid`` bool
        ``(B, max_length)``, True on the prefix and on generated tokens up to and
        including the first EOD. Invalid slots hold ``eod_token_id`` (0 when it is -1).
    """
    _check_lm(lm)
    max_length = _check_max("max_length", max_length)
    if isinstance(eod_token_id, bool) or not isinstance(eod_token_id, numbers.Integral) \
            or not -1 <= eod_token_id < lm.vocab_size:
        raise ValueError(f"eod_token_id must be -1 (off) or a token id below {lm.vocab_size}, "
                         f"got {eod_token_id!r}")
    if not callable(token_sample_fn):
        raise TypeError(f"token_sample_fn must be callable, got {type(token_sample_fn).__name__}")
    prefixes = _prefixes(prefix_tokens, prefix_mask, lm.vocab_size, "prefix_tokens", "prefix_mask")
    longest = max((len(p) for p in prefixes), default=0)
    if longest > max_length:
        raise ValueError(f"max_length={max_length} is shorter than the longest prefix ({longest} tokens)")
    gen = as_generator(rng)

    def choose(logps: torch.Tensor) -> list[tuple[int]]:
        toks = torch.as_tensor(token_sample_fn(logps, gen)).reshape(-1).tolist()  # (A,)
        if len(toks) != logps.shape[0] or not all(isinstance(t, int) and 0 <= t < lm.vocab_size
                                                  for t in toks):
            raise ValueError(f"token_sample_fn returned {toks!r} for {logps.shape[0]} rows; expected "
                             f"{logps.shape[0]} token ids in 0..{lm.vocab_size - 1}")
        return [(t,) for t in toks]

    stop = frozenset([eod_token_id]) if eod_token_id >= 0 else frozenset()
    new = await _decode(lm, prefixes, [max_length - len(p) for p in prefixes], stop, choose)
    B = len(prefixes)
    tokens = torch.full((B, max_length), max(eod_token_id, 0), dtype=torch.long)  # (B, max_length)
    valid = torch.zeros((B, max_length), dtype=torch.bool)  # (B, max_length)
    for b, (p, g) in enumerate(zip(prefixes, new)):
        row = p + [t for t, in g]
        tokens[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        valid[b, :len(row)] = True
    return tokens, valid


class GenerateOutput(TypedDict):
    """What :func:`generate` returns with ``return_dict=True``.

    Attributes:
        sequences: int64 ``(B, P + T)``: the layout of ``model.generate`` on left-padded
            input. ``P`` is the longest prompt, ``T`` the most tokens any row generated;
            each prompt is right-aligned in the first ``P`` columns (left padding), the
            generated tokens follow, and a row that stopped early is padded.
        attention_mask: int64 ``(B, P + T)``, 1 on prompt and generated tokens, 0 on padding.
        scores: float64 ``(B, T)``, log-probability of each generated token under the
            distribution it was drawn from (after temperature and filters; 0 for greedy).
        logprobs: float64 ``(B, T)``, the model's own log-probability of each generated
            token (temperature 1, no filters).
        Both are 0 after a row has stopped, so a row's sum is its total.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    scores: torch.Tensor
    logprobs: torch.Tensor


async def generate(lm: AsyncLM, input_ids, max_new_tokens: int, do_sample: bool = True,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   min_p: float | None = None, rng: RngLike = None, return_dict: bool = False, *,
                   attention_mask=None, eos_token_id: int | Sequence[int] | None = None,
                   pad_token_id: int | None = None) -> torch.Tensor | GenerateOutput:
    """Sample (or greedily decode) continuations of a batch of prompts, like ``model.generate``.

    Args:
        lm: the model.
        input_ids: int ``(B, L)`` tensor/array (with ``attention_mask`` for padded rows),
            a list of ``B`` token-id lists of any lengths, or one list of ids (``B = 1``).
        max_new_tokens: ``>= 0``, the most tokens added to each prompt.
        do_sample: False: argmax at every step.
        temperature, top_k, top_p, min_p: as in :class:`SamplingParams`.
        rng: ``None``, an int seed or a ``np.random.Generator``.
        return_dict: return a :class:`GenerateOutput` instead of the sequences alone.
        attention_mask: 0/1 ``(B, L)``, 1 on real prompt tokens (one contiguous run per row).
        eos_token_id: id(s) that end a sequence; default ``lm.eos_token_ids``; ``[]`` never stops.
        pad_token_id: filler for padding; default the first eos id, else 0.

    Returns:
        ``sequences`` int64 ``(B, P + T)`` laid out as ``model.generate`` lays out a
        left-padded batch (see :class:`GenerateOutput`), or the full dict.
    """
    _check_lm(lm)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            do_sample=do_sample)
    max_new_tokens = _check_max("max_new_tokens", max_new_tokens)
    if eos_token_id is None:
        stop_ids = list(lm.eos_token_ids)
    else:
        one = isinstance(eos_token_id, numbers.Integral) and not isinstance(eos_token_id, bool)
        try:
            stop_ids = check_token_ids([eos_token_id] if one else eos_token_id, lm.vocab_size,
                                       allow_empty=True)
        except (TypeError, ValueError) as e:
            raise type(e)(f"eos_token_id={eos_token_id!r}: {e}") from None
    if pad_token_id is None:
        pad_token_id = stop_ids[0] if stop_ids else 0
    elif isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral):
        raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r}")
    prompts = _prefixes(input_ids, attention_mask, lm.vocab_size, "input_ids", "attention_mask")
    gen = None if params.is_greedy else as_generator(rng)

    def choose(logps: torch.Tensor) -> list[tuple[int, float, float]]:
        lp_sample = params.logprobs(logps)  # (A, V) the distribution sampled from
        toks = _argmax(lp_sample) if gen is None else _categorical(lp_sample, gen)  # (A,)
        idx = toks.unsqueeze(-1)  # (A, 1)
        scores = lp_sample.gather(-1, idx).squeeze(-1).tolist()  # (A,)
        raw = logps.gather(-1, idx).squeeze(-1).tolist()  # (A,)
        return list(zip(toks.tolist(), scores, raw))

    new = await _decode(lm, prompts, [max_new_tokens] * len(prompts), frozenset(stop_ids), choose)
    B = len(prompts)
    P = max((len(p) for p in prompts), default=0)
    T = max((len(g) for g in new), default=0)
    sequences = torch.full((B, P + T), pad_token_id, dtype=torch.long)  # (B, P + T)
    mask = torch.zeros((B, P + T), dtype=torch.long)  # (B, P + T)
    scores = torch.zeros((B, T), dtype=torch.float64)  # (B, T)
    logprobs = torch.zeros((B, T), dtype=torch.float64)  # (B, T)
    for b, (p, g) in enumerate(zip(prompts, new)):
        sequences[b, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        mask[b, P - len(p):P + len(g)] = 1
        if g:
            toks, sc, raw = zip(*g)
            sequences[b, P:P + len(g)] = torch.tensor(toks, dtype=torch.long)
            scores[b, :len(g)] = torch.tensor(sc, dtype=torch.float64)
            logprobs[b, :len(g)] = torch.tensor(raw, dtype=torch.float64)
    if not return_dict:
        return sequences
    return GenerateOutput(sequences=sequences, attention_mask=mask, scores=scores, logprobs=logprobs)


def generate_tokens_sync(lm: AsyncLM, prefix_tokens, prefix_mask=None, max_length: int = 2048,
                         eod_token_id: int = -1, token_sample_fn: TokenSampleFn = temperature_sampling,
                         rng: RngLike = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`generate_tokens` for code with no running event loop."""
    _no_running_loop("generate_tokens_sync", "generate_tokens")
    return asyncio.run(generate_tokens(lm, prefix_tokens, prefix_mask, max_length, eod_token_id,
                                       token_sample_fn, rng))


def generate_sync(lm: AsyncLM, input_ids, max_new_tokens: int, do_sample: bool = True,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None, rng: RngLike = None, return_dict: bool = False, *,
                  attention_mask=None, eos_token_id: int | Sequence[int] | None = None,
                  pad_token_id: int | None = None) -> torch.Tensor | GenerateOutput:
    """:func:`generate` for code with no running event loop."""
    _no_running_loop("generate_sync", "generate")
    return asyncio.run(generate(lm, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p,
                                min_p, rng, return_dict, attention_mask=attention_mask,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id))


__all__ = ["GenerateOutput", "TokenSampleFn", "generate", "generate_sync", "generate_tokens",
           "generate_tokens_sync"]
