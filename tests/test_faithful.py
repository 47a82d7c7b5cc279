"""The backend computes what the user's model computes, after hooks and weight changes too
(genlm_bytes.lm.hf.faithful): a fresh request, an incremental one on a cached context, a batch
of 8 and a prefill all follow the changed model (within 1e-4 of its own log-softmax), the lean
path stops while the model is not pristine and comes back when it is again.

Oracle: ``log_softmax(model(ids).logits[0, -1])`` of the model as it is at the time of the
request (hooks included), one plain forward per context.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from genlm_bytes import BeamParams, ByteBeamState
from genlm_bytes.lm.hf import AsyncTransformer

TOL = 1e-4
TEXT = "The quick brown fox jumps over the lazy dog. Then it"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """(see conftest)"""


def tiny_llama(vocab_size: int, layers: int = 4):
    """A small random transformers LLaMA with the embedded tokenizer's vocabulary."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96,
                                   num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2,
                                   max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(params=["tiny", "embedded"])
def model(request, embedded_lm):
    """A model the test may change: a tiny random LLaMA, or a copy of the embedded SmolLM2."""
    if request.param == "embedded":
        return copy.deepcopy(embedded_lm.model).eval()
    return tiny_llama(embedded_lm.model.config.vocab_size)


def backend(embedded_lm, model, **kwargs):
    kwargs.setdefault("lookahead", False)
    return AsyncTransformer(model, embedded_lm.tokenizer, byte_vocab=embedded_lm.byte_vocab,
                            initial_context=embedded_lm.initial_context, eos_token_ids=embedded_lm.eos_token_ids,
                            **kwargs)


@torch.inference_mode()
def oracle(model, ids) -> torch.Tensor:
    return torch.log_softmax(model(torch.tensor([list(ids)])).logits[0, -1].float(), dim=-1)


def assert_follows(model, ids, row) -> None:
    diff = (row - oracle(model, ids)).abs().max().item()
    assert diff <= TOL, f"a context of {len(ids)} tokens is {diff:.2e} off the model's own log-softmax"


async def assert_every_request_follows(lm, model, tok, cached: list[int]) -> None:
    """A fresh request, one extending the cached context ``cached``, 8 concurrent requests and a
    prefill, each against the model as it is now."""
    fresh = [0] + tok.encode("Once upon a time")
    assert_follows(model, fresh, await lm.next_token_logprobs(fresh))
    longer = cached + tok.encode(" and")
    assert_follows(model, longer, await lm.next_token_logprobs(longer))
    batch = [cached[:4] + [t] for t in range(100, 108)]
    for ctx, row in zip(batch, await asyncio.gather(*(lm.next_token_logprobs(c) for c in batch))):
        assert_follows(model, ctx, row)
    text = TEXT.encode()
    ids = list(lm.initial_context) + lm.encode_bytes(text)
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    canonical = sum(float(lp[i - 1, ids[i]]) for i in range(1, len(ids)))
    beam = await ByteBeamState.initial(lm, BeamParams(K=5, prune_threshold=0.05))
    beam = await beam.prefill(text)
    assert beam.logZ >= canonical - TOL, (beam.logZ, canonical)


async def first_request(lm, model, tok) -> tuple[list[int], torch.Tensor]:
    """A first request (cached now), on the lean path: its context and row."""
    ctx = [0] + tok.encode(TEXT)[:10]
    row = await lm.next_token_logprobs(ctx)
    assert_follows(model, ctx, row)
    assert lm.runner.passes["lean"] > 0 and lm.runner.watch.mode == "lean"
    return ctx, row


@pytest.mark.slow
async def test_a_forward_hook_added_later_is_followed_and_removing_it_restores_the_lean_path(
        embedded_lm, model):
    tok = embedded_lm.tokenizer
    lm = backend(embedded_lm, model)
    ctx, _ = await first_request(lm, model, tok)
    handle = model.model.layers[3].mlp.register_forward_hook(lambda m, a, o: o * 1.5)
    lean_passes = lm.runner.passes["lean"]
    await assert_every_request_follows(lm, model, tok, ctx)
    assert lm.runner.passes["lean"] == lean_passes, "no lean pass while a hook is registered"
    assert lm.runner.passes["model"] > 0 and lm.lean is None
    handle.remove()
    assert_follows(model, ctx, await lm.next_token_logprobs(ctx))  # (not a row cached under the hook)
    again = [0] + tok.encode("A different request")
    assert_follows(model, again, await lm.next_token_logprobs(again))
    assert lm.runner.passes["lean"] == lean_passes + 2 and lm.lean is not None


@pytest.mark.slow
@pytest.mark.parametrize("how", ["in place", "data swap", "new parameter"])
async def test_weight_changes_are_followed(embedded_lm, model, how):
    tok = embedded_lm.tokenizer
    lm = backend(embedded_lm, model)
    ctx, _ = await first_request(lm, model, tok)
    lin = model.model.layers[3].mlp.down_proj
    with torch.no_grad():
        if how == "in place":
            lin.weight.mul_(1.5)
        elif how == "data swap":
            lin.weight.data = lin.weight.data * 1.5
        else:
            lin.weight = torch.nn.Parameter(lin.weight.detach() * 1.5)
    # (a change of weights is seen by the next pass, which a fresh request runs first)
    await assert_every_request_follows(lm, model, tok, ctx)
    assert_follows(model, ctx, await lm.next_token_logprobs(ctx))  # (not the row cached before)
    assert lm.runner.watch.mode == "lean", "the model is still pristine: the lean path on its new weights"


async def test_clear_cache_after_a_change_through_data(embedded_lm):
    """``p.data.mul_`` is invisible to torch's version counters: ``clear_cache()`` drops what was
    cached before (rows and pasts), and the passes after it read the live weights."""
    tok = embedded_lm.tokenizer
    model = tiny_llama(embedded_lm.model.config.vocab_size)
    lm = backend(embedded_lm, model)
    ctx, _ = await first_request(lm, model, tok)
    model.model.layers[1].self_attn.o_proj.weight.data.mul_(3.0)
    lm.clear_cache()
    for c in (ctx[:5] + [123], ctx):
        assert_follows(model, c, await lm.next_token_logprobs(c))
    assert lm.runner.watch.mode == "lean"


class Scaled(torch.nn.Module):
    """A module wrapping another (as a LoRA layer wraps a Linear): its output scaled."""

    def __init__(self, inner, scale):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        return self.inner(x) * self.scale


def _fold_ids(module, args, kwargs):
    """A forward-pre hook changing the model's input ids (positional or keyword)."""
    if args:
        args = (args[0] % 5000, *args[1:])
    if kwargs.get("input_ids") is not None:
        kwargs = {**kwargs, "input_ids": kwargs["input_ids"] % 5000}
    return args, kwargs


def _global_hook(module, args, output):
    return output * 1.25 if isinstance(module, torch.nn.Linear) and output.shape[-1] > 1000 else output


CHANGES = {
    # name: (make the change -> undo)
    "pre-hook with kwargs on the top model": lambda m: m.register_forward_pre_hook(_fold_ids, with_kwargs=True).remove,
    "hook on the output layer": lambda m: m.lm_head.register_forward_hook(lambda mod, a, o: o * 0.5).remove,
    "hook with kwargs on a norm": lambda m: m.model.norm.register_forward_hook(
        lambda mod, a, kw, o: o * 2.0, with_kwargs=True).remove,
    "global forward hook": lambda m: torch.nn.modules.module.register_module_forward_hook(_global_hook).remove,
    "instance forward": lambda m: _set_forward(m.model.layers[1].mlp),
    "replaced submodule": lambda m: _replace(m.model.layers[2].self_attn, "o_proj"),
    "subclass with its own forward": lambda m: _subclass(m),
}


def _subclass(model):
    """Make ``model`` an instance of a subclass whose forward (a fixed signature, without
    ``logits_to_keep``) tempers the logits."""
    base = type(model)

    class Tempered(base):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None):
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache)
            out.logits = out.logits / 2.0
            return out

    model.__class__ = Tempered
    return lambda: setattr(model, "__class__", base)


def _set_forward(mlp):
    inner = mlp.forward
    mlp.forward = lambda x: inner(x) * 0.7
    return lambda: delattr(mlp, "forward")


def _replace(parent, name):
    old = getattr(parent, name)
    setattr(parent, name, Scaled(old, 1.3))
    return lambda: setattr(parent, name, old)


@pytest.mark.parametrize("change", list(CHANGES))
async def test_any_change_of_the_forward_sends_passes_through_the_model(embedded_lm, change):
    tok = embedded_lm.tokenizer
    model = tiny_llama(embedded_lm.model.config.vocab_size)
    lm = backend(embedded_lm, model)
    ctx, before = await first_request(lm, model, tok)
    undo = CHANGES[change](model)
    try:
        assert (oracle(model, ctx) - before).abs().max() > 10 * TOL, \
            "the change should change the distribution (else the test shows nothing)"
        # (a fresh request first: hooks are seen at once, other changes by the next pass)
        for c in (ctx + [77], ctx, ctx[:3] + [5, 6]):
            assert_follows(model, c, await lm.next_token_logprobs(c))
        assert lm.runner.watch.mode == "model" and lm.lean is None
        await lm.prefetch(ctx + [8, 9, 10], alternatives=[(4, 300), (len(ctx), (11, 12))])
        for c in (ctx + [8, 9], ctx[:4] + [300], ctx + [11, 12]):
            assert_follows(model, c, await lm.next_token_logprobs(c))
    finally:
        undo()
    again = ctx[:2] + [42]
    assert_follows(model, again, await lm.next_token_logprobs(again))
    assert lm.runner.watch.mode == "lean"


async def test_a_hook_is_seen_before_a_cached_row_is_served(embedded_lm):
    tok = embedded_lm.tokenizer
    model = tiny_llama(embedded_lm.model.config.vocab_size)
    lm = backend(embedded_lm, model)
    ctx, _ = await first_request(lm, model, tok)
    with torch.no_grad():
        handle = model.lm_head.register_forward_hook(lambda mod, a, o: o * 3.0)
    try:
        assert_follows(model, ctx, await lm.next_token_logprobs(ctx))
        assert lm.runner.passes["model"] == 1
    finally:
        handle.remove()


def test_a_model_without_lean_passes_charges_no_onednn_kernels(embedded_lm):
    """oneDNN's kernels are charged to the budget only where lean passes may use them: a model
    the lean decoder does not compute (another activation) runs transformers' modules, and its
    cache keeps that share."""
    from genlm_bytes.lm.hf import EngineConfig

    odd = tiny_llama(embedded_lm.model.config.vocab_size)
    odd.config.hidden_act = "gelu"
    for layer in odd.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    lm = backend(embedded_lm, odd)
    plain = backend(embedded_lm, odd, config=EngineConfig(onednn=False))
    assert not lm.onednn and lm.cache.reserved == plain.cache.reserved
    same = backend(embedded_lm, tiny_llama(embedded_lm.model.config.vocab_size))
    assert same.onednn and same.cache.reserved > plain.cache.reserved
