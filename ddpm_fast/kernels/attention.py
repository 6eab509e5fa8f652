"""Triton flash-attention forward for the U-Net's attention blocks: softmax(q kᵀ · scale) v
over [B, heads, N, d] with d up to 512 (FlashAttention and PyTorch's flash path stop at 256).

Online softmax (Dao et al. 2022, Algorithm 1) in float32, exp2 with the scale folded into
log2(e); the N×N matrix is never written. Each program owns BLOCK_M queries and the whole
head dim, so the float32 accumulator is BLOCK_M × BLOCK_D: BLOCK_M shrinks as d grows to keep
it in registers, and q kᵀ is summed over head-dim chunks of BLOCK_DK so q is not held beside
it. launch_configs(capability) lists every config; select() picks among them by shape, dtype,
precision and the GPU's compute capability (DESIGN §5.3). Inputs are read through their
strides (the q/k/v views of one projection GEMM need no copies); the output is contiguous
[B, heads, N_q, d].
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..contract import ATTENTION_PRECISIONS
from . import MIN_CAPABILITY, TYPES as _TYPES, capability as _capability


@triton.jit
def attention_kernel(Q, K, V, O, scale_log2, H, N_Q, N_K, D,
                     sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DK: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N_Q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dk = tl.arange(0, BLOCK_DK)
    d_ok = offs_d < D
    Q_rows = Q + b * sqb + h * sqh + offs_m[:, None] * sqn
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    K_bh = K + b * skb + h * skh
    V_bh = V + b * svb + h * svh
    for start in range(0, N_K, BLOCK_N):
        keys = start + offs_n
        k_ok = keys < N_K
        # q kᵀ in head-dim chunks of BLOCK_DK: q is re-read (from L1/L2) rather than held in
        # registers beside the BLOCK_M × BLOCK_D accumulator, which spilled at large d
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_DK):
            dk = d0 + offs_dk
            dk_ok = dk < D
            q = tl.load(Q_rows + dk[None, :] * sqd, mask=m_ok[:, None] & dk_ok[None, :], other=0.0)
            k = tl.load(K_bh + keys[None, :] * skn + dk[:, None] * skd, mask=k_ok[None, :] & dk_ok[:, None],
                        other=0.0)
            s += tl.dot(q, k, input_precision=INPUT_PRECISION)
        s = tl.where(k_ok[None, :], s * scale_log2, float("-inf"))  # log2-domain logits
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


# Head-dim buckets (BLOCK_D) the launcher can be asked for.
BLOCK_DS = (16, 32, 64, 128, 256, 512)
_INTS = ("H", "N_Q", "N_K", "D", "sqb", "sqh", "sqn", "sqd", "skb", "skh", "skn", "skd", "svb", "svh", "svn", "svd",
         "sob", "soh", "son", "sod")


def _tile(block_d: int, dtype: torch.dtype, precision: str | None,
          capability: tuple[int, int]) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_DK, num_warps, num_stages) for a head-dim bucket, chosen from the
    compiled resources (benchmarks/results/kernel-resources.md): no spills and at most 101,376 B
    of shared memory (the smallest opt-in limit of the targets). q kᵀ runs in BLOCK_DK chunks,
    so registers hold q a chunk at a time beside the BLOCK_M × BLOCK_D float32 accumulator."""
    tcgen05 = capability[0] == 10  # Blackwell's tensor cores need 64 rows and keep the accumulator in their memory
    if dtype == torch.float32:
        if precision == "ieee":  # FMA dots: 16 rows keep every target free of spills
            return 16, 32, min(block_d, 32), (8 if block_d == 512 else 4), 1
        if tcgen05 and block_d <= 128:
            return 64, 32, min(block_d, 32), 4, 1
        # mma.sync: tf32x3's hi/lo operands beside the accumulator allow 32 rows by 16 keys up to
        # d = 128 and 16 by 16 (8 warps) above, on every target with Triton 3.6 and 3.8 (32 keys,
        # or 64 rows on sm_100 at d = 256, spilled 8–48 B a thread with Triton 3.6's ptxas)
        if block_d <= 128:
            return 32, 16, min(block_d, 32), 4, 1
        return 16, 16, 32, 8, 1
    # 16-bit: BLOCK_M = 64 lets sm_90 use wgmma and sm_100 tcgen05 (a warp group spans 64 rows);
    # at d = 512 a 64-row accumulator spills, and 32 rows by 32 keys spilled 48 B with Triton
    # 3.6, so 32 rows by 16 keys (mma.sync) there
    if block_d <= 32:
        return 64, 64, block_d, 4, 2
    if block_d <= 128:
        return 64, 64, 64, 8, 2
    return (64, 32, 64, 8, 2) if block_d == 256 else (32, 16, 64, 8, 2)


def _launch_config(block_d: int, dtype: torch.dtype, precision: str | None, capability: tuple[int, int]) -> dict:
    block_m, block_n, block_dk, num_warps, num_stages = _tile(block_d, dtype, precision, capability)
    pointer = "*" + _TYPES[dtype]
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DK=block_dk,
                      INPUT_PRECISION=precision)
    signature = {**dict.fromkeys("QKVO", pointer), "scale_log2": "fp32", **dict.fromkeys(_INTS, "i32"),
                 **dict.fromkeys(constexprs, "constexpr")}
    return dict(kernel=attention_kernel, signature=signature, constexprs=constexprs, num_warps=num_warps,
                num_stages=num_stages, name=f"attention_{_TYPES[dtype]}_{precision or 'native'}_d{block_d}")


@functools.lru_cache
def launch_configs(capability: tuple[int, int]) -> list[dict]:
    """Every config the launcher can choose on a GPU of this compute capability."""
    if tuple(capability) < MIN_CAPABILITY:
        raise ValueError(f"attention: the Triton kernel targets compute capability >= {MIN_CAPABILITY}, "
                         f"got {tuple(capability)}")
    return [_launch_config(block_d, dtype, precision, tuple(capability))
            for dtype in _TYPES for precision in (ATTENTION_PRECISIONS if dtype == torch.float32 else (None,))
            for block_d in BLOCK_DS]


def select(head_dim: int, dtype: torch.dtype, precision: str, capability: tuple[int, int]) -> dict:
    """The config of launch_configs(capability) for this head dim, dtype and float32 precision
    (a pure function: tests call it without a GPU)."""
    block_d = max(BLOCK_DS[0], triton.next_power_of_2(head_dim))
    name = f"attention_{_TYPES[dtype]}_{precision if dtype == torch.float32 else 'native'}_d{block_d}"
    return next(config for config in launch_configs(capability) if config["name"] == name)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, scale: float,
              precision: str) -> None:
    """Launch the kernel writing softmax(q kᵀ · scale) v into `out` [B, heads, N_q, d]."""
    B, H, N_q, D = q.shape
    config = select(D, q.dtype, precision, _capability(q))
    grid = (triton.cdiv(N_q, config["constexprs"]["BLOCK_M"]), B * H)
    attention_kernel[grid](q, k, v, out, scale * 1.4426950408889634, H, N_q, k.shape[2], D,
                           *q.stride(), *k.stride(), *v.stride(), *out.stride(), **config["constexprs"],
                           num_warps=config["num_warps"], num_stages=config["num_stages"])
