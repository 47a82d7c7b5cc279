"""Recurrent (mLSTM) vs transformer (LLaMA) backend as the context grows.

Question: what does one beam state cost in memory, and one byte of byte-level
beam decoding in time, when the context is long?

Two randomly initialized models of about the same size over the mock vocabulary
(EOS + 256 single bytes + 38 multi-byte tokens): an :class:`MLSTMLM` behind
:class:`AsyncMLSTM` and a :class:`LlamaTransformer` behind :class:`AsyncLlama`.
For each context length n (tokens of prose, one token per byte):

- ``state_bytes``: the model state of one context (mLSTM: C, n, m of every block;
  LLaMA: the KV cache of n tokens);
- ``ms_token_step``: one incremental model step (batch 1) after n tokens;
- ``ms_per_byte``: a :class:`ByteBeamState` (K=5, prune_threshold=0.05) started on the
  n-token context, then ``logp_next`` + one byte, for 32 bytes; the context's own
  forward is not timed (it is done once, in chunks, and put in the backend's cache).

Run: ``python benchmarks/bench_recurrent.py [--lengths 128 512 2048 8192] [--bytes 32]``.
Writes ``benchmarks/results/recurrent.json`` and prints a table. Timings are the
median of ``--repeats`` runs after one warm-up, with ``torch.set_num_threads(--threads)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from genlm_bytes.byte_lm import BeamParams, ByteBeamState
from genlm_bytes.lm.mock import default_mock_vocab
from genlm_bytes.models import (
    MLSTMLM,
    AsyncLlama,
    AsyncMLSTM,
    LlamaConfig,
    LlamaTransformer,
    MLSTMConfig,
)

HERE = Path(__file__).resolve().parent
PROSE = Path("/work/shared/bench/prose.txt")


def build_models(dim: int, blocks: int, vocab: list[bytes]):
    torch.manual_seed(0)
    mlstm = MLSTMLM(MLSTMConfig(vocab_size=len(vocab), embedding_dim=dim, num_blocks=blocks, num_heads=4,
                                chunk_size=64)).eval()
    llama = LlamaTransformer(LlamaConfig(vocab_size=len(vocab), embedding_dim=dim, num_blocks=blocks,
                                         head_dim=64)).eval()
    for model in (mlstm, llama):  # weights large enough that the beam has real choices to make
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.1)
    return mlstm, llama


def text_bytes(n: int) -> bytes:
    base = PROSE.read_bytes() if PROSE.exists() else b"The quick brown fox jumps over the lazy dog. "
    return (base * (n // len(base) + 2))[: n + 512]


@torch.no_grad()
def seed_context(lm, ctx: list[int], chunk: int = 512):
    """Run ``ctx`` through the model in chunks and put (state, log-probs) in the backend's cache."""
    state = None
    for a in range(0, len(ctx), chunk):
        logits, state = lm.model.forward_cached(torch.tensor([ctx[a : a + chunk]]), state)
    lm.cache.put(tuple(ctx), torch.log_softmax(logits[0, -1], -1), state)
    return state


@torch.no_grad()
def time_token_step(model, state, token: int, repeats: int) -> float:
    ids = torch.tensor([[token]])
    model.forward_cached(ids, state)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.forward_cached(ids, state)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


async def time_beam(lm, ctx: list[int], data: bytes, repeats: int) -> float:
    params = BeamParams(K=5, prune_threshold=0.05)
    times = []
    for r in range(repeats + 1):
        lm.clear_cache()
        seed_context(lm, ctx)
        t0 = time.perf_counter()
        beam = await ByteBeamState.initial(lm, params, initial_context=ctx)
        for b in data:
            await beam.logp_next()
            beam = await (beam.prune() << b)
        if r:  # the first run is the warm-up
            times.append((time.perf_counter() - t0) / len(data))
    return 1000 * statistics.median(times)


async def main(args) -> dict:
    torch.set_num_threads(args.threads)
    vocab = default_mock_vocab()
    mlstm, llama = build_models(args.dim, args.blocks, vocab)
    backends = {
        "mlstm": AsyncMLSTM(mlstm, vocab, initial_context=[0], eos_token_ids=[0]),
        "llama": AsyncLlama(llama, vocab, initial_context=[0], eos_token_ids=[0]),
    }
    params = {name: sum(p.numel() for p in lm.model.parameters()) for name, lm in backends.items()}
    # The first few dozen small matmuls of a process are several times slower (thread pool and
    # kernel warm-up): run every path once on a short context before timing anything.
    warm = [0] + [b + 1 for b in text_bytes(64)[:63]]
    for lm in backends.values():
        state = seed_context(lm, warm)
        time_token_step(lm.model, state, warm[-1], 50)
        await time_beam(lm, warm, b" warm-up", 1)
    rows = []
    for n in args.lengths:
        text = text_bytes(n)
        ctx = [0] + [b + 1 for b in text[: n - 1]]  # token id of byte b is b + 1 in the mock vocabulary
        data = text[n - 1 : n - 1 + args.bytes]
        for name, lm in backends.items():
            state = seed_context(lm, ctx)
            row = {
                "model": name, "context_tokens": n, "state_bytes": state.nbytes,
                "ms_token_step": time_token_step(lm.model, state, ctx[-1], args.repeats * 5),
                "ms_per_byte": await time_beam(lm, ctx, data, args.repeats),
            }
            rows.append(row)
            print(f"{name:>6} n={n:>6}  state {row['state_bytes'] / 1e6:9.3f} MB  "
                  f"step {row['ms_token_step']:7.2f} ms  beam {row['ms_per_byte']:7.2f} ms/byte", flush=True)
    return {
        "question": "memory per beam state and time per byte, recurrent (mLSTM) vs transformer (LLaMA)",
        "settings": {"embedding_dim": args.dim, "num_blocks": args.blocks, "vocab_size": len(vocab),
                     "parameters": params, "beam": {"K": 5, "prune_threshold": 0.05},
                     "bytes_timed": args.bytes, "repeats": args.repeats, "threads": args.threads,
                     "torch": torch.__version__, "machine": platform.machine(),
                     "load_average_1min_at_end": os.getloadavg()[0]},
        "rows": rows,
    }


def print_table(result: dict) -> None:
    print()
    print(f"parameters: {result['settings']['parameters']}")
    print(f"{'context':>8} | {'mLSTM state':>12} {'LLaMA KV':>12} | {'mLSTM step':>10} {'LLaMA step':>10} | "
          f"{'mLSTM beam':>10} {'LLaMA beam':>10}")
    print(f"{'tokens':>8} | {'MB':>12} {'MB':>12} | {'ms':>10} {'ms':>10} | {'ms/byte':>10} {'ms/byte':>10}")
    by = {(r["model"], r["context_tokens"]): r for r in result["rows"]}
    for n in sorted({r["context_tokens"] for r in result["rows"]}):
        m, t = by[("mlstm", n)], by[("llama", n)]
        print(f"{n:>8} | {m['state_bytes'] / 1e6:>12.3f} {t['state_bytes'] / 1e6:>12.3f} | "
              f"{m['ms_token_step']:>10.2f} {t['ms_token_step']:>10.2f} | "
              f"{m['ms_per_byte']:>10.2f} {t['ms_per_byte']:>10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 8192])
    parser.add_argument("--bytes", type=int, default=32, help="bytes decoded by the beam per measurement")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "recurrent.json")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
