"""Regex: the generated text must fully match a regular expression.

``str`` patterns are compiled by llguidance (Rust ``regex`` syntax) and matched
against the UTF-8 bytes exactly: after every text the mask allows exactly the
bytes that continue some match, for every UTF-8 class (``[é-ü]``, ``\\p{Han}``,
``.``), and never a byte that breaks UTF-8; EOS exactly where the text matches.

Syntax notes (Rust ``regex``): the whole text must match (no anchors needed);
``\\d`` and ``\\w`` are Unicode-aware; no look-around and no backreferences (a
``ValueError`` says so: they are not regular). ``\\N{NAME}`` escapes and the
flags of a compiled ``regex`` pattern (``IGNORECASE``, ``MULTILINE``,
``DOTALL``, ``VERBOSE``) are translated.

``bytes`` patterns match the raw bytes (every byte a character) with the
``regex`` package's partial matching, exactly for regular constructs.

Example:
    >>> phone = Regex(r"[0-9]{3}-[0-9]{4}")
    >>> phone.allows(b"555", ord("-")), phone.allows(b"555", ord("5")), phone.is_complete(b"555-1234")
    (True, False, True)

Not handled: patterns over other encodings than UTF-8.
"""

from __future__ import annotations

import re
import unicodedata

import numpy as np

from genlm_bytes.constraints.base import Constraint
from genlm_bytes.constraints.engine import llguidance_module
from genlm_bytes.constraints.grammar import GrammarConstraint
from genlm_bytes.symbols import EOS, N_SYMBOLS

# `\N{NAME}` not preceded by an escaping backslash.
_NAMED_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\N\{([^}]*)\}")

# `regex` flags with an inline Rust equivalent; the others a str pattern carries anyway.
_INLINE_FLAGS = {2: "i", 8: "m", 16: "s", 64: "x"}  # IGNORECASE, MULTILINE, DOTALL, VERBOSE
_IMPLIED_FLAGS = 32 | 0x2000 | 0x4000  # UNICODE, VERSION0, FULLCASE: what a str pattern means anyway


def _translate_named(pattern: str) -> str:
    """``\\N{GREEK SMALL LETTER ALPHA}`` -> ``\\x{3B1}`` (Rust has no named escapes).

    >>> _translate_named(r"\\N{LATIN SMALL LETTER E WITH ACUTE}x")
    '\\\\x{E9}x'
    """
    def repl(m: re.Match) -> str:
        try:
            return f"{m.group(1)}\\x{{{ord(unicodedata.lookup(m.group(2))):X}}}"
        except KeyError:
            raise ValueError(f"invalid regular expression {pattern!r}: unknown character name "
                             f"{m.group(2)!r} in \\N{{...}}") from None

    return _NAMED_ESCAPE.sub(repl, pattern)


def _inline_flags(flags: int, pattern) -> str:
    unknown = flags & ~(sum(_INLINE_FLAGS) | _IMPLIED_FLAGS)
    if unknown:
        raise ValueError(f"invalid regular expression {pattern!r}: flags {unknown:#x} have no equivalent here "
                         f"(supported: IGNORECASE, MULTILINE, DOTALL, VERBOSE)")
    letters = "".join(c for bit, c in _INLINE_FLAGS.items() if flags & bit)
    return f"(?{letters})" if letters else ""


class Regex(GrammarConstraint):
    """The generated text must fully match ``pattern``.

    Args:
        pattern: a ``str`` pattern (matched exactly against the UTF-8 text; see the module
            docstring), a ``bytes`` pattern (matched against the raw bytes), or a compiled
            ``regex`` / ``re`` pattern.
        flags: ``regex`` / ``re`` flags, e.g. ``re.IGNORECASE`` (only with an uncompiled pattern).

    Raises:
        ValueError: the pattern does not compile (llguidance's message says why).
    """

    def __new__(cls, pattern=None, flags: int = 0):
        source = getattr(pattern, "pattern", pattern)
        if cls is Regex and isinstance(source, bytes):
            return super().__new__(BytesRegex)
        return super().__new__(cls)

    def __init__(self, pattern, flags: int = 0):
        source, flags = _source_and_flags(pattern, flags)
        self.pattern = source
        text = _inline_flags(flags, source) + _translate_named(source)
        grammar = llguidance_module().LLMatcher.grammar_from_regex(text)
        super().__init__(grammar, f"invalid regular expression {source!r}")

    def __repr__(self) -> str:
        return f"Regex({self.pattern!r})"


def _source_and_flags(pattern, flags) -> tuple[str | bytes, int]:
    """The source text and flags of a pattern given as a string or a compiled pattern."""
    if isinstance(pattern, (str, bytes)):
        if isinstance(flags, bool) or not isinstance(flags, int):
            raise TypeError(f"flags must be an int (e.g. re.IGNORECASE), got {flags!r}")
        return pattern, flags
    if hasattr(pattern, "pattern") and hasattr(pattern, "flags"):  # a compiled `re` or `regex` pattern
        if flags:
            raise ValueError("flags cannot be given with an already compiled pattern")
        return pattern.pattern, pattern.flags
    raise TypeError(f"pattern must be a str, bytes or compiled regex pattern, got {type(pattern).__name__}")


class BytesRegex(Regex):
    """A :class:`Regex` over raw bytes (what ``Regex(b"...")`` builds); masks by partial matching."""

    def __init__(self, pattern, flags: int = 0):
        import regex

        source, flags = _source_and_flags(pattern, flags)
        Constraint.__init__(self)
        self.pattern = source
        try:
            self._compiled = regex.compile(source, flags)
        except regex.error as e:
            raise ValueError(f"invalid regular expression {source!r}: {e}") from None

    def cursor(self, text: bytes = b""):
        return Constraint.cursor(self, text)

    def _ok(self, text: bytes) -> bool:
        return self._compiled.fullmatch(text, partial=True) is not None

    def _mask(self, prefix: bytes) -> np.ndarray:
        m = np.zeros(N_SYMBOLS, dtype=bool)
        if self._ok(prefix):
            for b in range(256):
                m[b] = self._ok(prefix + bytes([b]))
            m[EOS] = self._compiled.fullmatch(prefix) is not None
        return m
