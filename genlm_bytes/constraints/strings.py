"""StringSet: the generated text must be one of a fixed set of strings (a byte trie).

Every allowed byte leads to a node below which some string ends, so a
``StringSet`` never has dead ends. Strings given as ``str`` are UTF-8 encoded.

Example:
    >>> c = StringSet(["yes", "no", "not sure"])
    >>> [chr(b) for b in c.mask(b"no").nonzero()[0] if b < 256], c.is_complete(b"no")
    (['t'], True)

Not handled: case folding, Unicode normalization (pass every spelling you accept).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from genlm_bytes.constraints.base import Constraint
from genlm_bytes.symbols import EOS, N_SYMBOLS

_END = EOS  # key of the end marker in a trie node (never a byte)


class StringSet(Constraint):
    """Accepts exactly the given strings.

    Args:
        strings: ``bytes`` or ``str`` (UTF-8 encoded); at least one. The empty string is allowed.
    """

    def __init__(self, strings: Iterable[bytes | str]):
        super().__init__()
        if isinstance(strings, (str, bytes, bytearray)):
            raise TypeError("strings must be a collection of strings, e.g. ['yes', 'no'], not one string")
        self.root: dict = {}
        self.strings: frozenset[bytes] = frozenset()
        words = set()
        for s in strings:
            if isinstance(s, str):
                s = s.encode("utf-8")
            elif isinstance(s, (bytes, bytearray, memoryview)):
                s = bytes(s)
            else:
                raise TypeError(f"each string must be bytes or str, got {type(s).__name__}: {s!r}")
            words.add(s)
            node = self.root
            for b in s:
                node = node.setdefault(b, {})
            node[_END] = True
        if not words:
            raise ValueError("StringSet needs at least one string (an empty set allows nothing)")
        self.strings = frozenset(words)

    def _mask(self, prefix: bytes) -> np.ndarray:
        m = np.zeros(N_SYMBOLS, dtype=bool)
        node = self.root
        for b in prefix:
            node = node.get(b)
            if node is None:
                return m  # not a prefix of any string: nothing is allowed
        m[[k for k in node if k != _END]] = True
        m[EOS] = _END in node
        return m

    def __repr__(self) -> str:
        shown = sorted(self.strings)[:5]
        more = f", ... ({len(self.strings)} strings)" if len(self.strings) > 5 else ""
        return f"StringSet({shown!r}{more})"
