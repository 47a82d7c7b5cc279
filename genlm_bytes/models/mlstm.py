"""mLSTM: the matrix-memory LSTM cell in three equivalent forms, and a small LM built on it.

The cell keeps, per head, a memory matrix C (DHQK, DHV), a normalizer n (DHQK)
and a stabilizer m (1). One step with query q, key k, value v and gate
pre-activations ĩ, f̃ (stabilized exponential gating):

    m' = max(log σ(f̃) + m, ĩ)
    f  = exp(log σ(f̃) + m − m'),   i = exp(ĩ − m')
    C' = f·C + i·k vᵀ,              n' = f·n + i·k
    h  = q̃ᵀC' / (max(|q̃ᵀn'|, exp(−m')) + eps),   q̃ = q / √DHQK

The stored C and n are the true ones times exp(−m), so no exponential of a gate
is ever taken unstabilized: large pre-activations stay finite.

- :func:`recurrent_step_fw`: one step (the shapes of a decoding step).
- :func:`recurrent_sequence_fw`: the step in a loop over (B, NH, S, DH) inputs.
- :func:`parallel_stabilized_fw`: the same outputs from an (S, S) decay matrix,
  quadratic in S, with optional initial and returned final states.

All three use the same stabilizer (m starts at 0 when no initial state is
given), so they agree to rounding, eps term included.

:class:`MLSTMLM` stacks mLSTM blocks into a language model whose cache is the
per-block state (C, n, m): a fixed number of bytes whatever the context length.

Not handled: the chunkwise kernels of xLSTM (the LM runs the parallel form on
chunks of ``chunk_size`` tokens, which bounds memory the same way), sLSTM blocks,
training utilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genlm_bytes.models.llama import (
    DTYPES,
    SwiGLU,
    check_dtype,
    check_float,
    check_int,
    soft_cap,
    swiglu_width,
)

LayerState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # C (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH, 1)


# ---------------------------------------------------------------------------------------------
# input checks


def _shape_error(name: str, t, expected: str) -> ValueError:
    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
    return ValueError(f"{name} must have shape {expected}, got {got}")


def _check(name: str, t, shape: tuple, expected: str) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        raise _shape_error(name, t, expected)


def _gate(name: str, t, B: int, NH: int, S: int) -> torch.Tensor:
    """Accept a gate pre-activation of shape (B, NH, S) or (B, NH, S, 1); return (B, NH, S)."""
    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] == 1:
        t = t[..., 0]
    _check(name, t, (B, NH, S), f"(B, NH, S) or (B, NH, S, 1) = ({B}, {NH}, {S}[, 1])")
    return t


def _initial_states(c_initial, n_initial, m_initial, B, NH, DHQK, DHV, dtype, device) -> LayerState | None:
    """Validate optional initial states; None when none is given; zeros for the missing ones."""
    if c_initial is None and n_initial is None and m_initial is None:
        return None
    if c_initial is None:
        c_initial = torch.zeros(B, NH, DHQK, DHV, dtype=dtype, device=device)
    if n_initial is None:
        n_initial = torch.zeros(B, NH, DHQK, dtype=dtype, device=device)
    if m_initial is None:
        m_initial = torch.zeros(B, NH, 1, dtype=dtype, device=device)
    if isinstance(m_initial, torch.Tensor) and m_initial.dim() == 2:
        m_initial = m_initial[..., None]
    _check("c_initial", c_initial, (B, NH, DHQK, DHV), f"(B, NH, DHQK, DHV) = ({B}, {NH}, {DHQK}, {DHV})")
    _check("n_initial", n_initial, (B, NH, DHQK), f"(B, NH, DHQK) = ({B}, {NH}, {DHQK})")
    _check("m_initial", m_initial, (B, NH, 1), f"(B, NH) or (B, NH, 1) = ({B}, {NH}[, 1])")
    return c_initial.to(dtype), n_initial.to(dtype), m_initial.to(dtype)


def zero_state(B: int, NH: int, DHQK: int, DHV: int, dtype=torch.float32, device=None) -> LayerState:
    """The state before any input: C = 0, n = 0, m = 0."""
    return (torch.zeros(B, NH, DHQK, DHV, dtype=dtype, device=device),
            torch.zeros(B, NH, DHQK, dtype=dtype, device=device), torch.zeros(B, NH, 1, dtype=dtype, device=device))


def _check_qkv(queries, keys, values) -> tuple[int, int, int, int, int]:
    if not isinstance(queries, torch.Tensor) or queries.dim() != 4:
        raise _shape_error("queries", queries, "(B, NH, S, DHQK)")
    B, NH, S, DHQK = queries.shape
    _check("keys", keys, (B, NH, S, DHQK), f"(B, NH, S, DHQK) = ({B}, {NH}, {S}, {DHQK})")
    if not isinstance(values, torch.Tensor) or values.dim() != 4 or tuple(values.shape[:3]) != (B, NH, S):
        raise _shape_error("values", values, f"(B, NH, S, DHV) = ({B}, {NH}, {S}, DHV)")
    return B, NH, S, DHQK, values.shape[-1]


# ---------------------------------------------------------------------------------------------
# the three forms


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``log σ(x) = min(x, 0) − log1p(exp(−|x|))``, stable for any x.

    (``F.logsigmoid`` gives the same values but costs up to milliseconds per call on the
    tiny tensors of a decoding step on CPU.)
    """
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-x.abs()))


def _step(C, n, m, q, k, v, i_pre, f_pre, eps):
    DHQK = q.shape[-1]
    log_f = log_sigmoid(f_pre)  # (B, NH, 1)
    m_new = torch.maximum(log_f + m, i_pre)  # (B, NH, 1)
    f = torch.exp(log_f + m - m_new)  # (B, NH, 1)
    i = torch.exp(i_pre - m_new)  # (B, NH, 1)
    C_new = f[..., None] * C + i[..., None] * (k[..., :, None] * v[..., None, :])  # (B, NH, DHQK, DHV)
    n_new = f * n + i * k  # (B, NH, DHQK)
    q = q / math.sqrt(DHQK)  # (B, NH, DHQK)
    h_num = (q[..., None, :] @ C_new)[..., 0, :]  # (B, NH, DHV)
    qn = (q * n_new).sum(-1, keepdim=True)  # (B, NH, 1)
    h = h_num / (torch.maximum(qn.abs(), torch.exp(-m_new)) + eps)  # (B, NH, DHV)
    return h, (C_new, n_new, m_new)


def recurrent_step_fw(matC_state: torch.Tensor, vecN_state: torch.Tensor, scaM_state: torch.Tensor,
                      vecQ: torch.Tensor, vecK: torch.Tensor, vecV: torch.Tensor,
                      scaI: torch.Tensor, scaF: torch.Tensor, eps: float = 1e-6
                      ) -> tuple[torch.Tensor, LayerState]:
    """One mLSTM step.

    Args:
        matC_state: memory ``(B, NH, DHQK, DHV)``.
        vecN_state: normalizer ``(B, NH, DHQK)``.
        scaM_state: stabilizer ``(B, NH, 1)`` (log space).
        vecQ, vecK: ``(B, NH, DHQK)``.
        vecV: ``(B, NH, DHV)``.
        scaI, scaF: input and forget gate pre-activations ``(B, NH, 1)``.
        eps: added to the denominator of h.

    Returns:
        ``(h, (C, n, m))``: the hidden state ``(B, NH, DHV)`` and the new states (new
        tensors; the inputs are not modified).

    Raises:
        ValueError: a tensor's shape does not fit the others (the message names it).
    """
    if not isinstance(matC_state, torch.Tensor) or matC_state.dim() != 4:
        raise _shape_error("matC_state", matC_state, "(B, NH, DHQK, DHV)")
    B, NH, DHQK, DHV = matC_state.shape
    for name, t, shape in [("vecN_state", vecN_state, (B, NH, DHQK)), ("scaM_state", scaM_state, (B, NH, 1)),
                           ("vecQ", vecQ, (B, NH, DHQK)), ("vecK", vecK, (B, NH, DHQK)),
                           ("vecV", vecV, (B, NH, DHV)), ("scaI", scaI, (B, NH, 1)), ("scaF", scaF, (B, NH, 1))]:
        _check(name, t, shape, str(shape))
    return _step(matC_state, vecN_state, scaM_state, vecQ, vecK, vecV, scaI, scaF, eps)


def recurrent_sequence_fw(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          igate_preact: torch.Tensor, fgate_preact: torch.Tensor,
                          c_initial: torch.Tensor | None = None, n_initial: torch.Tensor | None = None,
                          m_initial: torch.Tensor | None = None, return_last_states: bool = False,
                          eps: float = 1e-6, state_dtype: torch.dtype | None = None):
    """The mLSTM over a sequence, one :func:`recurrent_step_fw` per position.

    Args:
        queries, keys: ``(B, NH, S, DHQK)``.
        values: ``(B, NH, S, DHV)``.
        igate_preact, fgate_preact: ``(B, NH, S)`` or ``(B, NH, S, 1)``.
        c_initial, n_initial, m_initial: optional initial states ``(B, NH, DHQK, DHV)``,
            ``(B, NH, DHQK)``, ``(B, NH)`` or ``(B, NH, 1)``; missing ones are zeros.
        return_last_states: also return the states after the last position.
        eps: added to the denominator of h.
        state_dtype: dtype in which the states are kept and the steps computed; default
            the initial state's dtype, else the queries'.

    Returns:
        h ``(B, NH, S, DHV)`` in the queries' dtype, or ``(h, (C, n, m))`` with
        ``return_last_states``.
    """
    B, NH, S, DHQK, DHV = _check_qkv(queries, keys, values)
    i_pre = _gate("igate_preact", igate_preact, B, NH, S)
    f_pre = _gate("fgate_preact", fgate_preact, B, NH, S)
    if state_dtype is None:
        state_dtype = c_initial.dtype if isinstance(c_initial, torch.Tensor) else queries.dtype
    init = _initial_states(c_initial, n_initial, m_initial, B, NH, DHQK, DHV, state_dtype, queries.device)
    C, n, m = init if init is not None else zero_state(B, NH, DHQK, DHV, state_dtype, queries.device)
    # time-major copies, so that every step reads contiguous slices
    q, k, v = (t.to(state_dtype).permute(2, 0, 1, 3).contiguous() for t in (queries, keys, values))  # (S, B, NH, DH)
    i_pre, f_pre = (g.to(state_dtype).permute(2, 0, 1)[..., None].contiguous() for g in (i_pre, f_pre))  # (S, B, NH, 1)
    hs = []
    for t in range(S):
        h, (C, n, m) = _step(C, n, m, q[t], k[t], v[t], i_pre[t], f_pre[t], eps)
        hs.append(h)
    h = torch.stack(hs, dim=2).to(queries.dtype)  # (B, NH, S, DHV)
    return (h, (C, n, m)) if return_last_states else h


def parallel_stabilized_fw(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           igate_preact: torch.Tensor, fgate_preact: torch.Tensor,
                           c_initial: torch.Tensor | None = None, n_initial: torch.Tensor | None = None,
                           m_initial: torch.Tensor | None = None, return_last_states: bool = False,
                           eps: float = 1e-6, state_dtype: torch.dtype | None = None):
    """The mLSTM over a sequence in parallel (quadratic) form; same arguments and results as
    :func:`recurrent_sequence_fw`.

    With ``log_f_r = log σ(f̃_r)``, position t weighs position s ≤ t by
    ``exp(Σ_{s<r≤t} log_f_r + ĩ_s − m_t)`` and the initial state by
    ``exp(Σ_{r≤t} log_f_r + m_0 − m_t)``, where m_t is the largest of these log-weights,
    which is exactly the m of the recurrence. Memory is O(B · NH · S²).
    """
    B, NH, S, DHQK, DHV = _check_qkv(queries, keys, values)
    i_pre = _gate("igate_preact", igate_preact, B, NH, S)
    f_pre = _gate("fgate_preact", fgate_preact, B, NH, S)
    if state_dtype is None:
        state_dtype = c_initial.dtype if isinstance(c_initial, torch.Tensor) else queries.dtype
    init = _initial_states(c_initial, n_initial, m_initial, B, NH, DHQK, DHV, state_dtype, queries.device)
    q, k, v = (t.to(state_dtype) for t in (queries, keys, values))
    i_pre, f_pre = i_pre.to(state_dtype), f_pre.to(state_dtype)
    dev = q.device

    log_f = log_sigmoid(f_pre)  # (B, NH, S)
    # log decay from s to t: sum of log_f over (s, t]; a masked cumsum per column keeps precision on long inputs
    later = torch.ones(S, S, dtype=torch.bool, device=dev).tril(-1)  # [t, s]: t > s
    log_decay = torch.where(later, log_f[..., :, None], 0.0).cumsum(dim=-2)  # (B, NH, S, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()  # [t, s]: t >= s
    log_w = torch.where(causal, log_decay + i_pre[..., None, :], -math.inf)  # (B, NH, S, S)
    m0 = init[2][..., 0] if init is not None else torch.zeros(B, NH, dtype=state_dtype, device=dev)  # (B, NH)
    log_w0 = log_f.cumsum(dim=-1) + m0[..., None]  # (B, NH, S): log-weight of the initial state
    m = torch.maximum(log_w.amax(dim=-1), log_w0)  # (B, NH, S)
    w = torch.exp(log_w - m[..., None])  # (B, NH, S, S)
    w0 = torch.exp(log_w0 - m)  # (B, NH, S)

    q = q / math.sqrt(DHQK)  # (B, NH, S, DHQK)
    scores = (q @ k.transpose(-1, -2)) * w  # (B, NH, S, S)
    h_num = scores @ v  # (B, NH, S, DHV)
    qn = scores.sum(dim=-1)  # (B, NH, S)
    if init is not None:
        C0, n0, _ = init
        h_num = h_num + w0[..., None] * (q @ C0)  # (B, NH, S, DHV)
        qn = qn + w0 * (q @ n0[..., None])[..., 0]  # (B, NH, S)
    h = h_num / (torch.maximum(qn.abs(), torch.exp(-m)) + eps)[..., None]  # (B, NH, S, DHV)
    h = h.to(queries.dtype)
    if not return_last_states:
        return h
    w_last = w[:, :, -1, :, None]  # (B, NH, S, 1): weights of every position in the final state
    C = (k * w_last).transpose(-1, -2) @ v  # (B, NH, DHQK, DHV)
    n = (k * w_last).sum(dim=-2)  # (B, NH, DHQK)
    if init is not None:
        C = C + w0[:, :, -1, None, None] * C0
        n = n + w0[:, :, -1, None] * n0
    return h, (C, n, m[:, :, -1:])


# ---------------------------------------------------------------------------------------------
# the language model


@dataclass(frozen=True)
class MLSTMConfig:
    """Shape and options of an :class:`MLSTMLM`.

    Attributes:
        vocab_size: number of token ids V.
        embedding_dim: model width D.
        num_blocks: number of blocks (mLSTM layer + SwiGLU feed-forward, each pre-normed).
        num_heads: mLSTM heads NH.
        qk_dim_factor: query/key width of all heads together, as a fraction of D
            (DHQK = D · qk_dim_factor / NH).
        v_dim_factor: value width of all heads together, as a fraction of D.
        ffn_multiple_of, ffn_dim_multiplier: feed-forward width as in :class:`~genlm_bytes.models.llama.LlamaConfig`.
        gate_soft_cap: soft-clip gate pre-activations to ±cap (None: no cap).
        logits_soft_cap: soft-clip logits to ±cap (None: no cap).
        norm_eps: epsilon of every RMSNorm.
        eps: epsilon of the mLSTM denominator.
        tie_embeddings: the output layer shares the input embedding matrix.
        dtype: parameter dtype ("float32", "float64", "bfloat16", "float16").
        chunk_size: the parallel form runs on chunks of this many tokens, carrying the
            state between chunks (memory O(chunk_size²) per head, not O(S²)).
    """

    vocab_size: int
    embedding_dim: int
    num_blocks: int
    num_heads: int = 4
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    ffn_multiple_of: int = 64
    ffn_dim_multiplier: float = 1.0
    gate_soft_cap: float | None = 15.0
    logits_soft_cap: float | None = None
    norm_eps: float = 1e-6
    eps: float = 1e-6
    tie_embeddings: bool = False
    dtype: str = "float32"
    chunk_size: int = 64

    def __post_init__(self):
        name = "MLSTMConfig"
        for field in ("vocab_size", "embedding_dim", "num_blocks", "num_heads", "ffn_multiple_of", "chunk_size"):
            check_int(name, field, getattr(self, field))
        for field in ("qk_dim_factor", "v_dim_factor", "ffn_dim_multiplier", "norm_eps", "eps"):
            check_float(name, field, getattr(self, field))
        for field in ("gate_soft_cap", "logits_soft_cap"):
            check_float(name, field, getattr(self, field), optional=True)
        for field, factor in (("qk_dim_factor", self.qk_dim_factor), ("v_dim_factor", self.v_dim_factor)):
            width = self.embedding_dim * factor
            if width != int(width) or int(width) % self.num_heads or int(width) == 0:
                raise ValueError(f"{name}.{field}: embedding_dim · {field} = {width} must be a positive "
                                 f"integer divisible by num_heads={self.num_heads}")
        check_dtype(name, self.dtype)

    @property
    def qk_head_dim(self) -> int:
        return int(self.embedding_dim * self.qk_dim_factor) // self.num_heads

    @property
    def v_head_dim(self) -> int:
        return int(self.embedding_dim * self.v_dim_factor) // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return swiglu_width(self.embedding_dim, self.ffn_dim_multiplier, self.ffn_multiple_of)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class MLSTMState:
    """The recurrent state of an :class:`MLSTMLM` after a context: one (C, n, m) per block.

    Its size does not depend on the context length. Never changed after construction,
    so beams can share it freely.

    Attributes:
        layers: per block ``(C (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH, 1))``.
    """

    layers: tuple[LayerState, ...]

    @property
    def batch_size(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the state (constant in the context length)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    def select(self, i: int) -> MLSTMState:
        """Row ``i`` as a batch of one (views, no copy)."""
        return MLSTMState(tuple(tuple(t[i : i + 1] for t in layer) for layer in self.layers))

    @staticmethod
    def stack(states: Sequence[MLSTMState]) -> MLSTMState:
        """Concatenate states along the batch axis."""
        return MLSTMState(tuple(tuple(torch.cat(ts) for ts in zip(*layers))
                                for layers in zip(*(s.layers for s in states))))


class MLSTMLayer(nn.Module):
    """q, k, v and gates from x; the mLSTM cell; per-head RMSNorm; output gate; projection."""

    def __init__(self, config: MLSTMConfig):
        super().__init__()
        D, NH = config.embedding_dim, config.num_heads
        self.NH, self.DHQK, self.DHV = NH, config.qk_head_dim, config.v_head_dim
        self.q_proj = nn.Linear(D, NH * self.DHQK, bias=False)
        self.k_proj = nn.Linear(D, NH * self.DHQK, bias=False)
        self.v_proj = nn.Linear(D, NH * self.DHV, bias=False)
        self.gate_proj = nn.Linear(D, 2 * NH, bias=True)  # input and forget gate pre-activations per head
        self.o_gate = nn.Linear(D, NH * self.DHV, bias=False)
        self.h_norm_weight = nn.Parameter(torch.ones(NH * self.DHV))
        self.out_proj = nn.Linear(NH * self.DHV, D, bias=False)
        self.config = config

    def forward(self, x: torch.Tensor, state: LayerState, mode: str) -> tuple[torch.Tensor, LayerState]:
        B, S, _ = x.shape
        cfg = self.config
        q = self.q_proj(x).view(B, S, self.NH, self.DHQK).transpose(1, 2)  # (B, NH, S, DHQK)
        k = self.k_proj(x).view(B, S, self.NH, self.DHQK).transpose(1, 2)  # (B, NH, S, DHQK)
        v = self.v_proj(x).view(B, S, self.NH, self.DHV).transpose(1, 2)  # (B, NH, S, DHV)
        gates = soft_cap(self.gate_proj(x), cfg.gate_soft_cap)  # (B, S, 2·NH)
        i_pre, f_pre = gates.view(B, S, 2, self.NH).permute(2, 0, 3, 1)  # each (B, NH, S)
        if S == 1:
            h, state = _step(*state, q[:, :, 0], k[:, :, 0], v[:, :, 0], i_pre, f_pre, cfg.eps)
            h = h[:, :, None]  # (B, NH, 1, DHV)
        elif mode == "recurrent":
            h, state = recurrent_sequence_fw(q, k, v, i_pre, f_pre, *state, return_last_states=True, eps=cfg.eps)
        else:
            hs = []
            for a in range(0, S, cfg.chunk_size):
                b = a + cfg.chunk_size
                h, state = parallel_stabilized_fw(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], i_pre[..., a:b],
                                                  f_pre[..., a:b], *state, return_last_states=True, eps=cfg.eps)
                hs.append(h)
            h = torch.cat(hs, dim=2)  # (B, NH, S, DHV)
        h = F.rms_norm(h.transpose(1, 2), (self.DHV,), eps=cfg.norm_eps)  # (B, S, NH, DHV)
        h = h.reshape(B, S, self.NH * self.DHV) * self.h_norm_weight  # (B, S, NH·DHV)
        return self.out_proj(h * torch.sigmoid(self.o_gate(x))), state  # (B, S, D)


class MLSTMBlock(nn.Module):
    def __init__(self, config: MLSTMConfig):
        super().__init__()
        self.mlstm_norm = nn.RMSNorm(config.embedding_dim, eps=config.norm_eps)
        self.mlstm = MLSTMLayer(config)
        self.ffn_norm = nn.RMSNorm(config.embedding_dim, eps=config.norm_eps)
        self.ffn = SwiGLU(config.embedding_dim, config.ffn_dim)

    def forward(self, x, state: LayerState, mode: str):
        y, state = self.mlstm(self.mlstm_norm(x), state, mode)
        x = x + y  # (B, S, D)
        return x + self.ffn(self.ffn_norm(x)), state  # (B, S, D)


class MLSTMLM(nn.Module):
    """A language model of mLSTM blocks; its cache is an :class:`MLSTMState`.

    Args:
        config: the :class:`MLSTMConfig`. Weights are initialized N(0, 0.02), input-gate
            biases 0 and forget-gate biases spread over 3..6 (long memory at the start).
    """

    MODES = ("parallel", "recurrent")

    def __init__(self, config: MLSTMConfig):
        super().__init__()
        if not isinstance(config, MLSTMConfig):
            raise TypeError(f"config must be an MLSTMConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.blocks = nn.ModuleList(MLSTMBlock(config) for _ in range(config.num_blocks))
        self.norm = nn.RMSNorm(config.embedding_dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.embedding_dim, config.vocab_size, bias=False)
        NH = config.num_heads
        for name, p in self.named_parameters():
            if name.endswith("gate_proj.bias"):
                with torch.no_grad():
                    p[:NH] = 0.0
                    p[NH:] = torch.linspace(3.0, 6.0, NH)
            elif p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.to(config.torch_dtype)

    def initial_state(self, batch_size: int = 1) -> MLSTMState:
        """The zero state (C = 0, n = 0, m = 0 in every block): the state before any token."""
        cfg, p = self.config, self.embed.weight
        return MLSTMState(tuple(zero_state(batch_size, cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim,
                                           p.dtype, p.device) for _ in self.blocks))

    def forward(self, input_ids: torch.Tensor, state: MLSTMState | None = None, *,
                mode: str = "parallel") -> torch.Tensor:
        """Logits ``(B, S, V)`` of ``input_ids`` (B, S) after ``state`` (default: the zero state)."""
        return self.forward_cached(input_ids, state, mode=mode)[0]

    def forward_cached(self, input_ids: torch.Tensor, state: MLSTMState | None = None, *,
                       mode: str = "parallel") -> tuple[torch.Tensor, MLSTMState]:
        """Logits ``(B, S, V)`` of ``input_ids`` after ``state``, and the state after them.

        Args:
            input_ids: ``(B, S)`` token ids.
            state: the state to continue (None: the zero state). Not modified.
            mode: "parallel" (chunked parallel form) or "recurrent" (one step per token);
                both give the same result up to rounding. A single token always takes one step.

        Raises:
            ValueError: bad ``input_ids`` shape or ids, a state of the wrong batch size or
                shape, an unknown ``mode``.
        """
        cfg = self.config
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer tensor of shape (B, S), got {got}")
        B, S = input_ids.shape
        if S == 0:
            raise ValueError("input_ids has no tokens (S = 0)")
        if input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size:
            raise ValueError(f"input_ids has ids outside 0..{cfg.vocab_size - 1}")
        if state is None:
            state = self.initial_state(B)
        self._check_state(state, B)
        x = self.embed(input_ids)  # (B, S, D)
        new_layers = []
        for block, layer_state in zip(self.blocks, state.layers):
            x, layer_state = block(x, layer_state, mode)  # (B, S, D)
            new_layers.append(layer_state)
        logits = soft_cap(self.lm_head(self.norm(x)), cfg.logits_soft_cap)  # (B, S, V)
        return logits, MLSTMState(tuple(new_layers))

    def _check_state(self, state, B: int) -> None:
        cfg = self.config
        if not isinstance(state, MLSTMState) or len(state.layers) != cfg.num_blocks:
            raise ValueError(f"state must be an MLSTMState with {cfg.num_blocks} layers, got "
                             f"{type(state).__name__}")
        NH, DK, DV = cfg.num_heads, cfg.qk_head_dim, cfg.v_head_dim
        for C, n, m in state.layers:
            _check("state C", C, (B, NH, DK, DV), f"(B, NH, DHQK, DHV) = ({B}, {NH}, {DK}, {DV})")
            _check("state n", n, (B, NH, DK), f"(B, NH, DHQK) = ({B}, {NH}, {DK})")
            _check("state m", m, (B, NH, 1), f"(B, NH, 1) = ({B}, {NH}, 1)")
