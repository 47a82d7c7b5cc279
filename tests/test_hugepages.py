"""A CPU model's weights moved onto huge pages (genlm_bytes/lm/hugepages.py): same values, same
tying, same outputs; the loaders do it for the models they load."""

import sys

import pytest
import torch

from genlm_bytes.lm.hugepages import move_to_huge_pages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def tiny_tied():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


@linux
def test_moved_parameters_keep_values_tying_strides_and_outputs():
    model = tiny_tied()
    # a parameter that is a strided view of a larger storage (kept as a view, with its offset)
    big = torch.randn(4, 48 * 3)
    model.model.norm.weight.data = big[1, 48:96]
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strides = {k: (v.stride(), v.storage_offset()) for k, v in model.named_parameters()}
    ptrs = {k: v.data_ptr() for k, v in model.named_parameters()}
    x = torch.tensor([[1, 5, 7, 9]])
    with torch.inference_mode():
        want = model(x).logits
    moved = move_to_huge_pages(model, min_bytes=0)
    assert moved >= sum(p.numel() * 4 for p in model.parameters())
    assert all(model.get_parameter(k).data_ptr() != p for k, p in ptrs.items())  # all moved
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert {k: (v.stride(), v.storage_offset() > 0) for k, v in model.named_parameters()}["model.norm.weight"] \
        == (strides["model.norm.weight"][0], True)
    with torch.inference_mode():
        assert torch.equal(model(x).logits, want)
    model.lm_head.weight.data.mul_(2)  # the memory is the parameters' own, writable
    assert torch.equal(model.model.embed_tokens.weight, 2 * before["model.embed_tokens.weight"])


def test_small_models_and_other_devices_are_left_alone():
    model = tiny_tied()
    ptr = model.lm_head.weight.data_ptr()
    assert move_to_huge_pages(model) == 0  # under min_bytes
    assert model.lm_head.weight.data_ptr() == ptr
    with torch.device("meta"):
        meta = torch.nn.Linear(4096, 4096)
    assert move_to_huge_pages(meta, min_bytes=0) == 0
    for bad in (-1, 1.5, "64", True):
        with pytest.raises(ValueError, match="min_bytes"):
            move_to_huge_pages(model, min_bytes=bad)
    assert model.lm_head.weight.data_ptr() == ptr  # nothing moved


@linux
def test_the_loader_moves_the_default_model_and_a_copy_of_it_is_plain(embedded_lm):
    import copy

    from genlm_bytes.lm import hugepages

    model = embedded_lm.model
    assert hugepages.moved_bytes(model) >= sum(p.numel() * 4 for p in model.parameters())
    lin = torch.nn.Sequential(torch.nn.Linear(8, 8))
    move_to_huge_pages(lin, min_bytes=0)
    twin = copy.deepcopy(lin)  # (a model with moved parameters copies as any other)
    assert torch.equal(twin[0].weight, lin[0].weight) and hugepages.moved_bytes(twin) == 0
