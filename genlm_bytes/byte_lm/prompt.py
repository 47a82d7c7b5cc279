"""A long prompt as token ids up to its last few tokens, and those as bytes.

A beam's ``prefill`` of a prompt sums over the ways the tokenizer could have split it, and
costs what scoring the text costs: 1.2-6x a forward pass over its tokens on a CPU (more on
text the model splits many ways, such as indented code; ``benchmarks/README.md``). For a
prompt of hundreds of bytes whose exact split does not matter, condition on what
transformers' ``generate`` conditions on, the tokenizer's own encoding, except for its last
few tokens: their bytes go through the beam, so a prompt that ends mid-word (or mid-token)
still continues as the byte-level model would after those bytes.

Example:
    >>> context, tail = token_prompt(lm, prompt)                    # doctest: +SKIP
    >>> beam = await ByteBeamState.initial(lm, params, initial_context=context)  # doctest: +SKIP
    >>> text = await beam.greedy(tail, 64)                          # doctest: +SKIP

The distribution after it is the byte-level model's given the head's canonical tokens and
the tail's bytes: not the same as after ``prefill(prompt)`` (which also sums over the head's
other splits, almost always far less likely).
"""

from __future__ import annotations

from genlm_bytes.lm.base import AsyncLM, check_token_ids


def token_prompt(lm: AsyncLM, prompt: bytes, exact_tokens: int = 2,
                 initial_context: list[int] | None = None) -> tuple[list[int], bytes]:
    """``(context, tail)``: ``initial_context`` (default the model's) followed by the
    tokenizer's encoding of ``prompt`` without its last ``exact_tokens`` tokens, and the bytes
    of those tokens (``head + tail == prompt``). ValueError where the model has no tokenizer
    encoding (``lm.encode_bytes`` gives None), ``exact_tokens`` is negative, or
    ``initial_context`` is not token ids of the model (TypeError for another type)."""
    if not isinstance(lm, AsyncLM):
        raise TypeError(f"lm must be an AsyncLM, got {type(lm).__name__}")
    if not isinstance(prompt, (bytes, bytearray)):
        raise TypeError(f"prompt must be bytes, got {type(prompt).__name__}")
    if isinstance(exact_tokens, bool) or not isinstance(exact_tokens, int) or exact_tokens < 0:
        raise ValueError(f"exact_tokens must be a non-negative int, got {exact_tokens!r}")
    ids = lm.encode_bytes(bytes(prompt))
    if ids is None:
        raise ValueError("this model has no tokenizer encoding (encode_bytes gives None): "
                         "prefill the prompt as bytes instead")
    cut = max(0, len(ids) - exact_tokens)
    head = b"".join(lm.byte_vocab[t] for t in ids[:cut])
    if not bytes(prompt).startswith(head):
        raise ValueError("the tokenizer's encoding of the prompt does not spell it")
    start = list(lm.initial_context) if initial_context is None else \
        check_token_ids(initial_context, lm.vocab_size, allow_empty=True)
    return start + list(ids[:cut]), bytes(prompt)[len(head):]
