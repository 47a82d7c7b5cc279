"""The broad benchmark suites of issue 24 and how their results are summarized.

Two suites, written for these benchmarks (no text of them comes from elsewhere):

- ``data/prompts.json``: prompts of many kinds (prose, dialogue, chat-like, code in several
  languages, JSON, markup, lists and numbers, French, German, Spanish, Russian, Chinese,
  Japanese, mixed), each ``{"name", "kind", "text"}``; for greedy generation and concurrency;
- ``data/texts/``: texts of about 600 bytes to score (prose, a server log, a JSON record,
  code, a multilingual paragraph, Markdown, HTML), one file each; for prefill;
- ``data/prompts_heldout.json`` and ``data/texts_heldout/``: more of each, of other kinds
  (session 21 and 23), used to tune nothing: do the figures carry over to what no change
  was measured on? The held-out texts include identifiers (UUIDs, hashes, base64, hex
  trace ids), whose many segmentations make them the hardest kind to score.

A figure over a suite is never one prompt's: :func:`spread` gives the worst, the median
and the best of per-item ratios, naming the worst and the best items.

Not handled here: timing (see ``common.py``) and anything model-specific.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT_SUITE = HERE / "data" / "prompts.json"
TEXT_SUITE = HERE / "data" / "texts"
HELDOUT_TEXTS = HERE / "data" / "texts_heldout"
HELDOUT_PROMPTS = HERE / "data" / "prompts_heldout.json"


def load_prompts(path: str | Path = PROMPT_SUITE, limit: int | None = None) -> list[dict]:
    """The prompts of a suite file: ``[{"name", "kind", "text"}, ...]``, the first ``limit`` if given.

    The file holds ``{"prompts": [...]}`` or a bare list; an entry may also be a plain string
    (its name is then its position, its kind ``"-"``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt suite {path} not found")
    doc = json.loads(path.read_text(encoding="utf-8"))
    entries = doc["prompts"] if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list of prompts (or {{'prompts': [...]}})")
    out = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"name": f"prompt-{i}", "kind": "-", "text": e}
        if not isinstance(e, dict) or not isinstance(e.get("text"), str) or not e["text"]:
            raise ValueError(f"{path}: prompt {i} has no non-empty 'text'")
        out.append({"name": str(e.get("name", f"prompt-{i}")), "kind": str(e.get("kind", "-")),
                    "text": e["text"]})
    return out[:limit] if limit else out


def prompts_from_strings(texts: list[str]) -> list[dict]:
    """Prompts given on the command line, in the suite's format (named by their start)."""
    return [{"name": t[:24].replace("\n", "\\n"), "kind": "cli", "text": t} for t in texts]


def add_text_args(parser, name: str, repeats: int = 3) -> None:
    """The options of a script over the text suite: ``--texts`` (a folder), ``--limit`` (the
    first N texts, 0: all), ``--repeats`` and ``--name`` (``results/<name>.json``)."""
    parser.add_argument("--texts", default=str(TEXT_SUITE), help="a folder of texts (default: the suite)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N texts (smoke runs; 0: all)")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--name", default=name, help="JSON file name under benchmarks/results")


def check_text_args(parser, args) -> None:
    """``parser.error`` for options of :func:`add_text_args` out of range."""
    if args.repeats < 1 or args.limit < 0:
        parser.error("--repeats must be at least 1 and --limit 0 (all) or more")


def load_texts(folder: str | Path = TEXT_SUITE, limit: int | None = None) -> list[dict]:
    """The texts of a folder, sorted by file name: ``[{"name", "kind", "data": bytes}, ...]``.

    The kind is the file's extension (``txt``, ``log``, ``json``, ``py``, ...). Every text is
    scored against a forward pass over the tokenizer's encoding, which needs UTF-8 text: a file
    that is empty or not UTF-8 is skipped, with a line on stderr saying which and why (see
    :func:`unscorable`); a folder with no other text is a ``ValueError``.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")) \
        if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no texts in {folder}")
    out = []
    for p in files:
        data = p.read_bytes()
        why = unscorable(data)
        if why:
            print(f"skipped {p.name}: {why}", file=sys.stderr)
        else:
            out.append({"name": p.name, "kind": p.suffix.lstrip(".") or "-", "data": data})
    if not out:
        raise ValueError(f"no text in {folder} can be scored (each is empty or not UTF-8)")
    return out[:limit] if limit else out


def unscorable(data: bytes) -> str | None:
    """Why ``data`` cannot be a text of the suites (None if it can).

    >>> unscorable(b""), unscorable(b"caf\\xc3\\xa9"), unscorable(b"ab\\xff")
    ('empty', None, 'not UTF-8 (byte 2: invalid start byte)')
    """
    if not data:
        return "empty"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 (byte {e.start}: {e.reason})"
    return None


def spread(rows: list[dict], key: str, higher_is_better: bool) -> dict:
    """Worst, median and best of ``row[key]`` over ``rows``, with the names of the worst and best.

    >>> s = spread([{"name": "a", "x": 1.0}, {"name": "b", "x": 3.0}, {"name": "c", "x": 2.0}], "x", True)
    >>> (s["worst"], s["worst_name"], s["median"], s["best"], s["best_name"])
    (1.0, 'a', 2.0, 3.0, 'b')
    """
    vals = [r for r in rows if r.get(key) is not None]
    if not vals:
        return {"n": 0, "worst": None, "median": None, "best": None, "worst_name": None, "best_name": None}
    ordered = sorted(vals, key=lambda r: r[key], reverse=higher_is_better)  # best first
    return {"n": len(vals), "worst": ordered[-1][key], "worst_name": ordered[-1].get("name"),
            "median": statistics.median(r[key] for r in vals),
            "best": ordered[0][key], "best_name": ordered[0].get("name")}


def print_spread(label: str, s: dict, unit: str = "x") -> None:
    """One line: ``label: worst W (name), median M, best B (name) over n``."""
    if not s["n"]:
        print(f"{label}: no results")
        return
    print(f"{label}: worst {s['worst']:.2f}{unit} ({s['worst_name']}), median {s['median']:.2f}{unit}, "
          f"best {s['best']:.2f}{unit} ({s['best_name']}) over {s['n']}")
