"""The `triton` backend against the float64 loop reference.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors), which
executes the same kernel source program by program; the GPU tests (marked `gpu`) add bf16 on the
device, `torch.compile(fullgraph=True)` and the custom-op checks, and skip without CUDA.
"""
import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("the triton package is not installed", allow_module_level=True)
if not torch.cuda.is_available():  # tests/conftest.py sets it before anything imports triton
    assert os.environ.get("TRITON_INTERPRET") == "1"

from engine_cases import assert_close, assert_close_norm, make_case  # noqa: E402
from moelab.ops import build_plan, expert_ffn, resolve_backend, routed_matmul  # noqa: E402
from moelab.ops.triton_routed import block_m_for, block_table  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _routed_case(T, E, k, I, O, gather, dtype, seed):
    """Fresh random operands (never zeros) and a routing with some experts left empty."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)
    logits[:, : E // 3] -= 50  # the first third of the experts get no pair
    idx = logits.topk(k, dim=-1).indices
    rows = T if gather else T * k
    x = torch.randn(rows, I, generator=gen)
    w = torch.randn(E, I, O, generator=gen) * I ** -0.5
    g = torch.randn(T * k, O, generator=gen)
    return idx, x, w, g


def _grads(x, w, plan, gather, g, backend):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = routed_matmul(x, w, plan, gather=gather, backend=backend)
    dx, dw = torch.autograd.grad(y, (x, w), g.to(y.dtype))
    return y, dx, dw


# (T, E, k, I, O): several pairs per expert; widths that are not multiples of the tiles; one
# token (the decode shape); k = 1; more experts than pairs
SHAPES = [(37, 6, 2, 48, 40), (70, 4, 1, 24, 80), (1, 8, 2, 32, 24), (5, 16, 3, 16, 16),
          (150, 3, 2, 20, 36)]


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_outputs_and_gradients_match_float64_loop(shape, gather):
    T, E, k, I, O = shape
    for seed in (0, 1):  # fresh inputs each time: the same function on any valid input
        idx, x, w, g = _routed_case(T, E, k, I, O, gather, torch.float32, seed)
        plan = build_plan(idx.to(DEV), E)
        y, dx, dw = _grads(x.to(DEV), w.to(DEV), plan, gather, g.to(DEV), "triton")
        ref_plan = build_plan(idx, E)
        y_r, dx_r, dw_r = _grads(x.double(), w.double(), ref_plan, gather, g.double(), "loop")
        for got, want, what in ((y, y_r, "y"), (dx, dx_r, "dx"), (dw, dw_r, "dW")):
            assert torch.isfinite(got).all(), what
            assert_close(got.cpu(), want, 1e-5, f"{what} {shape} gather={gather}")
        empty = (ref_plan.counts_E == 0).nonzero().flatten()
        assert len(empty) > 0 and (dw[empty.to(DEV)] == 0).all()  # written, as zeros


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_accumulate_in_float32(dtype):
    T, E, k, I, O = 64, 8, 2, 64, 48
    idx, x, w, g = _routed_case(T, E, k, I, O, True, dtype, 3)
    plan = build_plan(idx.to(DEV), E)
    y, dx, dw = _grads(x.to(DEV, dtype), w.to(DEV, dtype), plan, True, g.to(DEV), "triton")
    assert y.dtype == dx.dtype == dw.dtype == dtype
    # the reference sees the same rounded inputs, in float64
    y_r, dx_r, dw_r = _grads(x.to(dtype).double(), w.to(dtype).double(), build_plan(idx, E), True,
                             g.to(dtype).double(), "loop")
    for got, want, what in ((y, y_r, "y"), (dx, dx_r, "dx"), (dw, dw_r, "dW")):
        assert torch.isfinite(got.float()).all(), what
        assert_close_norm(got.cpu(), want, 1e-2, f"{what} {dtype}")


def test_expert_ffn_with_router_weights_matches_loop():
    for name in ("general", "many_empty", "one_token"):
        c = make_case(name, gated=True)
        leaves = [c["x"], c["w1"], c["w2"], c["w3"], c["weights"]]
        outs = {}
        for backend in ("loop", "triton"):
            for t in leaves:
                t.grad = None
            y = expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], c["weights"], "silu", c["w3"],
                           backend=backend)
            y.backward(c["g"])
            outs[backend] = [y.detach()] + [t.grad.clone() for t in leaves]
        for got, want in zip(outs["triton"], outs["loop"]):
            assert_close(got, want, 1e-5, name)


def test_block_table_covers_every_row_once_within_its_expert():
    gen = torch.Generator().manual_seed(0)
    for E, S, bm in ((6, 100, 16), (9, 7, 16), (3, 256, 64), (5, 0, 32), (12, 300, 32)):
        counts = torch.multinomial(torch.rand(E, generator=gen) + 0.05, S, replacement=True,
                                   generator=gen).bincount(minlength=E) if S else torch.zeros(E)
        offsets = torch.zeros(E + 1, dtype=torch.long)
        offsets[1:] = counts.long().cumsum(0)
        expert_B, row0_B = block_table(offsets, S, bm)
        assert len(expert_B) == -(-S // bm) + E
        seen = torch.zeros(S, dtype=torch.long)
        for e, r0 in zip(expert_B.tolist(), row0_B.tolist()):
            if e < 0:
                continue
            lo, hi = offsets[e].item(), offsets[e + 1].item()
            assert lo <= r0 < hi, (E, S, bm, e, r0)
            seen[r0:min(r0 + bm, hi)] += 1
        assert (seen == 1).all()


def test_block_rows_follow_the_batch_size():
    assert block_m_for(2, 8) == 16  # decode: a 16-row tile, not 64
    assert block_m_for(4096, 64) == 32 and block_m_for(8192, 8) == 64


def test_dtypes_without_a_kernel_fall_back_to_loop():
    x, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(2, 8, 8, dtype=torch.float64)
    assert resolve_backend("triton", x.to(DEV), w.to(DEV), 8, 2) == "loop"
    assert resolve_backend("triton", x.float().to(DEV), w.float().to(DEV), 8, 2) == "triton"


def test_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    from moelab.errors import ConfigError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.randn(4, 8), torch.randn(2, 8, 8), 8, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_custom_op_checks_and_compile_fullgraph():
    from moelab.ops.triton_routed import routed_mm, routed_mm_dw

    T, E, k, I, O = 256, 16, 2, 128, 64
    idx, x, w, g = _routed_case(T, E, k, I, O, True, torch.bfloat16, 5)
    plan = build_plan(idx.cuda(), E)
    bm = block_m_for(plan.n_pairs, E)
    table = block_table(plan.offsets_E1, plan.n_pairs, bm)
    xb, wb = x.cuda().bfloat16().requires_grad_(), w.cuda().bfloat16().requires_grad_()
    torch.library.opcheck(routed_mm, (xb, wb, plan.rows_S, plan.inverse_TK, plan.offsets_E1,
                                      *table, True, bm))
    torch.library.opcheck(routed_mm_dw, (xb.detach(), g.cuda().bfloat16(), plan.rows_S,
                                         plan.offsets_E1, True, E))

    def f(x, w):
        return routed_matmul(x, w, plan, gather=True, backend="triton").float().square().sum()

    want = torch.autograd.grad(f(xb, wb), (xb, wb))
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(xb, wb), (xb, wb))
    for a, b in zip(got, want):
        assert_close_norm(a.float(), b.float(), 1e-2)



@pytest.mark.parametrize("preset", ["moe-tiny", "sigma-moe-tiny", "switchhead-tiny", "umoe-tiny"])
def test_whole_model_on_triton_matches_loop(preset):
    """Every routed matmul of a model (FFN experts, attention experts, UMoE's shared bank) on the
    Triton kernels: the same loss and gradients as on the loop backend."""
    from helpers import tiny
    from moelab.model import MoELM

    results = {}
    for backend in ("loop", "triton"):
        cfg = tiny(f"model.moe_backend={backend}", base=preset).model
        torch.manual_seed(0)
        model = MoELM(cfg).to(DEV)
        idx = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
        out = model(idx.to(DEV), targets_BT=idx.roll(-1, 1).to(DEV))
        (out.loss + out.aux_loss).backward()
        results[backend] = [out.loss.detach()] + [p.grad.clone() for p in model.parameters()
                                                   if p.grad is not None]
    assert len(results["triton"]) == len(results["loop"]) > 3
    for got, want in zip(results["triton"], results["loop"]):
        assert_close(got.cpu(), want.cpu(), 1e-5, preset)
