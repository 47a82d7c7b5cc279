"""StatefulTokenizedLM (a token context) and StatefulByteLM (the byte-level state interface).

``StatefulByteLM`` defines what every byte-level state offers and builds
``prefill``, ``greedy`` and ``sample`` on its three primitives
``await (state << byte)``, ``state.prune()`` and ``await state.logp_next()``.
"""

from __future__ import annotations

import abc
import logging
import numbers

import torch

from genlm_bytes.lm.base import AsyncLM, check_token_ids
from genlm_bytes.symbols import EOS

logger = logging.getLogger(__name__)


class StatefulTokenizedLM:
    """An immutable token context of an :class:`AsyncLM`.

    ``state << token_id`` returns a new state (the old one is unchanged); when
    ``max_context_length`` is set, the context keeps only its last that many tokens.
    """

    __slots__ = ("context", "lm", "max_context_length")

    def __init__(self, lm: AsyncLM, context: tuple, max_context_length: int | None = None):
        self.lm = lm
        self.context = context
        self.max_context_length = max_context_length

    @classmethod
    def initial(cls, lm: AsyncLM, initial_context=None, max_context_length: int | None = None):
        """The state holding ``initial_context`` (default: ``lm.initial_context``)."""
        if not isinstance(lm, AsyncLM):
            raise TypeError(f"lm must be an AsyncLM, got {type(lm).__name__}")
        if max_context_length is not None and (
                isinstance(max_context_length, bool) or not isinstance(max_context_length, int)
                or max_context_length < 1):
            raise ValueError(f"max_context_length must be a positive int or None, got {max_context_length!r}")
        ctx = lm.initial_context if initial_context is None else initial_context
        ctx = check_token_ids(ctx, lm.vocab_size, allow_empty=True)
        if not ctx:
            raise ValueError("the initial context is empty: pass initial_context=[a BOS/EOS token id] "
                             "(the model needs at least one token to condition on)")
        if max_context_length is not None:
            ctx = ctx[-max_context_length:]
        return cls(lm, tuple(ctx), max_context_length)

    def __lshift__(self, token_id: int) -> StatefulTokenizedLM:
        if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
            raise TypeError(f"a token id must be an int, got {token_id!r}")
        token_id = int(token_id)
        if not 0 <= token_id < self.lm.vocab_size:
            raise ValueError(f"token id {token_id} is out of range for {self.lm.vocab_size} tokens")
        ctx = self.context + (token_id,)
        m = self.max_context_length
        if m is not None and len(ctx) > m:
            ctx = ctx[-m:]
        return StatefulTokenizedLM(self.lm, ctx, m)

    async def logp_next(self) -> torch.Tensor:
        """Next-token log-probabilities ``(V,)``."""
        return await self.lm.next_token_logprobs(list(self.context))

    def __len__(self) -> int:
        return len(self.context)

    def __repr__(self) -> str:
        tail = self.context[-8:]
        return f"StatefulTokenizedLM(len={len(self.context)}, ...{list(tail)})"


def check_prompt(context) -> bytes:
    if isinstance(context, str):
        raise TypeError("the context must be bytes, not str: pass text.encode('utf-8')")
    if not isinstance(context, (bytes, bytearray, memoryview)):
        raise TypeError(f"the context must be bytes, got {type(context).__name__}")
    return bytes(context)


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    return int(steps)


class StatefulByteLM(abc.ABC):
    """A byte-level language model state.

    Subclasses implement ``__lshift__`` (async: ``await (state << byte)``),
    ``prune`` and ``logp_next``; ``prefill``, ``greedy`` and ``sample`` follow.
    """

    @abc.abstractmethod
    async def __lshift__(self, byte: int) -> StatefulByteLM: ...

    @abc.abstractmethod
    def prune(self) -> StatefulByteLM: ...

    @abc.abstractmethod
    async def logp_next(self):
        """A :class:`~genlm_bytes.dist.LazyByteProbs` over the 258 symbols."""

    async def prefill(self, data: bytes) -> StatefulByteLM:
        """The state after consuming every byte of ``data`` (pruning after each)."""
        state = self
        for b in check_prompt(data):
            state = await (state.prune() << b)
        return state

    async def greedy(self, context: bytes, steps: int) -> bytes:
        """``context`` plus up to ``steps`` most likely next bytes (stops at EOS)."""
        return await self.sample(context, steps, greedy=True)

    async def sample(self, context: bytes, steps: int, params=None, *, rng=None, greedy: bool = False,
                     stream=None, **sampling_kwargs) -> bytes:
        """``context`` plus up to ``steps`` sampled bytes (stops at EOS).

        Args:
            context: bytes prefilled first (continuing from this state).
            steps: the most bytes to generate.
            params: a :class:`~genlm_bytes.sampling.SamplingParams` (temperature, top-k, top-p, min-p),
                or give its fields as keywords (``temperature=0.7``).
            rng: a seed or ``np.random.Generator``; the same seed gives the same bytes.
            greedy: always take the most likely byte.
            stream: optional callable receiving each generated byte (an int) as it is chosen.
        """
        context = check_prompt(context)
        steps = check_steps(steps)
        state = await self.prefill(context)
        _, out = await state.generate_bytes(steps, params, rng=rng, greedy=greedy, stream=stream, **sampling_kwargs)
        return context + out

    async def generate_bytes(self, steps: int, params=None, *, rng=None, greedy: bool = False, stream=None,
                             step_eos: bool = False, **sampling_kwargs) -> tuple[StatefulByteLM, bytes]:
        """The one byte-generation loop every state uses: choose a symbol from :meth:`logp_next`
        (the argmax, or a draw with ``params``), stop at EOS, else ``prune() << byte``.

        Args:
            steps, params, rng, greedy, stream: as in :meth:`sample`.
            step_eos: also step with EOS when it is chosen (a state that records its end, such as
                a constrained one); a state whose ``finished`` is true stops there.

        Returns:
            ``(final_state, generated_bytes)`` (EOS is not among the bytes).
        """
        from genlm_bytes.sampling import SamplingParams, as_generator, sample_symbol

        steps = check_steps(steps)
        params = SamplingParams.resolve(params, **sampling_kwargs)
        gen = None if greedy or params.is_greedy else as_generator(rng)
        state, out = self, bytearray()
        for _ in range(steps):
            if getattr(state, "finished", False):
                break
            logp = (await state.logp_next()).ps  # (258,) log-probs
            sym = int(logp.argmax()) if gen is None else int(sample_symbol(logp, params, gen))
            if sym == EOS:
                if step_eos:
                    state = await (state.prune() << sym)
                break
            out.append(sym)
            if stream is not None:
                stream(sym)
            state = await (state.prune() << sym)
        return state, bytes(out)

    async def cleanup(self) -> None:
        """Release what this state holds (its covers); the state is unusable afterwards."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.cleanup()
        return False
