"""A long prompt as token ids up to its last tokens, and those as bytes (byte_lm/prompt.py)."""

import math

import numpy as np
import pytest

from genlm_bytes import BeamParams, ByteBeamState, MockLM, token_prompt


def test_bad_arguments_are_named():
    lm = MockLM(seed=0)
    with pytest.raises(ValueError, match="encode_bytes"):
        token_prompt(lm, b"hello")
    with pytest.raises(TypeError, match="prompt"):
        token_prompt(lm, "hello")
    with pytest.raises(ValueError, match="exact_tokens"):
        token_prompt(lm, b"hello", exact_tokens=-1)
    with pytest.raises(TypeError, match="AsyncLM"):
        token_prompt(object(), b"hello")


@pytest.mark.slow
def test_a_bad_initial_context_is_named(embedded_lm):
    with pytest.raises(ValueError):
        token_prompt(embedded_lm, b"hello", initial_context=[embedded_lm.vocab_size])
    with pytest.raises(TypeError):
        token_prompt(embedded_lm, b"hello", initial_context="hello")


@pytest.mark.slow
async def test_the_head_is_the_tokenizer_s_encoding_and_the_beam_starts_after_it(embedded_lm):
    prompt = b"Sur la table de la cuisine, il y avait trois pommes et une lettre pas encore ouv"
    ids = embedded_lm.encode_bytes(prompt)
    context, tail = token_prompt(embedded_lm, prompt, exact_tokens=3)
    assert context == list(embedded_lm.initial_context) + ids[:-3]
    assert b"".join(embedded_lm.byte_vocab[t] for t in ids[:-3]) + tail == prompt
    assert tail == b"".join(embedded_lm.byte_vocab[t] for t in ids[-3:])
    # With no exact tokens the beam is one cover after the whole encoding: its next-byte
    # distribution is the next token's, summed by first byte.
    context, tail = token_prompt(embedded_lm, prompt, exact_tokens=0)
    assert tail == b""
    beam = await ByteBeamState.initial(embedded_lm, BeamParams(K=5, prune_threshold=0.05), initial_context=context)
    got = (await beam.logp_next()).ps
    logp = np.asarray(await embedded_lm.next_token_logprobs(context), dtype=np.float64)
    first = {}
    for t, b in enumerate(embedded_lm.byte_vocab[:len(logp)]):
        if b:
            first.setdefault(b[0], []).append(logp[t])
    for byte in (ord(" "), ord("e"), ord("r")):
        want = np.logaddexp.reduce(first[byte])
        assert math.isclose(float(got[byte]), float(want), abs_tol=1e-4)
    # And the tail goes on through the beam: a prompt ending mid-word continues the word.
    context, tail = token_prompt(embedded_lm, prompt)
    beam = await ByteBeamState.initial(embedded_lm, BeamParams(K=5, prune_threshold=0.05), initial_context=context)
    out = await beam.greedy(tail, 6)
    assert out.startswith(tail) and len(out) == len(tail) + 6
    await beam.cleanup()
