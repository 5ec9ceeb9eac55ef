"""Backend names, the automatic choice, fallbacks and the CUDA-only paths."""
import importlib.util

import pytest
import torch

from engine_cases import assert_close, make_case
from moelab.config import MOE_BACKENDS
from moelab.errors import ConfigError
from moelab.ops import CHOICES, build_plan, choose_backend, expert_ffn, resolve_backend
from moelab.ops.backends import grouped_mm_supported


def test_config_backends_are_all_known():
    assert set(MOE_BACKENDS) <= set(CHOICES)


def test_unknown_backend_names_value_and_choices():
    x, w = torch.randn(4, 8), torch.randn(2, 8, 8)
    with pytest.raises(ConfigError) as err:
        resolve_backend("fast", x, w, 8, 2)
    msg = str(err.value)
    assert "'fast'" in msg and all(name in msg for name in CHOICES)


@pytest.mark.parametrize("dtype,T,want", [
    (torch.float32, 1, "loop"), (torch.float32, 64, "padded"),
    (torch.float32, 4096, "grouped_mm"), (torch.float32, 32768, "scatter"),
    (torch.bfloat16, 4, "loop"), (torch.bfloat16, 512, "padded"),
    (torch.bfloat16, 8192, "scatter")])
def test_auto_picks_a_working_backend_on_cpu(dtype, T, want, threads):
    # (E=16 experts: enough for `padded` to pay at small batches; see the next test for few)
    E, d, h, k = 16, 64, 32, 2
    x = torch.randn(T, d, dtype=dtype, requires_grad=True)  # training: a backward follows
    w = torch.randn(E, d, h, dtype=dtype, requires_grad=True)
    threads(2)
    name = resolve_backend("auto", x, w, T * k, E)
    assert name == choose_backend(x, w, T * k, E) == want


@pytest.fixture
def threads():
    """threads(n) sets torch's intra-op threads until the test ends."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_auto_training_float32_on_one_thread_takes_grouped_mm_for_small_groups(threads):
    E, d, h = 116, 64, 32
    x = torch.randn(8, d, requires_grad=True)
    w = torch.randn(E, d, h, requires_grad=True)
    threads(1)
    assert choose_backend(x, w, 26 * E, E) == "grouped_mm"  # padded on more threads
    # grouped_mm while one expert's matmul is under 6 M MACs: 2929 pairs of 64 x 32 here
    assert choose_backend(x, w, 2929 * E, E) == "grouped_mm"
    assert choose_backend(x, w, 2930 * E, E) == "scatter"
    assert choose_backend(x.bfloat16(), w.bfloat16(), 26 * E, E) == "padded"
    threads(2)
    assert choose_backend(x, w, 26 * E, E) == "padded"


def test_auto_skips_padded_when_routing_is_unbalanced(threads):
    E, d, h = 116, 64, 32
    x = torch.randn(8, d, requires_grad=True)
    w = torch.randn(E, d, h, requires_grad=True)
    threads(2)
    n_pairs = 26 * E
    assert choose_backend(x, w, n_pairs, E, max_count=52) == "padded"  # half the rows padding
    assert choose_backend(x, w, n_pairs, E, max_count=53) == "grouped_mm"
    assert choose_backend(x.bfloat16(), w.bfloat16(), n_pairs, E, max_count=200) == "scatter"
    # routed_matmul passes the plan's largest count: one expert gets every pair
    idx = torch.zeros(n_pairs, 1, dtype=torch.long)
    idx[:E, 0] = torch.arange(E)
    plan = build_plan(idx, E)
    assert plan.host_max_count() == n_pairs - E + 1
    assert resolve_backend("auto", x, w, plan.n_pairs, E, plan.host_max_count()) == "grouped_mm"


@pytest.mark.parametrize("dtype,T,want", [
    (torch.float32, 1, "loop"), (torch.float32, 8, "grouped_mm"), (torch.float32, 64, "grouped_mm"),
    (torch.float32, 128, "padded"), (torch.bfloat16, 8, "padded")])
def test_auto_at_inference_uses_the_decode_measurements(dtype, T, want, threads):
    threads(2)
    E, d, h, k = 16, 64, 32, 2
    x = torch.randn(T, d, dtype=dtype)
    w = torch.randn(E, d, h, dtype=dtype, requires_grad=True)
    with torch.no_grad():  # parameters that want grad, but no graph: inference
        assert choose_backend(x, w, T * k, E) == want


def test_auto_with_few_experts_skips_padded(threads):
    threads(2)
    x, w = torch.randn(32, 8), torch.randn(6, 8, 8)
    assert choose_backend(x, w, 64, 6) == "grouped_mm"  # 11 pairs per expert of 8 x 8
    assert choose_backend(x, w, 6 * 6_000_000 // 64 + 6, 6) == "scatter"
    assert choose_backend(x.bfloat16(), w.bfloat16(), 64, 6) == "scatter"


def test_auto_runs_in_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        c = make_case("general", dtype)
        y = expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], c["weights"], backend="auto")
        y.float().sum().backward()
        assert y.dtype == dtype and torch.isfinite(c["w1"].grad.float()).all()


def test_grouped_mm_falls_back_when_unsupported():
    w = torch.randn(2, 12, 8, dtype=torch.bfloat16)  # 12 * 2 bytes: not a multiple of 16
    assert not grouped_mm_supported(torch.randn(3, 12, dtype=torch.bfloat16), w)
    assert resolve_backend("grouped_mm", torch.randn(3, 12, dtype=torch.bfloat16), w, 6, 2) \
        == "loop"
    assert resolve_backend("grouped_mm", torch.randn(3, 8).double(),
                           torch.randn(2, 8, 8).double(), 6, 2) == "loop"
    # and the fallback computes the right thing on unaligned widths
    gen = torch.Generator().manual_seed(0)
    x, w1, w2 = torch.randn(5, 6, generator=gen), torch.randn(3, 6, 5, generator=gen), \
        torch.randn(3, 5, 6, generator=gen)
    plan = build_plan(torch.tensor([[0, 2], [1, 2], [0, 1], [2, 0], [1, 0]]), 3)
    want = expert_ffn(x, w1, w2, plan, backend="loop")
    assert_close(expert_ffn(x, w1, w2, plan, backend="grouped_mm"), want, 1e-6)


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("triton") is not None,
                    reason="CPU-only behaviour")
def test_triton_needs_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter runs it on CPU
    c = make_case("general")
    with pytest.raises(ConfigError, match="triton.*CUDA|CUDA.*triton"):
        expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "loop", "scatter", "grouped_mm", "padded"])
def test_cuda_backends_match_cpu(backend):
    c = make_case("general", gated=True)
    want = expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], c["weights"], "silu", c["w3"],
                      backend="loop")
    dev = torch.device("cuda")
    args = [c[k].detach().to(dev) for k in ("x", "w1", "w2")]
    plan = build_plan(c["idx"].to(dev), c["E"])
    got = expert_ffn(*args, plan, c["weights"].detach().to(dev), "silu",
                     c["w3"].detach().to(dev), backend=backend)
    assert_close(got.cpu(), want.detach(), 1e-4, backend)


@pytest.mark.parametrize("backend", ["loop", "scatter", "grouped_mm", "padded"])
def test_autocast_bf16_runs_in_bf16_and_grads_reach_fp32_params(backend):
    c = make_case("general")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], c["weights"], backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert c["w1"].grad.dtype == torch.float32 and c["weights"].grad is not None
    want = expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], c["weights"], backend="loop")
    err = (y.float() - want).norm() / want.norm()
    assert err < 2e-2


def test_mixed_dtypes_without_autocast_are_an_error():
    c = make_case("general")
    with pytest.raises(ValueError, match="bfloat16"):
        expert_ffn(c["x"], c["w1"].bfloat16(), c["w2"].bfloat16(), c["plan"])


def test_flop_counter_sees_every_expert_matmul(monkeypatch):
    # worker threads would escape FlopCounterMode (a thread-local dispatch mode): run inline
    from torch.utils.flop_counter import FlopCounterMode

    from moelab.ops import parallel
    monkeypatch.setattr(parallel, "MIN_PAIRS_PER_WORKER", 1)
    parallel.set_expert_threads(2)
    try:
        c = make_case("general")
        T, d = c["x"].shape
        h, k = c["w1"].shape[2], c["plan"].top_k
        with FlopCounterMode(display=False) as fc:
            expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], c["weights"], backend="scatter")
        assert fc.get_total_flops() == 2 * T * k * (d * h + h * d)
    finally:
        parallel.set_expert_threads(None)
