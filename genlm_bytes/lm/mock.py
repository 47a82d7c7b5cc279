"""MockLM: a deterministic token LM over a small byte vocabulary, for fast tests.

The log-probabilities are a pure function of ``(seed, context)``: the same
context always gives the same distribution, in any process, in any order of
calls. Nothing about them resembles a real language.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from genlm_bytes.lm.base import AsyncLM

#: Multi-byte tokens of the default vocabulary (besides <eos> and all 256 single bytes).
DEFAULT_MULTI_BYTE = [
    b" the", b"th", b"he", b"in", b"an", b"er", b"on", b" a", b"ing", b"ed", b"re", b" t",
    b" s", b"at", b"en", b"es", b"or", b" o", b"is", b"it", b"nd", b" w", b"ou", b"ar",
    b" of", b" and", b"the", b"apple", b"app", b"le", b"ple", b" day", b"ay", b"\n\n",
    b"  ", b"\xc3\xa9", b"\xe2\x80", b"\xf0\x9f",
]


def default_mock_vocab() -> list[bytes]:
    """``[b"<eos>"]`` + every single byte + a few common multi-byte chunks."""
    return [b"<eos>"] + [bytes([i]) for i in range(256)] + list(DEFAULT_MULTI_BYTE)


class MockLM(AsyncLM):
    """Deterministic random language model.

    Args:
        byte_vocab: the vocabulary; default :func:`default_mock_vocab` (token 0 is ``<eos>``).
        seed: changes every distribution.
        temperature: scale of the random logits (smaller is more peaked).
        initial_context: default ``[0]``.
        eos_token_ids: default ``[0]`` for the default vocabulary, else ``[]``.
    """

    _trusted_output = True

    def __init__(self, byte_vocab=None, *, seed: int = 0, temperature: float = 1.0,
                 initial_context=None, eos_token_ids=None):
        default = byte_vocab is None
        if default:
            byte_vocab = default_mock_vocab()
        if eos_token_ids is None:
            eos_token_ids = [0] if default else []
        if initial_context is None:
            initial_context = [0]
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        super().__init__(byte_vocab=byte_vocab, initial_context=initial_context, eos_token_ids=eos_token_ids)
        self.seed = int(seed)
        self.temperature = float(temperature)
        self.n_calls = 0

    def logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """The distribution after ``token_ids`` (synchronous, float32 ``(V,)``)."""
        h = hashlib.blake2b(np.asarray([self.seed, *token_ids], dtype=np.int64).tobytes(), digest_size=8)
        rng = np.random.default_rng(int.from_bytes(h.digest(), "little"))
        logits = torch.from_numpy(rng.standard_normal(self.vocab_size) / self.temperature)
        return torch.log_softmax(logits, dim=-1).to(torch.float32)

    async def next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        self.n_calls += 1
        return self.logprobs(token_ids)
