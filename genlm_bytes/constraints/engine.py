"""The bridge to llguidance: grammars as matchers over 257 symbols (256 bytes + EOS).

llguidance constrains the token ids of a tokenizer. Here that tokenizer has
257 tokens: id ``b`` (0-255) is the single byte ``b`` and id 256 is EOS, so
llguidance's token mask *is* the byte mask, exact for every UTF-8 class
(llguidance also refuses every byte that cannot continue valid UTF-8).

A matcher (``llguidance.LLMatcher``) holds the parse of the bytes consumed so
far; one byte costs one mask and one consume, never a re-parse. llguidance
never raises on bad grammars or bytes: it reports errors by message and by
an error state, which this module turns into ``ValueError`` (at compile time)
and into an all-False mask (at run time).

Example:
    >>> g = compile_grammar(llguidance_module().LLMatcher.grammar_from_regex("ab?"), "regex")
    >>> m = new_matcher(g); m.consume_token(ord("a"))
    True
    >>> [int(i) for i in matcher_mask(m).nonzero()[0]]  # b'b' or EOS (257)
    [98, 257]

Not handled: llguidance's token-healing and forced-token features (bytes are already the finest unit).
"""

from __future__ import annotations

import functools

import numpy as np

from genlm_bytes.symbols import EOS, N_BYTES, N_SYMBOLS

#: The EOS token id of the byte tokenizer (symbol EOS = 257 in our masks).
LLG_EOS = N_BYTES
#: 257 mask bits in 32-bit words, as llguidance writes them.
_MASK_WORDS = (N_BYTES + 1 + 31) // 32

INSTALL_HINT = "pip install 'llguidance>=1.7,<2'"

_DEAD = np.zeros(N_SYMBOLS, dtype=bool)
_DEAD.flags.writeable = False


def llguidance_module():
    """The ``llguidance`` module, imported on first use (``import genlm_bytes`` stays light)."""
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise ImportError(f"Regex, JsonSchema and Grammar need llguidance: {INSTALL_HINT}") from e
    return llguidance


class _ByteTokens:
    """What ``llguidance.TokenizerWrapper`` reads: 256 one-byte tokens, then EOS."""

    def __init__(self):
        self.tokens = [bytes([b]) for b in range(N_BYTES)] + [b"<eos>"]
        self.eos_token_id = LLG_EOS
        self.bos_token_id = None
        self.special_token_ids = [LLG_EOS]

    def __call__(self, text) -> list[int]:
        return list(text.encode("utf-8") if isinstance(text, str) else text)


@functools.cache
def byte_tokenizer():
    """The 257-token ``llguidance.LLTokenizer`` (built once per process, a few ms)."""
    llg = llguidance_module()
    return llg.LLTokenizer(llg.TokenizerWrapper(_ByteTokens()))


def error_summary(message: str) -> str:
    """One line from an llguidance error message: its ``error: ...`` line if it has one, else its first.

    >>> error_summary('at 1(8): invalid regex "[a-" ...:\\n    [a-\\n    ^\\nerror: unclosed character class\\n')
    'unclosed character class'
    """
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("error: "):
            return ln[len("error: "):]
    return lines[0] if lines else "unknown error"


def compile_grammar(grammar: str, what: str) -> str:
    """``grammar`` (an llguidance grammar string) after checking it compiles.

    Raises:
        ValueError: ``"{what}: {llguidance's message}"``.
    """
    llg = llguidance_module()
    message = llg.LLMatcher.validate_grammar(grammar, byte_tokenizer())
    if message and not message.startswith("WARNING"):
        raise ValueError(f"{what}: {error_summary(message)}")
    return grammar


def new_matcher(grammar: str):
    """A fresh ``llguidance.LLMatcher`` at the start of ``grammar`` (a compiled grammar string)."""
    return llguidance_module().LLMatcher(byte_tokenizer(), grammar, log_level=0)


def matcher_mask(matcher) -> np.ndarray:
    """The read-only ``(258,)`` bool mask after what ``matcher`` consumed: bytes, EOT (never), EOS.

    All False when ``matcher`` is None or in an error state (a forbidden byte, an empty language):
    there llguidance's own mask holds only EOS, which would wrongly say the text may end.
    """
    if matcher is None or matcher.is_error():
        return _DEAD
    words = np.zeros(_MASK_WORDS, dtype="<u4")  # (9,) little-endian: bit i of word j = token 32 j + i
    matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
    if matcher.is_error():
        return _DEAD
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")  # (288,)
    m = np.zeros(N_SYMBOLS, dtype=bool)
    m[:N_BYTES] = bits[:N_BYTES]
    m[EOS] = bits[LLG_EOS]
    m.flags.writeable = False
    return m
