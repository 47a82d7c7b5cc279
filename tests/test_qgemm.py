"""Products by weights that are 4- or 8-bit codes per group of 32 inputs (lm/qgemm.py), and their
use as packs (lm/gemm.py: pack_weights(quantize=True))."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from genlm_bytes.lm import gemm, qgemm

needs_kernel = pytest.mark.skipif(not qgemm.available(), reason="no AVX-512 or no C++ compiler here")


@pytest.fixture(autouse=True)
def _collected():
    """The packs of a test's weights go with them before the next test (gemm.packed_bytes counts
    every pack alive: test_packed.py compares it)."""
    yield
    gc.collect()


def q4_1(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A float32 (n, k) matrix as GGUF's Q4_1 makes it: q * d + m per group of 32, d and m float16."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15  # (a group spans its 16 levels, as a quantizer's does)
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(n, k // 32, 1, generator=g) * 0.1).half().float()
    return (q.double() * d.double() + m.double()).float().reshape(n, k)


def q4_0(n: int, k: int, seed: int = 1) -> torch.Tensor:
    """GGUF's Q4_0: (q - 8) * d, d float16 of either sign; not every level used."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(2, 14, (n, k // 32, 32), generator=g).float()
    d = ((torch.rand(n, k // 32, 1, generator=g) - 0.5) * 0.04).half().float()
    return ((q - 8) * d).reshape(n, k)


def q8_0(n: int, k: int, seed: int = 2) -> torch.Tensor:
    """GGUF's Q8_0: q * d, q in [-127, 127] (one weight of each group at the extreme)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=g).float()
    q[..., 3] = 127
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01 + 1e-4).half().float()
    return (q * d).reshape(n, k)


def q5_0(n: int, k: int, seed: int = 10) -> torch.Tensor:
    """GGUF's Q5_0: (q - 16) * d, q in [0, 31]: 5-bit codes, held in 8 bits."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 32, (n, k // 32, 32), generator=g).float()
    d = ((torch.rand(n, k // 32, 1, generator=g) - 0.5) * 0.01).half().float()
    return ((q - 16) * d).reshape(n, k)


@needs_kernel
@pytest.mark.parametrize("make,bits", [(q4_1, 4), (q4_0, 4), (q8_0, 8), (q5_0, 8)])
def test_codes_are_found_and_make_every_weight_bit_for_bit(make, bits):
    w = make(64, 96)
    qw = qgemm.quantized(w)
    assert qw is not None and qw.bits == bits and qw.shape == (64, 96)
    made = qw.dequantize()
    assert torch.equal(made, w)  # (the same values; bit for bit but for the sign of a zero)
    assert torch.equal(made.view(torch.int32)[w != 0], w.view(torch.int32)[w != 0])
    assert qw.nbytes < w.numel() * w.element_size() / (3 if bits == 4 else 1.5)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_a_plain_matrix_has_no_codes_after_every_candidate(bits):
    """The library's pass tries every candidate scale of every group of a matrix without codes
    (the least gap's too; a first version overran its list of candidates there) and finds none."""
    plain = torch.randn(48, 2, 32, generator=torch.Generator().manual_seed(11))
    assert qgemm._found(plain, bits) is None


@needs_kernel
def test_matrices_without_codes_or_of_other_shapes_get_none():
    g = torch.Generator().manual_seed(3)
    assert qgemm.quantized(torch.randn(64, 96, generator=g)) is None  # plain float32 weights
    w = q4_1(64, 96)
    w[5, 7] = torch.nextafter(w[5, 7], torch.tensor(1.0))  # one weight one bit off its level
    assert qgemm.quantized(w) is None
    assert qgemm.quantized(q4_1(64, 96)[:40]) is None  # rows not a multiple of 16
    assert qgemm.quantized(q4_1(64, 96)[:, :80]) is None  # inputs not a multiple of 32
    assert qgemm.quantized(q4_1(64, 96).double()) is None
    bad = q4_1(64, 96)
    bad[0, 0] = float("nan")
    assert qgemm.quantized(bad) is None


@needs_kernel
@pytest.mark.parametrize("make", [q4_1, q8_0])
def test_products_match_float64_and_a_row_is_the_same_at_every_row_count(make):
    w = make(160, 576)
    qw = qgemm.quantized(w)
    x = torch.randn(70, 576, generator=torch.Generator().manual_seed(4))
    full = qw.product(x)
    want = (x.double() @ w.double().t())
    scale = float(want.abs().max())
    assert float((full.double() - want).abs().max()) <= 2e-6 * scale
    for m in (1, 2, 3, 5, 8, 15, 16, 17, 33):  # (the kernel's few-row and many-row paths)
        assert torch.equal(qw.product(x[:m].contiguous()), full[:m]), m
    assert torch.equal(qw.product(x[40:41].contiguous())[0], full[40])
    assert qw.product(x[:0].contiguous()).shape == (0, 160)
    assert torch.equal(qw.product(x.t().contiguous().t()), full)  # (a non-contiguous input)
    for bad in (x.double(), x[:, :100], x[0]):
        with pytest.raises(ValueError, match="float32 CPU matrix of 576 columns"):
            qw.product(bad)


@needs_kernel
def test_packs_of_codes_multiply_and_replace_float32_packs():
    if not gemm.onednn_works():
        pytest.skip("torch has no working oneDNN linear op")
    w, v = q4_1(96, 64, seed=5), torch.randn(96, 64, generator=torch.Generator().manual_seed(6))
    b = torch.randn(96)
    linear = gemm.linear_fn(True, packed=True)
    assert gemm.pack_weights([w, v]) > 0  # float32 packs first
    assert not isinstance(gemm.packed_weight(w), qgemm.QuantizedWeight)
    before = gemm.packed_bytes()
    gemm.pack_weights([w, v], quantize=True)  # w's is replaced by its codes; v has none
    assert isinstance(gemm.packed_weight(w), qgemm.QuantizedWeight)
    assert gemm.packed_weight(v) is not None and not isinstance(gemm.packed_weight(v), qgemm.QuantizedWeight)
    assert gemm.packed_bytes() < before
    assert gemm.pack_weights([w, v], quantize=True) == 0  # nothing left to do (v's search is not run again)
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        for bias in (None, b):
            got, want = linear(x, w, bias), F.linear(x.double(), w.double(), None if bias is None else bias.double())
            assert got.shape == (3, 5, 96)
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
        w.mul_(2.0)  # a change in place: the pack is stale, the product follows the weight
        assert gemm.packed_weight(w) is None
        assert torch.allclose(linear(x, w).double(), F.linear(x.double(), w.double()), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_group_packs_of_codes_give_each_weight_s_columns():
    if not gemm.onednn_works():
        pytest.skip("torch has no working oneDNN linear op")
    ws = (q4_1(64, 96, seed=7), q4_1(32, 96, seed=8), q4_1(32, 96, seed=9))
    assert gemm.pack_groups([ws], quantize=True) > 0
    assert isinstance(gemm.packed_group(ws), qgemm.QuantizedWeight)
    x = torch.randn(7, 96)
    with torch.inference_mode():
        y = gemm.linear_fn(True, packed=True).group(x, ws)
    assert torch.allclose(y.double(), x.double() @ torch.cat(ws).double().t(), rtol=1e-5, atol=1e-5)


def test_without_a_compiler_nothing_is_quantized(tmp_path):
    """A machine without a working C++ compiler: no kernel, every matrix stays float32 (no error)."""
    code = (
        "from genlm_bytes.lm import qgemm\n"
        "print(qgemm.available(), qgemm.quantized(__import__('torch').zeros(16, 32)))\n"
    )
    env = {"CXX": str(tmp_path / "no-such-compiler"), "XDG_CACHE_HOME": str(tmp_path), "HOME": str(tmp_path),
           "GENLM_BYTES_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "None"]


def test_switched_off_by_the_environment():
    code = "from genlm_bytes.lm import qgemm; print(qgemm.available())"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                         env={"GENLM_BYTES_QGEMM": "0", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.slow
@needs_kernel
async def test_the_embedded_engine_runs_on_codes_and_agrees_with_the_model_s_forward(embedded_lm):
    """The default engine packs SmolLM2's matrices as their codes (every group and the output
    layer), and its rows are the model's own float32 forward's up to rounding (the same
    weights, summed in another order)."""
    from genlm_bytes.lm.lean import model_groups

    model = embedded_lm.model
    packs = [gemm.packed_group(g) for g in model_groups(model)]
    packs.append(gemm.packed_weight(model.get_output_embeddings().weight))
    assert embedded_lm.quantized and all(isinstance(p, qgemm.QuantizedWeight) for p in packs)
    ctx = list(embedded_lm.initial_context) + embedded_lm.encode_bytes("Ce soir, à Paris, nous irons".encode())
    with torch.inference_mode():
        want = torch.log_softmax(model(torch.tensor([ctx])).logits[0].float(), -1)
    for n in (2, 5, len(ctx)):
        got = torch.as_tensor(await embedded_lm.next_token_logprobs(ctx[:n]))
        assert float((got - want[n - 1]).abs().max()) < 2e-4
        assert int(got.argmax()) == int(want[n - 1].argmax())


@needs_kernel
@pytest.mark.parametrize("make", [q4_1, q8_0])
def test_the_avx2_build_gives_the_avx512_build_s_bits(make):
    """Both builds run the same operations lane by lane (the AVX2 one in smaller tiles): the
    same outputs, bit for bit, at every row count (where the CPU runs both)."""
    if qgemm._variant() != "avx512" or qgemm._library("avx2") is None:
        pytest.skip("this CPU does not run both builds")
    w = make(160, 576)
    qw = qgemm.quantized(w)
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(12))
    for m in (1, 2, 5, 16, 40):
        assert torch.equal(qw.product(x[:m].contiguous(), "avx2"), qw.product(x[:m].contiguous(), "avx512")), m


def test_an_unknown_build_asked_for_is_a_value_error():
    code = "from genlm_bytes.lm import qgemm; qgemm.available()"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120,
                         env={"GENLM_BYTES_QGEMM": "avx3", "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0
    assert "ValueError: GENLM_BYTES_QGEMM must be 0, 1 or one of avx512, avx2, got 'avx3'" in out.stderr

