"""ConstrainedState: a byte-level state whose next-symbol distribution is masked by a constraint.

With ``p`` the wrapped state's next-symbol distribution and ``m`` the
constraint's mask after the generated text ``x``:

    q(a | x) = p(a | x) m(a) / Σ_b p(b | x) m(b)

and ``log Σ_b p(b | x) m(b)`` is the log of the mass the constraint kept (the
SMC incremental weight, see :mod:`genlm_bytes.smc`).

Ending: with EOS tokens (``has_eos``), generation ends when EOS is chosen,
which the constraint allows only when the text is complete. Without them, it
ends when the constraint is complete and allows no further byte. Either way
:meth:`ConstrainedState.sample` also stops at its step limit.

Example (wrap a beam that has already read an unconstrained prompt):
    >>> beam = await (await ByteBeamState.initial(lm, params)).prefill(b"Call me at ")  # doctest: +SKIP
    >>> await ConstrainedState(beam, Regex(r"[0-9]{3}-[0-9]{4}")).sample(b"", 20, rng=0)  # doctest: +SKIP
    b'555-0123'
"""

from __future__ import annotations

import asyncio
import math

import numpy as np

from genlm_bytes.byte_lm.lm_state import StatefulByteLM, check_prompt
from genlm_bytes.constraints.base import (
    Constraint,
    ConstraintError,
    Cursor,
    describe_mask,
)
from genlm_bytes.dist import LazyByteProbs, logsumexp
from genlm_bytes.symbols import EOS, N_BYTES, check_symbol, symbol_name

#: The most allowed bytes :meth:`ConstrainedState._stepped_logp` steps the beam along (one beam step
#: each, concurrent); a forced byte is typically one of a few (a closing quote, a digit).
MAX_STEPPED = 16


def infer_has_eos(state: StatefulByteLM) -> bool:
    """Whether ``state`` can produce EOS: its own ``has_eos`` (an ensemble), else from its
    ``params.eos_tokens`` when it has them, else True."""
    own = getattr(state, "has_eos", None)
    if isinstance(own, bool):
        return own
    eos = getattr(getattr(state, "params", None), "eos_tokens", None)
    return True if eos is None else bool(eos)


class ConstrainedState(StatefulByteLM):
    """``state`` with its next symbols restricted by ``constraint``; immutable.

    Args:
        state: the byte-level state (e.g. a :class:`~genlm_bytes.ByteBeamState` after a prompt).
        constraint: applies to the bytes generated from ``state`` on (not to its prompt).
        text: bytes already generated under the constraint (used by ``<<``; normally empty).
        has_eos: whether ``state`` can produce EOS; default from ``state.params.eos_tokens``.
        cursor: the constraint's :class:`~genlm_bytes.constraints.Cursor` at ``text`` (used by
            ``<<``; default ``constraint.cursor(text)``).

    Attributes:
        state, constraint, text, has_eos, cursor: as given.
        ended: True after EOS was consumed.
    """

    def __init__(self, state: StatefulByteLM, constraint: Constraint, text: bytes = b"", *,
                 has_eos: bool | None = None, ended: bool = False, cursor: Cursor | None = None):
        if not isinstance(state, StatefulByteLM):
            raise TypeError(f"state must be a byte-level state (StatefulByteLM), got {type(state).__name__}")
        if not isinstance(constraint, Constraint):
            raise TypeError(f"constraint must be a Constraint (Regex, StringSet, Predicate, ...), "
                            f"got {type(constraint).__name__}")
        if has_eos is not None and not isinstance(has_eos, bool):
            raise TypeError(f"has_eos must be a bool or None, got {has_eos!r}")
        self.state = state
        self.constraint = constraint
        self.text = bytes(text)
        self.has_eos = infer_has_eos(state) if has_eos is None else has_eos
        self.ended = ended
        if cursor is not None and not isinstance(cursor, Cursor):
            raise TypeError(f"cursor must be a Cursor of the constraint, got {type(cursor).__name__}")
        self.cursor = constraint.cursor(self.text) if cursor is None else cursor
        self._stepped: dict[int, StatefulByteLM] = {}  # byte -> child, from _stepped_logp

    def __repr__(self) -> str:
        return f"ConstrainedState({self.text!r}, {self.constraint!r}, ended={self.ended})"

    # ------------------------------------------------------------------ the mask
    def mask(self, max_bytes: int | None = None) -> np.ndarray:
        """The ``(258,)`` bool mask of allowed symbols; bytes are all forbidden once
        ``len(text) >= max_bytes``. Without EOS the EOS slot is cleared (see :attr:`finished`)."""
        m = self.cursor.mask()
        if (max_bytes is not None and len(self.text) >= max_bytes) or not self.has_eos:
            m = m.copy()
            if max_bytes is not None and len(self.text) >= max_bytes:
                m[:N_BYTES] = False
            if not self.has_eos:
                m[EOS] = False
        return m

    def is_finished(self, max_bytes: int | None = None) -> bool:
        """Ended with EOS, or (no EOS tokens) complete with no allowed byte (before ``max_bytes``)."""
        if self.ended:
            return True
        if self.has_eos:
            return False
        m = self.cursor.mask()
        at_limit = max_bytes is not None and len(self.text) >= max_bytes
        return bool(m[EOS]) and (at_limit or not m[:N_BYTES].any())

    @property
    def finished(self) -> bool:
        """See :meth:`is_finished` (no step limit)."""
        return self.is_finished()

    @property
    def terminated(self) -> bool:
        return self.ended

    async def masked_logp_next(self, max_bytes: int | None = None) -> tuple[np.ndarray, float]:
        """The wrapped distribution masked by the constraint, unnormalized.

        Returns:
            ``(logp, log_kept)``: ``logp`` float64 ``(258,)`` natural-log probabilities of the wrapped
            state with forbidden symbols set to -inf; ``log_kept = logsumexp(logp)``, the log of the
            mass the constraint kept (-inf at a dead end; the caller decides what that means).
        """
        if self.ended:
            raise ValueError("this state has ended (EOS) and accepts nothing")
        m = self.mask(max_bytes)
        if not m.any():
            return np.full(m.shape, -np.inf), -math.inf
        logp = np.where(m, (await self.state.logp_next()).ps, -np.inf)  # (258,)
        log_kept = float(logsumexp(logp))
        if log_kept == -math.inf:
            logp = await self._stepped_logp(m)
            log_kept = float(logsumexp(logp))
        return logp, log_kept

    async def _stepped_logp(self, m: np.ndarray) -> np.ndarray:
        """Log-probs ``(258,)`` of the allowed bytes found by stepping the wrapped beam along each.

        A pruned beam can give every byte a constraint allows probability 0 (its covers sit inside
        tokens that the forced byte cannot continue); stepping heals them (see
        :mod:`genlm_bytes.byte_lm.heal`), and ``logZ(child) - logZ`` is the byte's log-probability.
        The children are kept for :meth:`__lshift__`. All -inf when the state has no ``logZ``.
        """
        logp = np.full(m.shape, -np.inf)
        syms = [int(b) for b in np.nonzero(m[:N_BYTES])[0]]
        log_z = getattr(self.state, "logZ", None)
        if log_z is None or log_z == -math.inf or not syms or len(syms) > MAX_STEPPED:
            return logp
        children = await asyncio.gather(*(self.state << b for b in syms))
        for b, child in zip(syms, children):
            logp[b] = getattr(child, "logZ", -math.inf) - log_z
            self._stepped[b] = child
        return logp

    async def logp_next(self, max_bytes: int | None = None) -> LazyByteProbs:
        """The masked, renormalized next-symbol distribution ``q(· | text)``.

        Raises:
            ConstraintError: nothing is allowed (a dead end), or the model gives every allowed
                symbol probability 0; or this state is finished.
        """
        if self.is_finished(max_bytes):
            raise ConstraintError(f"generation has finished after {self.text!r}: the constraint is complete "
                                  f"and allows no further byte" if not self.ended else
                                  "this state has ended (EOS) and accepts nothing")
        logp, log_kept = await self.masked_logp_next(max_bytes)
        if log_kept == -math.inf:
            raise self._dead_end(max_bytes)
        return LazyByteProbs(logp - log_kept)

    def _dead_end(self, max_bytes: int | None) -> ConstraintError:
        m = self.mask(max_bytes)
        if not m.any():
            at_limit = max_bytes is not None and len(self.text) >= max_bytes
            why = (f"the {max_bytes}-byte limit is reached and the text is not complete" if at_limit else
                   "no continuation can satisfy it" if self.text else
                   "it cannot be satisfied by any text")
            return ConstraintError(f"the constraint {self.constraint!r} allows no symbol after {self.text!r}: "
                                   f"{why}")
        hint = ("" if self.has_eos else
                " (the model has no EOS tokens: a text ends only where the constraint allows no further byte)")
        return ConstraintError(f"the model gives probability 0 to every symbol the constraint allows after "
                               f"{self.text!r} ({describe_mask(m)}){hint}")

    # ------------------------------------------------------------------ steps
    async def __lshift__(self, sym) -> ConstrainedState:
        """The state after ``sym`` (a byte 0-255 or EOS), which the constraint must allow.

        Raises:
            ConstraintError: the constraint forbids ``sym`` here.
        """
        sym = check_symbol(sym)
        if self.ended:
            raise ValueError("this state has ended (EOS) and accepts nothing")
        if not self.cursor.mask()[sym]:
            raise ConstraintError(f"the constraint {self.constraint!r} does not allow {symbol_name(sym)} "
                                  f"after {self.text!r}")
        inner = self._stepped[sym] if sym in self._stepped else await (self.state << sym)
        if sym == EOS:
            return ConstrainedState(inner, self.constraint, self.text, has_eos=self.has_eos, ended=True,
                                    cursor=self.cursor)
        return ConstrainedState(inner, self.constraint, self.text + bytes([sym]), has_eos=self.has_eos,
                                cursor=self.cursor.advance(sym))

    def prune(self) -> ConstrainedState:
        inner = self.state.prune()
        if inner is self.state:
            return self
        pruned = ConstrainedState(inner, self.constraint, self.text, has_eos=self.has_eos, ended=self.ended,
                                  cursor=self.cursor)
        pruned._stepped = self._stepped  # children of the unpruned state: still the best known
        return pruned

    async def sample(self, context: bytes, steps: int, params=None, *, rng=None, greedy: bool = False,
                     stream=None, **sampling_kwargs) -> bytes:
        """``context`` plus up to ``steps`` bytes drawn from the constrained distribution.

        ``context`` is forced through the constraint first (it must be allowed: e.g. the ``{"name": "``
        that a JSON pattern starts with). Generation stops when EOS is chosen, when the constraint
        is complete and allows no further byte (models without EOS), or after ``steps`` bytes.
        Sampling filters (temperature, top-k, ...) apply after the mask.

        Args:
            context: bytes consumed first, under the constraint.
            steps: the most bytes to generate.
            params: a :class:`~genlm_bytes.sampling.SamplingParams`, or its fields as keywords
                (``temperature=0.7``).
            rng: a seed or ``np.random.Generator``; the same seed gives the same bytes.
            greedy: always take the most likely allowed symbol.
            stream: optional callable receiving each generated byte (an int).

        Returns:
            ``context`` + the generated bytes (EOS is not included). Use :meth:`generate` to know
            whether the text ended or was cut by the step limit.

        Raises:
            ConstraintError: ``context`` is forbidden, or a dead end is reached.
        """
        context = check_prompt(context)
        state = await self.prefill(context)
        _, out = await state.generate(steps, params, rng=rng, greedy=greedy, stream=stream, **sampling_kwargs)
        return context + out

    async def generate(self, steps: int, params=None, *, rng=None, greedy: bool = False,
                       stream=None, **sampling_kwargs) -> tuple[ConstrainedState, bytes]:
        """Up to ``steps`` constrained bytes from here (see :meth:`sample`).

        Returns:
            ``(final_state, generated_bytes)``; ``final_state.finished`` tells whether the text ended
            (EOS, or complete with nothing more allowed) rather than hitting the step limit.
        """
        return await self.generate_bytes(steps, params, rng=rng, greedy=greedy, stream=stream, step_eos=True,
                                         **sampling_kwargs)
