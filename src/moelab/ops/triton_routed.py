"""`triton` backend: the routed matmul as Triton kernels behind `torch.library` custom ops.

The design is the sorted-rows one of CVMM / ScatterMoE: the routing plan already holds the pairs
grouped by expert, so a program of the forward kernel takes a block of BLOCK_M consecutive
sorted pairs *of one expert*, gathers their token rows straight from x (no (S, d) copy), and
multiplies them by that expert's weight tile, accumulating in float32 whatever the input dtype.

- forward  y_S = x[rows_S] @ W[e(S)]            `moelab::routed_mm`
- dx       dx_S = g_S @ W[e(S)]^T               the same kernel on the transposed weight view,
                                                then the k slots of a token are summed
                                                (`reduce_slots`) when the forward gathered
- dW       dW_e = x[rows of e]^T @ g[rows of e]  `moelab::routed_mm_dw`, one program per
                                                (expert, output tile), looping over the rows

Blocks never straddle two experts. The block table (expert and first row of every block) is
computed on the device from the plan's offsets with a few tensor ops and no host sync; its
length is the static bound ceil(S / BLOCK_M) + E, and programs past the real blocks exit at once.
A small batch (decode: a few pairs per expert) gets BLOCK_M = 16, the smallest `tl.dot` tile, so
it does not spend a 64-row tile on one token.

Registered with `torch.library.triton_op`, so `torch.compile(fullgraph=True)` traces through the
kernels, with autograd by `register_autograd`. The kernels also run on CPU tensors under
`TRITON_INTERPRET=1` (Triton's interpreter): that is how the tests check them without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from moelab.ops.backends import triton_interpreting
from moelab.ops.layout import reduce_slots
from moelab.ops.plan import RoutingPlan

BLOCK_N, BLOCK_K = 64, 32  # output and reduction tiles of the forward / dx kernel
DW_BLOCK_I, DW_BLOCK_O, DW_BLOCK_S = 64, 64, 32  # dW tiles; S is the row loop step


@triton.jit
def _routed_mm_kernel(x_ptr, w_ptr, y_ptr, rows_ptr, offsets_ptr, block_expert_ptr,
                      block_row0_ptr, N, K, stride_xm, stride_xk, stride_we, stride_wk,
                      stride_wn, stride_ym, stride_yn, GATHER: tl.constexpr,
                      ALLOW_TF32: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:  # past the last real block of this routing decision
        return
    row0 = tl.load(block_row0_ptr + pid_m)
    row_end = tl.load(offsets_ptr + e + 1)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < row_end
    if GATHER:
        src_m = tl.load(rows_ptr + offs_m, mask=mask_m, other=0)
    else:
        src_m = offs_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + e.to(tl.int64) * stride_we
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(x_ptr + src_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_base + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_F32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="tf32" if ALLOW_TF32 else "ieee")
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _routed_mm_dw_kernel(x_ptr, g_ptr, dw_ptr, rows_ptr, offsets_ptr, I, O, stride_xm, stride_xi,
                         stride_gm, stride_go, stride_de, stride_di, stride_do,
                         GATHER: tl.constexpr, ALLOW_TF32: tl.constexpr, DOT_F32: tl.constexpr,
                         BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_S: tl.constexpr):
    e = tl.program_id(0)
    pid = tl.program_id(1)
    n_o = tl.cdiv(O, BLOCK_O)
    offs_i = (pid // n_o) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_o = (pid % n_o) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_i = offs_i < I
    mask_o = offs_o < O
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_I, BLOCK_O), dtype=tl.float32)  # an empty expert stores zeros
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < end
        if GATHER:
            src_s = tl.load(rows_ptr + offs_s, mask=mask_s, other=0)
        else:
            src_s = offs_s
        xt = tl.load(x_ptr + src_s[None, :].to(tl.int64) * stride_xm + offs_i[:, None] * stride_xi,
                     mask=mask_i[:, None] & mask_s[None, :], other=0.0)
        g = tl.load(g_ptr + offs_s[:, None].to(tl.int64) * stride_gm + offs_o[None, :] * stride_go,
                    mask=mask_s[:, None] & mask_o[None, :], other=0.0)
        if DOT_F32:
            xt, g = xt.to(tl.float32), g.to(tl.float32)
        acc = tl.dot(xt, g, acc, input_precision="tf32" if ALLOW_TF32 else "ieee")
    dw = dw_ptr + e.to(tl.int64) * stride_de + offs_i[:, None] * stride_di + offs_o[None, :] * stride_do
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_o[None, :])


def _allow_tf32(dtype: torch.dtype) -> bool:
    # float32 follows torch's own matmul setting (full precision by default); 16-bit inputs
    # ignore it (their products are exact in the float32 accumulator's input format).
    return dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32


def _interpreted_bf16(dtype: torch.dtype) -> bool:
    """Triton's interpreter (CPU: the tests) gets two bf16 steps wrong that a GPU gets right: it
    computes bf16 dots wrongly, and it truncates float32 -> bf16 where a GPU rounds to nearest
    even. Under it, bf16 tiles are upcast before the dot (exact: bf16 x bf16 products fit in
    float32) and the kernel writes float32 that torch then rounds, so the tests see the GPU's
    arithmetic. On a GPU neither applies."""
    return triton_interpreting() and dtype == torch.bfloat16


def block_m_for(n_pairs: int, n_experts: int) -> int:
    """Rows per forward program: 16 for decode-sized batches (a few pairs per expert), 32 for
    fine-grained experts, 64 for coarse ones. Each expert wastes under one block of rows."""
    per_expert = n_pairs / max(n_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 256 else 64


def block_table(offsets_E1: torch.Tensor, n_pairs: int, block_m: int):
    """Expert and first sorted row of every forward block, -1 past the real blocks. Length
    ceil(S / block_m) + E, an upper bound known without reading the counts on the host."""
    E = offsets_E1.numel() - 1
    counts_E = offsets_E1[1:] - offsets_E1[:-1]
    blocks_E = (counts_E + block_m - 1) // block_m
    ends_E = torch.cumsum(blocks_E, 0)
    idx_B = torch.arange(-(-n_pairs // block_m) + E, device=offsets_E1.device)
    e_B = torch.searchsorted(ends_E, idx_B, right=True)
    valid_B = e_B < E
    e_c = e_B.clamp(max=max(E - 1, 0))
    row0_B = offsets_E1[e_c] + (idx_B - (ends_E[e_c] - blocks_E[e_c])) * block_m
    return torch.where(valid_B, e_B, -1).contiguous(), row0_B.contiguous()


@triton_op("moelab::routed_mm", mutates_args=())
def routed_mm(x: torch.Tensor, w_EIO: torch.Tensor, rows_S: torch.Tensor,
              inverse_TK: torch.Tensor, offsets_E1: torch.Tensor, block_expert: torch.Tensor,
              block_row0: torch.Tensor, gather: bool, block_m: int) -> torch.Tensor:
    """y (S, O) = x[rows_S] @ W[e] per sorted pair (x already sorted when not `gather`).
    `inverse_TK` (the plan's sorted position of every (token, slot)) is used by the backward."""
    S, (K, N) = rows_S.shape[0], w_EIO.shape[1:]
    fix_bf16 = _interpreted_bf16(x.dtype)
    y = x.new_empty(S, N, dtype=torch.float32 if fix_bf16 else x.dtype)
    if S == 0:
        return y.to(x.dtype)
    grid = (block_expert.shape[0], triton.cdiv(N, BLOCK_N))
    wrap_triton(_routed_mm_kernel)[grid](
        x, w_EIO, y, rows_S, offsets_E1, block_expert, block_row0, N, K, x.stride(0),
        x.stride(1), w_EIO.stride(0), w_EIO.stride(1), w_EIO.stride(2), y.stride(0), y.stride(1),
        GATHER=gather, ALLOW_TF32=_allow_tf32(x.dtype), DOT_F32=fix_bf16, BLOCK_M=block_m,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y.to(x.dtype)


@triton_op("moelab::routed_mm_dw", mutates_args=())
def routed_mm_dw(x: torch.Tensor, g_SO: torch.Tensor, rows_S: torch.Tensor,
                 offsets_E1: torch.Tensor, gather: bool, n_experts: int) -> torch.Tensor:
    """dW (E, I, O): dW_e = x[rows of e]^T @ g[rows of e], zeros for an expert with no rows."""
    I, O = x.shape[1], g_SO.shape[1]
    fix_bf16 = _interpreted_bf16(x.dtype)
    dw = g_SO.new_empty(n_experts, I, O, dtype=torch.float32 if fix_bf16 else g_SO.dtype)
    grid = (n_experts, triton.cdiv(I, DW_BLOCK_I) * triton.cdiv(O, DW_BLOCK_O))
    wrap_triton(_routed_mm_dw_kernel)[grid](
        x, g_SO, dw, rows_S, offsets_E1, I, O, x.stride(0), x.stride(1), g_SO.stride(0),
        g_SO.stride(1), dw.stride(0), dw.stride(1), dw.stride(2), GATHER=gather,
        ALLOW_TF32=_allow_tf32(x.dtype), DOT_F32=fix_bf16, BLOCK_I=DW_BLOCK_I,
        BLOCK_O=DW_BLOCK_O, BLOCK_S=DW_BLOCK_S)
    return dw.to(g_SO.dtype)


def _setup_context(ctx, inputs, output):
    x, w_EIO, rows_S, inverse_TK, offsets_E1, block_expert, block_row0, gather, block_m = inputs
    ctx.save_for_backward(x, w_EIO, rows_S, inverse_TK, offsets_E1, block_expert, block_row0)
    ctx.gather, ctx.block_m = gather, block_m


def _backward(ctx, g_SO):
    x, w_EIO, rows_S, inverse_TK, offsets_E1, block_expert, block_row0 = ctx.saved_tensors
    g_SO = g_SO.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        # dx_S = g_S @ W_e^T: the forward kernel on the transposed view, rows already sorted
        dx_SI = routed_mm(g_SO, w_EIO.transpose(1, 2), rows_S, inverse_TK, offsets_E1,
                          block_expert, block_row0, False, ctx.block_m)
        # gathered: a token's k slots sum into its row (one deterministic pass, no atomics)
        dx = reduce_slots(dx_SI, inverse_TK) if ctx.gather else dx_SI
    if ctx.needs_input_grad[1]:
        dw = routed_mm_dw(x, g_SO, rows_S, offsets_E1, ctx.gather, w_EIO.shape[0])
    return dx, dw, None, None, None, None, None, None, None


routed_mm.register_autograd(_backward, setup_context=_setup_context)


def triton_routed_mm(x: torch.Tensor, w_EIO: torch.Tensor, plan: RoutingPlan,
                     gather: bool) -> torch.Tensor:
    """The `triton` backend of `routed_matmul`: (S, O) in sorted pair order."""
    block_m = block_m_for(plan.n_pairs, plan.n_experts)
    cache = plan.__dict__.setdefault("_triton_blocks", {})
    if block_m not in cache:  # shared by every matmul of this plan and their backward passes
        cache[block_m] = block_table(plan.offsets_E1, plan.n_pairs, block_m)
    block_expert, block_row0 = cache[block_m]
    return routed_mm(x, w_EIO, plan.rows_S, plan.inverse_TK, plan.offsets_E1, block_expert,
                     block_row0, gather, block_m)


__all__ = ["block_m_for", "block_table", "routed_mm", "routed_mm_dw", "triton_routed_mm"]
