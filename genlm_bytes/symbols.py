"""Symbols of next-symbol distributions, defined once.

A byte-level distribution has ``N_SYMBOLS`` slots: the 256 byte values, then
``EOT`` (end of the current token; meaningful for one cover, always zero for a
whole beam) and ``EOS`` (end of sequence, reachable at a token boundary).
"""

N_BYTES = 256
EOT = 256
EOS = 257
N_SYMBOLS = 258


def symbol_name(sym: int) -> str:
    """Readable name of a symbol: ``b'a'``, ``b'\\n'``, ``EOT`` or ``EOS``.

    >>> symbol_name(100), symbol_name(10), symbol_name(257)
    ("b'd'", "b'\\\\n'", 'EOS')
    """
    if sym == EOT:
        return "EOT"
    if sym == EOS:
        return "EOS"
    if not 0 <= sym < N_BYTES:
        raise ValueError(f"symbol {sym!r} is outside 0..{N_SYMBOLS - 1}")
    return repr(bytes([sym]))


def check_symbol(sym, *, allow_eot: bool = False) -> int:
    """Validate a symbol given by a user (an int in 0..257) and return it as int."""
    import numbers

    if isinstance(sym, bool) or not isinstance(sym, numbers.Integral):
        if isinstance(sym, (bytes, bytearray)) and len(sym) == 1:
            return sym[0]
        raise TypeError(f"a symbol must be an int in 0..{N_SYMBOLS - 1} (or a 1-byte bytes), got {sym!r}")
    sym = int(sym)
    if not 0 <= sym < N_SYMBOLS:
        raise ValueError(f"symbol {sym} is outside 0..{N_SYMBOLS - 1} (bytes 0-255, EOT=256, EOS=257)")
    if sym == EOT and not allow_eot:
        raise ValueError("EOT (256) is not a symbol a byte state can consume; pass a byte 0-255 or EOS (257)")
    return sym
