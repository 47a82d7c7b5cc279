"""JSON-constrained greedy decoding vs unconstrained greedy, from the same state.

Question: what does a JSON Schema constraint cost per byte? The mask comes
from llguidance (one mask and one parser step per byte, no re-parse, no model
pass), so constrained greedy should run at >= 0.8x the bytes/s of
unconstrained greedy.

Workload: the embedded SmolLM2-135M, a :class:`ByteBeamState` (K=5,
prune_threshold=0.05) started with ``chat=`` on ``--question`` (the template's
end of turn is EOS). Each repetition runs, alternating so that load from other
processes hits both alike:

- ``free``: ``beam.greedy(b"", --max-bytes)`` (stops early at EOS);
- ``json``: ``ConstrainedState(beam, JsonSchema(schema)).generate(--max-bytes, greedy=True)``.

Before every run the backend's cache is cleared and the beam is rebuilt from
its covers, so no run reuses another's LM work. Reported per mode (medians):
bytes generated, seconds, bytes/s, model batches per byte; ``ratio`` = bytes/s
of json / bytes/s of free; and ``mask_us_per_byte``: the constraint's own
time (mask + parser step) per byte, replaying the JSON text through a fresh
cursor.

Run: ``python benchmarks/bench_constrained.py [--max-bytes 64] [--repeats 3] [--schema FILE|JSON]``.
Writes ``benchmarks/results/constrained.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import common
import torch

HERE = Path(__file__).resolve().parent

DEFAULT_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                   "city": {"type": "string", "maxLength": 24}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
DEFAULT_QUESTION = "Invent a person. Reply in JSON with name, age and city."


def load_schema(text: str | None) -> dict:
    if not text:
        return DEFAULT_SCHEMA
    path = Path(text)
    return json.loads(path.read_text() if path.is_file() else text)


def mask_us_per_byte(constraint, text: bytes, repeats: int = 20) -> float:
    """Microseconds per byte of the constraint alone: a fresh cursor's mask + step along ``text``."""
    best = float("inf")
    for _ in range(repeats):
        fresh = type(constraint)(constraint.schema)  # a new constraint: no cached cursors
        t0 = time.perf_counter()
        cur = fresh.cursor()
        for b in text:
            cur.mask()
            cur = cur.advance(b)
        cur.mask()
        best = min(best, time.perf_counter() - t0)
    return 1e6 * best / max(len(text), 1)


async def run(args) -> dict:
    from genlm_bytes import BeamParams, ByteBeamState, load_model
    from genlm_bytes.constraints import ConstrainedState, JsonSchema

    lm = load_model()
    schema = load_schema(args.schema)
    constraint = JsonSchema(schema)
    beam = await ByteBeamState.initial(lm, BeamParams(K=5, prune_threshold=0.05),
                                       chat=[{"role": "user", "content": args.question}])
    await beam.logp_next()  # resolve the initial cover once (not timed)

    async def once(mode: str) -> dict:
        lm.clear_cache()
        fresh = ByteBeamState(beam.states, beam.params)  # same covers, no cached extensions
        bat0 = lm.batcher.n_batches
        t0 = time.perf_counter()
        if mode == "free":
            out = await fresh.greedy(b"", args.max_bytes)
        else:
            _, out = await ConstrainedState(fresh, constraint).generate(args.max_bytes, greedy=True)
        secs = time.perf_counter() - t0
        n = max(len(out), 1)
        return {"bytes": len(out), "seconds": secs, "bytes_per_s": n / secs,
                "batches_per_byte": (lm.batcher.n_batches - bat0) / n, "text": out.decode("utf-8", "replace")}

    await once("free")  # warm-up
    runs: dict[str, list[dict]] = {"free": [], "json": []}
    for _ in range(args.repeats):
        for mode in ("free", "json"):
            runs[mode].append(await once(mode))
            r = runs[mode][-1]
            print(f"{mode:5s} {r['bytes']:4d} bytes {r['seconds']:7.2f} s {r['bytes_per_s']:7.1f} B/s "
                  f"{r['batches_per_byte']:.2f} batches/B", flush=True)
    rows = {}
    for mode, rs in runs.items():
        rows[mode] = {k: statistics.median(r[k] for r in rs) for k in ("bytes", "seconds", "bytes_per_s",
                                                                         "batches_per_byte")}
        rows[mode]["all_bytes_per_s"] = [r["bytes_per_s"] for r in rs]
        rows[mode]["example"] = rs[0]["text"]
    json_text = runs["json"][0]["text"].encode()
    return {
        "question": "bytes/s of JSON-constrained greedy vs unconstrained greedy from the same chat state",
        "settings": common.environment(torch.get_num_threads(), chat_question=args.question, schema=schema,
                                       max_bytes=args.max_bytes, repeats=args.repeats),
        "rows": rows,
        "ratio": rows["json"]["bytes_per_s"] / rows["free"]["bytes_per_s"],
        "mask_us_per_byte": mask_us_per_byte(constraint, json_text),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-bytes", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--question", default=DEFAULT_QUESTION)
    ap.add_argument("--schema", default=None, help="a JSON Schema file or JSON text (default: a small person)")
    ap.add_argument("--out", default=str(HERE / "results" / "constrained.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'mode':>5} {'bytes':>6} {'B/s':>8} {'batches/B':>10}")
    for mode, r in result["rows"].items():
        print(f"{mode:>5} {r['bytes']:6.0f} {r['bytes_per_s']:8.1f} {r['batches_per_byte']:10.2f}")
    print(f"ratio json/free = {result['ratio']:.2f}  (target >= 0.8); "
          f"constraint alone {result['mask_us_per_byte']:.1f} us/byte")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
