"""EnsembleState: mixtures and products of byte-level states, across tokenizers.

Models with different tokenizers cannot be combined token by token; as
distributions over bytes they can. With members ``P_1 .. P_n`` (byte-level
states, any backends, any vocabularies) and weights ``w``:

- **mixture** (weights positive, normalized to sum 1):
  ``P(x) = Σ_i w_i P_i(x)``. The next-symbol distribution is the members' own,
  mixed by their posterior weights ``π_i(x) ∝ w_i P_i(x)``:
  ``p(a | x) = Σ_i π_i(x) p_i(a | x)``, and ``logZ = log Σ_i w_i exp(logZ_i)``.
- **product** (any real weights, signed allowed):
  ``log q(a | x) = Σ_i w_i log p_i(a | x) - log Σ_b exp(Σ_i w_i log p_i(b | x))``,
  over the 256 bytes and EOS, defined on the symbols every member allows (EOT is
  never a symbol). ``logZ`` is the chain ``Σ_t log q(x_t | x_<t)`` of the bytes this
  state consumed. Proxy-tuning (a large model steered by the difference of a small
  tuned and a small base model) is the product with weights ``[1, 1, -1]``.

Worked example (two members, one step): ``p_1 = (0.5, 0.5)``, ``p_2 = (0.9, 0.1)``
over two symbols with equal prior weights and ``P_1(x) = P_2(x)``: the mixture
gives ``(0.7, 0.3)``; the product with weights ``[1, 1]`` gives ``(0.9, 0.1)``
(``0.45 / 0.5``, ``0.05 / 0.5``).

Members step concurrently (``asyncio.gather``), so their backends' passes overlap
where the hardware allows. EOS is a symbol like any other: after it every
member has ended.

``prefill`` of a mixture is the members' own prefill, run concurrently (their
EOS tokens count as text there, as for a beam); ``prefill`` of a product steps
byte by byte, since its ``logZ`` is a chain of its own next-byte distributions.

Not handled: a member that is itself constrained (wrap the ensemble in a
:class:`~genlm_bytes.ConstrainedState` instead), weights that change with the text.

Example (proxy-tuning):
    >>> big, tuned, base = [await ByteBeamState.initial(lm, params) for lm in lms]  # doctest: +SKIP
    >>> s = EnsembleState([big, tuned, base], [1, 1, -1], kind="product")           # doctest: +SKIP
    >>> await s.greedy(b"Question: ", 20)                                           # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
from collections.abc import Sequence

import numpy as np

from genlm_bytes.byte_lm.lm_state import StatefulByteLM, check_prompt
from genlm_bytes.dist import LazyByteProbs, logsumexp
from genlm_bytes.symbols import EOS, EOT, check_symbol

logger = logging.getLogger(__name__)

KINDS = ("mixture", "product")


def check_weights(weights, n: int, kind: str) -> np.ndarray:
    """``weights`` as a float64 ``(n,)`` array: a mixture's positive and normalized, a product's as given.

    >>> check_weights([1, 3], 2, "mixture")
    array([0.25, 0.75])
    """
    if weights is None:
        return np.full(n, 1.0 / n)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (Sequence, np.ndarray)):
        raise TypeError(f"weights must be a list of {n} numbers, got {type(weights).__name__}")
    ws = list(weights)
    if len(ws) != n:
        raise ValueError(f"weights has {len(ws)} entries for {n} members: give one weight per member")
    for w in ws:
        if isinstance(w, bool) or not isinstance(w, numbers.Real):
            raise TypeError(f"a weight must be a number, got {w!r}")
        if not math.isfinite(w):
            raise ValueError(f"a weight must be finite, got {w!r}")
    out = np.asarray(ws, dtype=np.float64)
    if kind == "mixture":
        if (out <= 0).any():
            raise ValueError(f"mixture weights must be positive (they are prior probabilities), got {ws}; "
                             f"for signed weights use kind='product'")
        return out / out.sum()
    if not out.any():
        raise ValueError("product weights are all 0: the product would ignore every member")
    return out


def check_members(members, kind: str) -> tuple:
    if isinstance(members, StatefulByteLM) or not isinstance(members, Sequence):
        raise TypeError(f"members must be a list of byte-level states, got {type(members).__name__}")
    members = tuple(members)
    if not members:
        raise ValueError("members is empty: an ensemble needs at least one byte-level state")
    for m in members:
        if not isinstance(m, StatefulByteLM):
            raise TypeError(f"a member must be a byte-level state (StatefulByteLM, e.g. a ByteBeamState), "
                            f"got {type(m).__name__}")
    kinds = {type(m) for m in members}
    if len(kinds) > 1:
        raise TypeError(f"members must be the same kind of state, got {sorted(k.__name__ for k in kinds)}: "
                        f"wrap each model in the same kind (e.g. a ByteBeamState), and constrain the "
                        f"ensemble instead")
    if kind == "mixture" and not all(isinstance(getattr(m, "logZ", None), float) for m in members):
        raise TypeError(f"a mixture weighs its members by their logZ, which {type(members[0]).__name__} "
                        f"does not have: use ByteBeamState members (or kind='product')")
    return members


class EnsembleState(StatefulByteLM):
    """A mixture or product of byte-level states; immutable (every step returns a new state).

    Args:
        members: byte-level states of the same kind (e.g. :class:`~genlm_bytes.ByteBeamState`),
            any backends and tokenizers, all at the same text.
        weights: one number per member (default equal: ``1/n`` each). A mixture's are prior
            probabilities (positive; normalized here); a product's are exponents (any sign).
        kind: ``"mixture"`` or ``"product"`` (see the module docstring for the formulas).

    Attributes:
        members: the member states (a tuple).
        weights: float64 ``(n,)``.
        kind: as given.
        logZ: natural log of the ensemble's probability of the bytes so far (a mixture: of
            every byte its members consumed; a product: of the bytes this ensemble consumed).
        terminated: True after EOS.

    Raises:
        TypeError, ValueError: members empty or of different kinds, weights of the wrong length,
            a mixture weight <= 0, an unknown kind.
    """

    def __init__(self, members, weights=None, kind: str = "mixture"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        members = check_members(members, kind)
        ws = check_weights(weights, len(members), kind)
        ws.flags.writeable = False  # shared by every state that follows from this one
        self._set(members, ws, kind, 0.0, False)

    @classmethod
    async def initial(cls, lms: Sequence, params, weights=None, kind: str = "mixture", *,
                      text_hint: bytes | None = None) -> EnsembleState:
        """The ensemble of one :class:`~genlm_bytes.ByteBeamState` per model, at the empty text.

        Args:
            lms: the models (:class:`~genlm_bytes.AsyncLM`, any tokenizers).
            params: a :class:`~genlm_bytes.BeamParams` for every member, or a list of one per model.
            weights, kind: as for the constructor.
            text_hint: the text a ``prefill`` will read next, if known (see ``ByteBeamState.initial``).
        """
        from genlm_bytes.byte_lm.beam import ByteBeamState

        if isinstance(lms, (str, bytes)) or not isinstance(lms, Sequence) or not lms:
            raise ValueError(f"lms must be a non-empty list of models, got {lms!r}")
        per = list(params) if isinstance(params, (list, tuple)) else [params] * len(lms)
        if len(per) != len(lms):
            raise ValueError(f"{len(per)} BeamParams for {len(lms)} models: give one, or one per model")
        members = await asyncio.gather(*(ByteBeamState.initial(lm, p, text_hint=text_hint)
                                         for lm, p in zip(lms, per)))
        return cls(list(members), weights, kind)

    def _set(self, members: tuple, weights: np.ndarray, kind: str, chain: float, ended: bool) -> None:
        self.members = members
        self.weights = weights
        self.kind = kind
        self.terminated = ended
        self._chain = chain  # a product's logZ
        self._next: LazyByteProbs | None = None  # logp_next(), computed once

    def _new(self, members: tuple, chain: float = 0.0, ended: bool = False) -> EnsembleState:
        """A state of the same kind and weights (no validation: internal steps)."""
        s = object.__new__(EnsembleState)
        s._set(members, self.weights, self.kind, chain, ended)
        return s

    @property
    def logZ(self) -> float:
        if self.kind == "product":
            return self._chain
        return logsumexp(np.log(self.weights) + self._member_logZ())

    def _member_logZ(self) -> np.ndarray:
        return np.array([m.logZ for m in self.members], dtype=np.float64)  # (n,)

    def posterior(self) -> np.ndarray:
        """A mixture's posterior member weights ``π_i ∝ w_i P_i(x)``, float64 ``(n,)`` (sum 1)."""
        if self.kind != "mixture":
            raise ValueError("posterior() is defined for a mixture; a product has no member posterior")
        logw = np.log(self.weights) + self._member_logZ()
        z = logsumexp(logw)
        if z == -math.inf:
            raise ValueError("every member gives the bytes so far probability 0")
        return np.exp(logw - z)

    def __repr__(self) -> str:
        return f"EnsembleState({self.kind}, {len(self.members)} members, logZ={self.logZ:.4f})"

    # ------------------------------------------------------------------ distributions
    async def logp_next(self) -> LazyByteProbs:
        """Next-symbol log-probs ``(258,)`` (bytes and EOS; EOT is always -inf).

        Raises:
            ValueError: this state has ended, or no symbol has positive probability (a mixture
                whose members all died; a product whose members share no allowed symbol).
        """
        if self.terminated:
            raise ValueError("this ensemble has ended (EOS) and accepts nothing")
        if self._next is None:
            mix = self._mix if self.kind == "mixture" else self._product
            self._next = LazyByteProbs(await mix())
        return self._next

    async def _mix(self) -> np.ndarray:
        post = self.posterior()
        live = [i for i in range(len(self.members)) if post[i] > 0]  # dead members are not asked
        dists = await asyncio.gather(*(self.members[i].logp_next() for i in live))
        p = post[live] @ np.exp(np.stack([d.ps for d in dists]))  # (258,) Σ_i π_i p_i(a)
        p[EOT] = 0.0
        z = p.sum()
        if not z > 0:
            raise ValueError("no next symbol has positive probability under any member of the mixture")
        with np.errstate(divide="ignore"):
            return np.log(p / z)

    async def _product(self) -> np.ndarray:
        dists = await asyncio.gather(*(m.logp_next() for m in self.members))
        logp = np.stack([d.ps for d in dists])  # (n, 258)
        allowed = np.isfinite(logp).all(axis=0)  # (258,) symbols every member allows
        allowed[EOT] = False
        if not allowed.any():
            raise ValueError("no next symbol is allowed by every member of the product")
        out = np.full(logp.shape[1], -math.inf)  # (258,)
        out[allowed] = self.weights @ logp[:, allowed]  # Σ_i w_i log p_i(a)
        return out - logsumexp(out)

    # ------------------------------------------------------------------ steps
    async def __lshift__(self, sym) -> EnsembleState:
        """The ensemble after one more symbol (a byte 0-255, or EOS=257); every member steps.

        An impossible symbol gives a state with ``logZ = -inf`` (as a beam gives an empty beam).
        """
        sym = check_symbol(sym)
        if self.terminated:
            raise ValueError("this ensemble has ended (EOS) and accepts nothing")
        if self.kind == "mixture":
            post = self.posterior() if self.logZ > -math.inf else np.zeros(len(self.members))
            members = await self._step_members(sym, [p > 0 for p in post])
            return self._new(members, ended=sym == EOS)
        logq = (await self.logp_next())[sym] if self._chain > -math.inf else -math.inf
        if logq == -math.inf:
            return self._new(self.members, -math.inf)
        members = await self._step_members(sym, [True] * len(self.members))
        return self._new(members, self._chain + logq, ended=sym == EOS)

    async def _step_members(self, sym: int, live: list[bool]) -> tuple:
        """Every live member after ``sym``, concurrently; dead ones (probability 0) stay as they are."""
        stepped = await asyncio.gather(*(m << sym for m, ok in zip(self.members, live) if ok))
        it = iter(stepped)
        return tuple(next(it) if ok else m for m, ok in zip(self.members, live))

    def prune(self) -> EnsembleState:
        """Every member pruned (see its own ``prune``); ``self`` when none changes."""
        pruned = tuple(m.prune() for m in self.members)
        if all(p is m for p, m in zip(pruned, self.members)):
            return self
        return self._new(pruned, self._chain, self.terminated)

    async def prefill(self, data: bytes, progress=None) -> EnsembleState:
        """The ensemble after ``data``: a mixture prefills its members concurrently (their fast
        path); a product steps byte by byte (its ``logZ`` is the chain of its own distributions).

        Args:
            data: the bytes.
            progress: optional callable receiving the number of bytes read so far: by the member
                furthest along (a mixture; so when every member died, ``n - 1`` is the offset of the
                byte the last one died on), or by the product (which stops at a byte it gives
                probability 0, after reporting it).
        """
        data = check_prompt(data)
        if not data:
            return self
        if self.terminated:
            raise ValueError("this ensemble has ended (EOS) and accepts nothing")
        if self.kind == "product":
            state = self
            for n, b in enumerate(data, 1):
                state = await (state.prune() << b)
                if progress is not None:
                    progress(n)
                if state.logZ == -math.inf:
                    logger.debug("prefill: the product gives byte %r probability 0", bytes([b]))
                    break
            return state
        done = [0] * len(self.members)

        def member_progress(i: int):
            def report(n: int) -> None:
                high = max(done)
                done[i] = n
                if n > high:
                    progress(n)
            return report

        members = await asyncio.gather(*(self._prefill_member(m, data, member_progress(i) if progress else None)
                                         for i, m in enumerate(self.members)))
        return self._new(tuple(members))

    @staticmethod
    async def _prefill_member(member: StatefulByteLM, data: bytes, progress) -> StatefulByteLM:
        if progress is None:
            return await member.prefill(data)
        return await member.prefill(data, progress=progress)

    async def cleanup(self) -> None:
        """Release every member's covers; the ensemble is unusable afterwards."""
        await asyncio.gather(*(m.cleanup() for m in self.members))
        self._next = None

    @property
    def has_eos(self) -> bool:
        """Whether this ensemble can produce EOS: a mixture if any member can, a product if all can."""
        from genlm_bytes.constraints.state import infer_has_eos

        flags = [infer_has_eos(m) for m in self.members]
        return any(flags) if self.kind == "mixture" else all(flags)
