"""Output of the command line: numbers, reports and UTF-8 streaming. Nothing here loads a model.

Not handled here: argument parsing (:mod:`genlm_bytes.cli.args`), the commands themselves.
"""

from __future__ import annotations

import codecs
import math
from typing import TextIO

LN2 = math.log(2)


# --------------------------------------------------------------------------- numbers


def bits_per_byte(logp_nats: float, n_bytes: int) -> float | None:
    """``-logp / ln 2 / n_bytes``: comparable across models with different tokenizers.

    None for an empty input.

    >>> bits_per_byte(-8 * math.log(2), 4)
    2.0
    """
    if n_bytes == 0:
        return None
    return -logp_nats / LN2 / n_bytes


def format_next(logp_text: float, n_bytes: int, top: list[tuple[str, float]]) -> str:
    """The report of ``next``: the text's log-probability, then one ranked line per symbol.

    Args:
        logp_text: natural-log probability of the text.
        n_bytes: its length in bytes.
        top: ``(readable name, probability)`` pairs, most likely first.

    >>> print(format_next(-1.5, 3, [("b'd'", 0.75), ("EOS", 0.25)]))
    log P(text) = -1.5000 nats (3 bytes, 0.7213 bits/byte)
     1  b'd'      0.750000
     2  EOS       0.250000
    """
    bpb = bits_per_byte(logp_text, n_bytes)
    per = f", {bpb:.4f} bits/byte" if bpb is not None else ""
    lines = [f"log P(text) = {logp_text:.4f} nats ({n_bytes} bytes{per})"]
    width = max([8] + [len(name) for name, _ in top])
    for rank, (name, p) in enumerate(top, 1):
        lines.append(f"{rank:2d}  {name:<{width}}  {p:.6f}")
    return "\n".join(lines)


def format_score(result: dict) -> str:
    """The human-readable report of ``score`` (see ``cmd_score`` in ``__main__`` for the keys).

    ``logp_nats`` None means probability 0.

    >>> print(format_score({"logp_nats": -4.0, "bits_per_byte": 1.4427, "n_bytes": 4, "seconds": 0.5}))
    log-probability  -4.0000 nats
    bits per byte    1.4427
    bytes            4
    time             0.50 s
    """
    logp, bpb = result["logp_nats"], result["bits_per_byte"]
    if logp is None:
        logp_text, bpb_text = "-inf nats (probability 0)", "inf"
    else:
        logp_text = f"{logp:.4f} nats"
        bpb_text = "n/a (empty input)" if bpb is None else f"{bpb:.4f}"
    return "\n".join([
        f"log-probability  {logp_text}",
        f"bits per byte    {bpb_text}",
        f"bytes            {result['n_bytes']}",
        f"time             {result['seconds']:.2f} s",
    ])


# --------------------------------------------------------------------------- streaming


class Utf8Writer:
    """Writes a byte stream to a text stream as soon as each character is complete.

    Valid UTF-8 is written as text; a multi-byte character is held until its last
    byte arrives; bytes that can never be valid UTF-8 are written as ``\\xNN``.
    Every write is flushed, so a reader sees the text as it is generated.

    >>> import io
    >>> out = io.StringIO(); w = Utf8Writer(out)
    >>> w.write(b"caf\\xc3"); out.getvalue()
    'caf'
    >>> w.write(b"\\xa9 \\xff"); out.getvalue()
    'café \\\\xff'
    """

    def __init__(self, out: TextIO):
        self.out = out
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
        self.last_char = ""  # the last character written (to know whether output ended a line)

    def write(self, data: bytes) -> None:
        self._emit(self._decoder.decode(data))

    def close(self) -> None:
        """Write what is still held (an incomplete character, as ``\\xNN`` escapes)."""
        self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, text: str) -> None:
        if not text:
            return
        encoding = getattr(self.out, "encoding", None) or "utf-8"
        try:
            self.out.write(text)
        except UnicodeEncodeError:  # a terminal that cannot show this character
            self.out.write(text.encode(encoding, "backslashreplace").decode(encoding))
        self.out.flush()
        self.last_char = text[-1]
