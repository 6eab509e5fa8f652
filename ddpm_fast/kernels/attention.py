"""Triton flash-attention forward for the U-Net's attention blocks: softmax(q kᵀ · scale) v
over [B, heads, N, d] with d up to 512 (FlashAttention and PyTorch's flash path stop at 256).

Online softmax (Dao et al. 2022, Algorithm 1) in float32, exp2 with the scale folded into
log2(e); the N×N matrix is never written. Each program owns BLOCK_M queries and the whole
head dim, so the float32 accumulator is BLOCK_M × BLOCK_D: BLOCK_M shrinks as d grows to keep
it in registers. Inputs are read through their strides (the q/k/v views of one projection
GEMM need no copies); the output is contiguous [B, heads, N_q, d].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def attention_kernel(Q, K, V, O, scale_log2, H, N_Q, N_K, D,
                     sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=(offs_m < N_Q)[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    K_bh = K + b * skb + h * skh
    V_bh = V + b * svb + h * svh
    for start in range(0, N_K, BLOCK_N):
        keys = start + offs_n
        k_ok = keys < N_K
        k = tl.load(K_bh + keys[None, :] * skn + offs_d[:, None] * skd, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * scale_log2  # log2-domain logits
        s = tl.where(k_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old maximum
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_bh + keys[:, None] * svn + offs_d[None, :] * svd, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, acc.to(O.dtype.element_ty),
             mask=(offs_m < N_Q)[:, None] & d_ok[None, :])


def _config(head_dim: int, dtype: torch.dtype) -> dict:
    # Per-program accumulator BLOCK_M × BLOCK_D float32 stays ≤ 16K values (64 registers a
    # thread at 8 warps); K/V tiles of BLOCK_N × BLOCK_D fit shared memory with the stages.
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=2)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, num_warps=8, num_stages=2)
    if block_d <= 256:
        return dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d, num_warps=8, num_stages=1 if dtype == torch.float32 else 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
              precision: str) -> None:
    """Launch the kernel writing softmax(q kᵀ · scale) v into `out` [B, heads, N_q, d]."""
    B, H, N_q, D = q.shape
    config = _config(D, q.dtype)
    grid = (triton.cdiv(N_q, config["BLOCK_M"]), B * H)
    attention_kernel[grid](q, k, v, out, scale * 1.4426950408889634, H, N_q, k.shape[2], D,
                           *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                           INPUT_PRECISION=precision if q.dtype == torch.float32 else None, **config)
