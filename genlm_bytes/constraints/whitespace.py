"""A bound on runs of whitespace between JSON tokens, for llguidance versions that ignore it.

llguidance 1.9 bounds JSON whitespace through the ``whitespace_pattern``
option; 1.7 (the version vLLM 0.32 pins) ignores that option, so there a model
could write spaces forever. :class:`WhitespaceRunCursor` enforces the same
bound beside the grammar: outside JSON strings, a run of whitespace holds at
most one line break (``\\n`` or ``\\r\\n``), which comes first, and at most
``limit`` spaces or tabs. It only ever forbids whitespace, which JSON never
requires, so combined with a JSON grammar it adds no dead end.

Example:
    >>> c = WhitespaceRunCursor(2)
    >>> for b in b'{"a b   ":': c = c.advance(b)   # spaces inside a string do not count
    >>> for b in b"  ": c = c.advance(b)
    >>> bool(c.mask()[ord(" ")]), bool(c.mask()[ord("1")])
    (False, True)

Not handled: anything but whitespace (the grammar checks the JSON itself).
"""

from __future__ import annotations

import functools

import numpy as np

from genlm_bytes.constraints.base import Cursor
from genlm_bytes.constraints.engine import llguidance_module, new_matcher
from genlm_bytes.symbols import EOT, N_SYMBOLS

_SPACE, _TAB, _LF, _CR, _QUOTE, _BACKSLASH = 0x20, 0x09, 0x0A, 0x0D, 0x22, 0x5C
_NO_BREAK, _AFTER_CR, _BROKEN, _DEAD = 0, 1, 2, -1  # _DEAD: a forbidden byte was taken


@functools.cache
def whitespace_pattern_honoured() -> bool:
    """Whether the installed llguidance applies JSON ``whitespace_pattern`` (1.9 does, 1.7 does not)."""
    llg = llguidance_module()
    grammar = llg.LLMatcher.grammar_from_json_schema({"type": "array"}, overrides={"whitespace_pattern": "[ ]?"})
    return not new_matcher(grammar).consume_tokens(list(b"[  "))


class WhitespaceRunCursor(Cursor):
    """Where a JSON text stands for the whitespace bound (see the module docstring); immutable."""

    __slots__ = ("_mask", "break_state", "escaped", "in_string", "limit", "spaces", "text")

    def __init__(self, limit: int, text: bytes = b"", in_string: bool = False, escaped: bool = False,
                 spaces: int = 0, break_state: int = _NO_BREAK):
        self.limit = limit
        self.text = text
        self.in_string, self.escaped = in_string, escaped
        self.spaces, self.break_state = spaces, break_state
        self._mask = None

    @classmethod
    def at(cls, limit: int, text: bytes) -> WhitespaceRunCursor:
        """The cursor after ``text``."""
        c = cls(limit)
        for b in text:
            c = c.advance(b)
        return c

    def mask(self) -> np.ndarray:
        if self._mask is None:
            m = np.full(N_SYMBOLS, self.break_state != _DEAD)
            m[EOT] = False
            if not self.in_string:
                if self.spaces >= self.limit:
                    m[[_SPACE, _TAB]] = False
                if self.spaces or self.break_state != _NO_BREAK:
                    m[_CR] = False
                    m[_LF] = self.break_state == _AFTER_CR and not self.spaces
            m.flags.writeable = False
            self._mask = m
        return self._mask

    def advance(self, byte: int) -> WhitespaceRunCursor:
        in_string, escaped, spaces, brk = self.in_string, False, self.spaces, self.break_state
        if not self.mask()[byte]:
            brk = _DEAD
        elif in_string:
            if self.escaped:
                pass
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte in (_SPACE, _TAB):
            spaces += 1
        elif byte == _LF:
            brk = _BROKEN
        elif byte == _CR:
            brk = _AFTER_CR if brk == _NO_BREAK else _BROKEN
        else:
            spaces, brk = 0, _NO_BREAK
            in_string = byte == _QUOTE
        return WhitespaceRunCursor(self.limit, self.text + bytes([byte]), in_string, escaped, spaces, brk)
