"""Sequential Monte Carlo over constrained byte states.

Target: texts ``x`` of at most ``max_bytes`` bytes that the constraint accepts,
weighted by the byte-level LM,

    γ(x) = P(x · EOS) · 1[x accepted],        Z = Σ_x γ(x)

(without EOS tokens, ``P(x)`` for texts where generation finishes: complete
with no byte allowed, or complete at the byte limit). ``Z`` is the probability
that the LM generates an accepted text of at most ``max_bytes`` bytes.

Each of ``N`` particles draws its next symbol from the constrained
distribution ``q(a | x) ∝ p(a | x) m(a)`` and multiplies its weight by
the mass the constraint kept, ``Σ_a p(a | x) m(a)``, so the weight of a
finished particle is ``γ(x) / q(x)``. When the effective sample size
``(Σ w)² / Σ w²`` drops below ``ess_threshold · N`` the particles are
resampled (systematic resampling) and every weight is set to the mean, so
``mean(w)`` at the end is an unbiased estimate of ``Z`` and the normalized
weights approximate ``γ / Z``, the distribution of the LM's texts given the
constraint. Particles at a dead end (nothing allowed, or zero mass) get weight 0.

Particles step together: at each step the distinct states (copies made by
resampling are shared) compute their distributions concurrently
(``asyncio.gather``), so a batching backend makes one batched LM call for all.

Example:
    >>> res = await smc(beam, Regex(r"[0-9]{3}-[0-9]{4}"), n_particles=16, max_bytes=12, rng=0)  # doctest: +SKIP
    >>> res.log_ml, res.best()                                                           # doctest: +SKIP
    (-9.3, b'555-1234')

Not handled: twisting / look-ahead proposals, temperature or top-k in the
proposal, rejuvenation moves.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
from dataclasses import dataclass

import numpy as np

from genlm_bytes.byte_lm.lm_state import StatefulByteLM
from genlm_bytes.constraints.base import Constraint, ConstraintError
from genlm_bytes.constraints.state import ConstrainedState, logsumexp
from genlm_bytes.dist import Chart
from genlm_bytes.sampling import RngLike, as_generator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Particle:
    """One particle: its state and its log weight (natural log, unnormalized)."""

    state: ConstrainedState
    log_weight: float

    @property
    def text(self) -> bytes:
        return self.state.text

    @property
    def finished(self) -> bool:
        return self.state.finished


@dataclass(frozen=True)
class SMCResult:
    """What :func:`smc` returns.

    Attributes:
        particles: the ``N`` particles (some may share a state).
        log_weights: float64 ``(N,)`` unnormalized log weights (-inf: dead or unfinished).
        weights: float64 ``(N,)`` normalized weights (sum 1).
        log_ml: log of the estimate of ``Z``, the probability that the LM generates an accepted text.
        n_resamples: how many times the particles were resampled.
        ess: the effective sample size after each step (before any resampling).
    """

    particles: list[Particle]
    log_weights: np.ndarray
    weights: np.ndarray
    log_ml: float
    n_resamples: int
    ess: list[float]

    @property
    def texts(self) -> list[bytes]:
        return [p.text for p in self.particles]

    def posterior(self) -> Chart:
        """A :class:`~genlm_bytes.dist.Chart` from text to the total normalized weight of its particles."""
        out: dict[bytes, float] = {}
        for p, w in zip(self.particles, self.weights):
            if w > 0:
                out[p.text] = out.get(p.text, 0.0) + float(w)
        return Chart(out)

    def best(self) -> bytes:
        """The text with the most posterior weight."""
        return self.posterior().argmax()

    def sample(self, rng: RngLike = None) -> bytes:
        """One text drawn from the normalized weights."""
        gen = as_generator(rng)
        return self.particles[int(gen.choice(len(self.particles), p=self.weights))].text


def effective_sample_size(log_weights: np.ndarray) -> float:
    """``(Σ w)² / Σ w²`` of log weights ``(N,)``; 0 when every weight is 0.

    >>> effective_sample_size(np.log([1.0, 1.0, 0.0]))
    2.0
    """
    lse = logsumexp(log_weights)
    if lse == -math.inf:
        return 0.0
    return float(math.exp(2 * lse - logsumexp(2 * log_weights)))


def systematic_resample(weights: np.ndarray, gen: np.random.Generator) -> np.ndarray:
    """Indices ``(N,)`` drawn by systematic resampling from normalized ``weights (N,)``.

    Particle ``i`` gets ``floor(N w_i)`` or ``ceil(N w_i)`` copies; one uniform draw in all.
    """
    n = len(weights)
    positions = (gen.random() + np.arange(n)) / n  # (N,) one point in each 1/N stratum
    cdf = np.cumsum(weights)  # (N,)
    cdf[-1] = 1.0  # guard against rounding
    return np.searchsorted(cdf, positions, side="right")


def _draw(logq: np.ndarray, k: int, gen: np.random.Generator) -> np.ndarray:
    """``k`` symbols ``(k,)`` from normalized log-probs ``logq (258,)`` (inverse CDF in float64)."""
    cdf = np.cumsum(np.exp(logq))  # (258,)
    u = (1.0 - gen.random(k)) * cdf[-1]  # (k,) in (0, total]
    return np.searchsorted(cdf, u, side="left")  # first j with cdf[j] >= u, so q[j] > 0


def _check_args(state, constraint, n_particles, max_bytes, ess_threshold):
    if not isinstance(state, StatefulByteLM):
        raise TypeError(f"state must be a byte-level state (e.g. a ByteBeamState), got {type(state).__name__}")
    if isinstance(state, ConstrainedState):
        raise TypeError("pass the unconstrained state and the constraint separately: "
                        "smc(beam, constraint, ...)")
    if not isinstance(constraint, Constraint):
        raise TypeError(f"constraint must be a Constraint (Regex, StringSet, Predicate, ...), "
                        f"got {type(constraint).__name__}")
    if isinstance(n_particles, bool) or not isinstance(n_particles, numbers.Integral) or n_particles < 1:
        raise ValueError(f"n_particles must be an int >= 1, got {n_particles!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral) or max_bytes < 0:
        raise ValueError(f"max_bytes must be an int >= 0 (the longest text), got {max_bytes!r}")
    if isinstance(ess_threshold, bool) or not isinstance(ess_threshold, numbers.Real) \
            or not 0 <= ess_threshold <= 1:
        raise ValueError(f"ess_threshold must be a number in [0, 1] (a fraction of n_particles; "
                         f"0 never resamples), got {ess_threshold!r}")


async def smc(state: StatefulByteLM, constraint: Constraint, n_particles: int, max_bytes: int, *,
              ess_threshold: float = 0.5, rng: RngLike = None, has_eos: bool | None = None) -> SMCResult:
    """Sample texts from the LM conditioned on ``constraint`` with ``n_particles`` particles.

    Args:
        state: the byte-level state to continue (e.g. a beam after a prompt); the constraint applies
            to the bytes generated from it. For an exact LM use a beam with no pruning.
        constraint: what the generated text must satisfy.
        n_particles: ``N >= 1``.
        max_bytes: the longest text; at that length only EOS is allowed.
        ess_threshold: resample when the effective sample size is below this fraction of ``N``.
        rng: ``None``, an int seed or a ``np.random.Generator``.
        has_eos: whether the model can produce EOS (default: from ``state.params.eos_tokens``).

    Returns:
        An :class:`SMCResult`: particles, normalized weights, the log marginal-likelihood estimate.

    Raises:
        ConstraintError: every particle reached a dead end (the constraint, within ``max_bytes``
            bytes, allows nothing the model can generate).
    """
    _check_args(state, constraint, n_particles, max_bytes, ess_threshold)
    gen = as_generator(rng)
    N = int(n_particles)
    root = ConstrainedState(state, constraint, has_eos=has_eos)
    states: list[ConstrainedState] = [root] * N
    logw = np.zeros(N)  # (N,) log weights
    n_resamples, ess_log, last_dead, n_cut = 0, [], None, 0

    for _ in range(max_bytes + 1):  # every step adds one byte or ends, so this bounds the loop
        active = [i for i in range(N) if logw[i] > -math.inf and not states[i].is_finished(max_bytes)]
        if not active:
            break
        # 1. The constrained distribution of each distinct state, all at once.
        groups: dict[int, list[int]] = {}
        for i in active:
            groups.setdefault(id(states[i]), []).append(i)
        reps = [states[g[0]] for g in groups.values()]
        dists = await asyncio.gather(*(s.masked_logp_next(max_bytes) for s in reps))
        # 2. Weight by the kept mass, draw each particle's symbol.
        moves: dict[tuple[int, int], list[int]] = {}
        for s, (logp, log_kept), members in zip(reps, dists, groups.values()):
            logw[members] += log_kept
            if log_kept == -math.inf:
                if len(s.text) >= max_bytes:
                    n_cut += len(members)
                else:
                    last_dead = s
                continue
            for i, sym in zip(members, _draw(logp - log_kept, len(members), gen)):
                moves.setdefault((id(s), int(sym)), []).append(i)
        # 3. Step: one child per distinct (state, symbol).
        keys = list(moves)
        children = await asyncio.gather(*(states[moves[k][0]].prune() << k[1] for k in keys))
        for k, child in zip(keys, children):
            for i in moves[k]:
                states[i] = child
        # 4. Resample when the weights degenerate.
        ess = effective_sample_size(logw)
        ess_log.append(ess)
        if ess == 0.0:
            break
        if ess < ess_threshold * N and any(logw[i] > -math.inf and not states[i].is_finished(max_bytes)
                                           for i in range(N)):
            lse = logsumexp(logw)
            idx = systematic_resample(np.exp(logw - lse), gen)
            states = [states[j] for j in idx]
            logw = np.full(N, lse - math.log(N))
            n_resamples += 1

    for i in range(N):  # the step bound makes every live particle finished; this is a guard
        if not states[i].is_finished(max_bytes):
            logw[i] = -math.inf
    lse = logsumexp(logw)
    if lse == -math.inf:
        why = []
        if last_dead is not None:
            why.append(f"a dead end (nothing allowed has probability > 0), e.g. after {last_dead.text!r}")
        if n_cut:
            why.append(f"the {max_bytes}-byte limit where the text could not end (incomplete, or EOS has "
                       f"probability 0 there); raise max_bytes")
        raise ConstraintError(f"no particle produced a text that {constraint!r} accepts within {max_bytes} bytes: "
                              f"particles stopped at " + "; or at ".join(why))
    logger.debug("smc: N=%d, %d resamples, log_ml=%.4f", N, n_resamples, lse - math.log(N))
    return SMCResult(
        particles=[Particle(s, float(w)) for s, w in zip(states, logw)],
        log_weights=logw.copy(),
        weights=np.exp(logw - lse),
        log_ml=float(lse - math.log(N)),
        n_resamples=n_resamples,
        ess=ess_log,
    )

