"""The CUDA C++ kernels run on the CPU by the host emulator (csrc/emulator/, DESIGN §5.6): the kernel
bodies and the ops' host sides of csrc/cuda/<op>.cuh, the very code nvcc compiles, block by block and
thread by thread, against the float64 references on odd shapes, batch 1, channels_last and strided
layouts, tails and grid-stride loops. Every tensor a kernel reads or writes lies in a buffer with
guard bands (and the gaps of a strided view) that must come back untouched, and each op must give
the same bits with its blocks, warps and threads run in reverse order (a race would not)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import emulator
from ddpm_fast import NoiseSchedule
from ddpm_fast.reference import noise as ref_noise
from ddpm_fast.reference.diffusion_step import diffusion_step as reference_step
from helpers import relative_error, ulp_distance
from test_learned_variance import _chain, p_sample_learned

SM90_OPTIN = 232_448  # the opt-in shared memory per block of sm_90 (DESIGN §5.5)
DEFAULT_SHARED = 48 * 1024  # what a kernel may use without opting in


@pytest.fixture(scope="module")
def ops():
    return emulator.ops()


class Guarded:
    """t copied into a buffer with the given strides (default t's) and guard bands either side, each
    wider than twice the tensor's extent: an offset computed with another layout of the call lands in
    the buffer, not outside the process's memory."""

    def __init__(self, t: torch.Tensor, strides=None):
        strides = t.stride() if strides is None else strides
        extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, strides))
        guard = 2 * extent + 37
        self.buffer = torch.randn(extent + 2 * guard, generator=torch.Generator().manual_seed(extent)).to(t.dtype)
        self.tensor = self.buffer.as_strided(t.shape, strides, guard)
        self.tensor.copy_(t)
        covered = torch.zeros(self.buffer.numel(), dtype=torch.bool)
        covered[torch.arange(self.buffer.numel()).as_strided(t.shape, strides, guard).flatten()] = True
        self.outside, self.before = ~covered, self.buffer.clone()

    def untouched(self) -> bool:
        return torch.equal(self.buffer[self.outside], self.before[self.outside])


def _strides(shape, layout):
    if layout == "channels_last":
        return torch.empty(shape).contiguous(memory_format=torch.channels_last).stride()
    if layout == "strided":  # gaps between rows and between elements
        return torch.empty(*shape[:-1], 2 * shape[-1] + 1).stride()[:-1] + (2,)
    return torch.empty(shape).stride()


def _both_orders(run):
    """run(reverse) in index order and in reverse; the two must agree bit for bit."""
    forward, backward = run(False), run(True)
    for a, b in zip(forward, backward):
        assert torch.equal(a, b), "the result depends on the order of threads, warps or blocks: a race"
    return forward


@pytest.mark.parametrize("kind,match", [("barrier", "1 of 64 threads ended while the others wait at barrier 0"),
                                        ("shuffle", "16 of 32 lanes wait at a shuffle"),
                                        ("partial warp", "needs whole warps")])
def test_emulator_refuses_what_is_undefined_on_a_gpu(ops, kind, match):
    with pytest.raises(RuntimeError, match=match):
        ops.misbehave(kind)


# -- diffusion_step_ -----------------------------------------------------------------------------------
STEP_SHAPES = [(1, 1, 1, 1), (1, 3, 5, 7), (3, 3, 5, 7), (2, 1, 3, 3), (2, 4, 6, 5), (5, 3), (1, 13)]
STEP_LAYOUTS = [("contiguous", "contiguous"), ("channels_last", "contiguous"), ("strided", "channels_last"),
                ("contiguous", "strided")]  # (x, model_output)
ROWS = {  # method: (table arguments, row index)
    "ddpm": (dict(method="ddpm"), 400),
    "ddim": (dict(method="ddim", steps=10, eta=0.5), 3),
    "dpm-solver++": (dict(method="dpm-solver++", steps=8), 4),
    "guided": (dict(method="ddim", steps=10, guidance_scale=1.5, classifier_scale=2.0), 5),
}
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STEP_CASES = [(shape, layouts, method) for shape, layouts, method in itertools.product(STEP_SHAPES, STEP_LAYOUTS, ROWS)
              if len(shape) == 4 or layouts == STEP_LAYOUTS[0]]  # other ranks must be contiguous


@pytest.mark.parametrize("shape,layouts,method", STEP_CASES, ids=str)
def test_step_kernel_matches_the_reference(ops, shape, layouts, method):
    kwargs, index = ROWS[method]
    table = NoiseSchedule.linear(1000).step_table(**kwargs)
    out_dtype = OUT_DTYPES[STEP_CASES.index((shape, layouts, method)) % 3]
    g = torch.Generator().manual_seed(len(shape) + sum(shape))
    x, out, uncond, grad, history = (torch.randn(shape, generator=g) for _ in range(5))
    x_strides, out_strides = (_strides(shape, layout) for layout in layouts)
    seed, offset = 2 ** 33 + 7, 11
    z = ref_noise.randn(shape, seed, int(table.noise_keys[index]), offset).double()
    multistep, guided = method == "dpm-solver++", method == "guided"
    expected_history = history.double()
    expected = reference_step(x.double(), out.to(out_dtype).double(), table.coefs[index], z,
                              expected_history if multistep else None,
                              uncond.to(out_dtype).double() if guided else None, grad.double() if guided else None)

    def run(reverse):
        tensors = [Guarded(x, x_strides), Guarded(out.to(out_dtype), out_strides),
                   Guarded(history, x_strides), Guarded(uncond.to(out_dtype), out_strides), Guarded(grad, x_strides)]
        gx, gout, ghistory, guncond, ggrad = (t.tensor for t in tensors)
        ops.diffusion_step_(gx, gout, table.coefs.float(), table.noise_keys, torch.tensor([index]), seed, offset,
                            ghistory if multistep else None, guncond if guided else None, ggrad if guided else None,
                            None, 0, reverse)
        assert all(t.untouched() for t in tensors), "a write outside the tensors"
        return gx.clone(), ghistory.clone()

    got, got_history = _both_orders(run)
    assert relative_error(got, expected) <= 1e-6
    assert relative_error(got_history, expected_history if multistep else history) <= 1e-6


LEARNED_ROWS = {"learned_range": 20, "learned": 49}  # variance: row of a 50-step respaced chain (49: its last)
LEARNED_CASES = [(shape, layout) for shape, layout in itertools.product(STEP_SHAPES, ("contiguous", "channels_last",
                                                                                     "halves"))
                 if len(shape) == 4 or layout == "contiguous"]  # other ranks must be contiguous


@pytest.mark.parametrize("shape,layout", LEARNED_CASES, ids=str)
@pytest.mark.parametrize("variance", LEARNED_ROWS)
def test_learned_step_kernel_matches_the_equations(ops, shape, layout, variance):
    # a learned-variance row with classifier guidance (Σ_θ per element on the noise and the mean
    # shift), the variance channels beside the prediction as the halves of one 2C-channel output
    index, s = LEARNED_ROWS[variance], 2.0
    table = NoiseSchedule.linear(1000).step_table("ddpm", variance, steps=50, classifier_scale=s)
    chain, indices = _chain(NoiseSchedule.linear(1000), table)
    out_dtype = OUT_DTYPES[(sum(shape) + len(layout)) % 3]
    g = torch.Generator().manual_seed(sum(shape))
    x, out, grad = (torch.randn(shape, generator=g) for _ in range(3))
    var = (torch.rand(shape, generator=g) * 2 - 1) * (1 if variance == "learned_range" else 4)
    x_strides = _strides(shape, "channels_last" if layout == "channels_last" else "contiguous")
    out_strides = torch.empty(shape[0], 2 * shape[1], *shape[2:]).stride() if layout == "halves" else x_strides
    seed, offset = 2 ** 33 + 7, 11
    z = ref_noise.randn(shape, seed, int(table.noise_keys[index]), offset).double()
    expected = p_sample_learned(chain, indices[index], out.to(out_dtype).double(), var.to(out_dtype).double(),
                                x.double(), z, variance, True, "epsilon", grad.double(), s)

    def run(reverse):
        tensors = [Guarded(x, x_strides), Guarded(out.to(out_dtype), out_strides), Guarded(grad, x_strides),
                   Guarded(var.to(out_dtype), out_strides)]
        gx, gout, ggrad, gvar = (t.tensor for t in tensors)
        ops.diffusion_step_(gx, gout, table.coefs.float(), table.noise_keys, torch.tensor([index]), seed, offset,
                            None, None, ggrad, gvar, 0, reverse)
        assert all(t.untouched() for t in tensors), "a write outside the tensors"
        return (gx.clone(),)

    (got,) = _both_orders(run)
    assert relative_error(got, expected) <= 1e-6


def test_learned_row_without_variance_writes_nan(ops):
    table = NoiseSchedule.linear(1000).step_table("ddpm", "learned_range", steps=10)
    x = Guarded(torch.zeros(2, 3, 3, 3))
    ops.diffusion_step_(x.tensor, torch.zeros(2, 3, 3, 3), table.coefs.float(), table.noise_keys, torch.tensor([4]),
                        0, 0, None, None, None, None, 0, False)
    assert x.tensor.isnan().all() and x.untouched()


def test_step_grid_stride_loop(ops):
    # one block of 256 threads for 3 × 294 Philox calls: each thread takes several turns of the loop
    shape, table = (3, 3, 17, 23), NoiseSchedule.linear(1000).step_table("ddpm")
    x, out = torch.randn(shape), torch.randn(shape)
    results = []
    for blocks in (0, 1, 2):
        got = Guarded(x)
        ops.diffusion_step_(got.tensor, out, table.coefs.float(), table.noise_keys, torch.tensor([10]), 5, 0, None,
                            None, None, None, blocks, False)
        assert got.untouched(), "a write outside the tensor"
        results.append(got.tensor)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    z = ref_noise.randn(shape, 5, int(table.noise_keys[10])).double()
    assert relative_error(results[0], reference_step(x.double(), out.double(), table.coefs[10], z)) <= 1e-6


def test_step_index_outside_the_table_writes_nan(ops):
    table = NoiseSchedule.linear(1000).step_table("ddpm")
    for index in (-1, 1000):
        x = Guarded(torch.zeros(2, 3, 3, 3))
        ops.diffusion_step_(x.tensor, torch.zeros(2, 3, 3, 3), table.coefs.float(), table.noise_keys,
                            torch.tensor([index]), 0, 0, None, None, None, None, 0, False)
        assert x.tensor.isnan().all() and x.untouched()


# -- randn_ and philox4x32_10 ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape,blocks", [((1, 1), 0), ((1, 5), 0), ((3, 7), 0), ((2, 3, 5, 7), 0), ((4, 1030), 1),
                                          ((4, 1030), 0)])
def test_randn_kernel_is_the_reference_stream(ops, shape, blocks):
    seed, step, offset = 2 ** 40 + 1, 999, 6

    def run(reverse):
        out = Guarded(torch.zeros(shape))
        ops.randn_(out.tensor, seed, step, offset, blocks, reverse)
        assert out.untouched(), "a write outside the tensor"
        return (out.tensor.clone(),)

    got, = _both_orders(run)
    assert ulp_distance(got, ref_noise.randn(shape, seed, step, offset)).max() <= 4


@pytest.mark.parametrize("calls,blocks", [(1, 0), (5, 0), (300, 0), (300, 1)])
def test_philox_kernel_is_the_reference(ops, calls, blocks):
    counter = torch.randint(-2 ** 31, 2 ** 31, (calls, 4), generator=torch.Generator().manual_seed(calls),
                            dtype=torch.int32)
    seed = 2 ** 50 + 12345
    got, = _both_orders(lambda reverse: (ops.philox4x32_10(counter, seed, blocks, reverse),))
    assert torch.equal(got.long() & 0xFFFFFFFF, ref_noise.philox4x32_10(counter.long() & 0xFFFFFFFF, seed))


# -- group_norm_silu -------------------------------------------------------------------------------------
GN_SHAPES = [((1, 1, 1, 1), 1), ((1, 3, 1, 1), 3), ((2, 6, 5, 7), 3), ((3, 12, 3, 5), 4), ((1, 8, 4, 4), 2),
             ((2, 4, 9, 1), 1), ((1, 12, 3, 3), 6), ((2, 3, 33, 17), 1)]
GN_LAYOUTS = ["contiguous", "channels_last", "strided"]
GN_DTYPES = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GN_CASES = list(itertools.product(GN_SHAPES, GN_LAYOUTS, GN_DTYPES))


def _gn_reference(x, weight, bias, add, groups, eps, act, scale=None, shift=None):
    """(y, mean, rstd) in float64, written out (F.group_norm refuses one-element groups); y =
    act((normed·weight + bias)·(1 + scale) + shift) with scale and shift [N, C] or None (0)."""
    h = x.double() + (0 if add is None else add.double()[:, :, None, None])
    n, c = h.shape[:2]
    grouped = h.reshape(n, groups, -1)
    mean, rstd = grouped.mean(-1), (grouped.var(-1, unbiased=False) + eps).rsqrt()
    normed = ((grouped - mean[..., None]) * rstd[..., None]).reshape(h.shape)
    y = normed * weight.double()[:, None, None] + bias.double()[:, None, None]
    if scale is not None:
        y = y * (1 + scale.double()[:, :, None, None])
    if shift is not None:
        y = y + shift.double()[:, :, None, None]
    return (F.silu(y) if act else y), mean, rstd


def _check_group_norm(ops, x, weight, bias, add, groups, eps, act, optin, tolerance, scale=None, shift=None):
    """The emulated op (in both orders, cached and not) against the float64 reference; its outputs."""
    expected, mean, rstd = _gn_reference(x, weight, bias, add, groups, eps, act, scale, shift)
    results = [_both_orders(lambda reverse: ops.group_norm_silu(x, weight, bias, add, scale, shift, groups, eps, act,
                                                                limit, 0, reverse))
               for limit in (optin, 0)]  # 0: no group fits, the three-sweep path
    for got in results:
        assert got[0].dtype == x.dtype and relative_error(got[0], expected) <= tolerance
        assert relative_error(got[1], mean) <= min(tolerance, 1e-6) and relative_error(got[2], rstd) <= 1e-6
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert results[0][0].is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert all(torch.equal(a, b) for a, b in zip(*results))  # caching changes no bit
    return results[0]


@pytest.mark.parametrize("scale_shift", [None, "scale", "shift", "both"])
@pytest.mark.parametrize("case,layout,dtype", GN_CASES, ids=str)
def test_group_norm_kernel_matches_the_reference(ops, case, layout, dtype, scale_shift):
    # scale_shift: guided-diffusion's (1 + scale), + shift per (n, c), each, both or neither
    shape, groups = case
    i = GN_CASES.index((case, layout, dtype))
    g = torch.Generator().manual_seed(i)
    # every third case groups of variance ~1e-6, of the order of eps (a misplaced eps shows there)
    spread, centre = (1e-3, 0.0) if i % 3 == 2 and dtype in (torch.float32, torch.float64) else (2.0, 0.5)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * spread + centre).to(dtype)
    x = Guarded(x, _strides(shape, layout)).tensor
    weight, bias = (torch.randn(shape[1], generator=g).to(dtype) for _ in range(2))
    add = torch.randn(shape[:2], generator=g).to(dtype) * spread if i % 2 == 0 else None
    # [N, C] in guarded buffers too: a read of the wrong sample's row lands in the guard band's noise
    scale, shift = (Guarded((0.5 * torch.randn(shape[:2], generator=g)).to(dtype)).tensor
                    if scale_shift in (which, "both") else None for which in ("scale", "shift"))
    _check_group_norm(ops, x, weight, bias, add, groups, 1e-6, i % 4 != 3, SM90_OPTIN, GN_DTYPES[dtype], scale, shift)


@pytest.mark.parametrize("optin", [101_376, SM90_OPTIN])  # sm_86 and sm_90
def test_group_norm_caches_a_48_kib_group(ops, optin):
    # 5x3x64x64 with one group: 49,152 B of float32, beside the kernel's static shared memory: past the
    # 48 KiB a launch may use without opting in (the launcher once launched it so: a failed launch)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 64, 64, generator=g)
    weight, bias = torch.randn(3, generator=g), torch.randn(3, generator=g)
    _check_group_norm(ops, x, weight, bias, None, 1, 1e-6, True, optin, 1e-5)
    assert ops.group_norm_shared_plan(49_152, 64, optin) == (True, 49_152, True)


@pytest.mark.parametrize("static", [64, 128, 1_088, 1_152])
@pytest.mark.parametrize("optin", [101_376, 166_912, SM90_OPTIN])  # sm_86/89/120, sm_80, sm_90/100
def test_group_norm_shared_plan(ops, static, optin):
    # the launch never asks for more than the runtime grants: static + dynamic within 48 KiB, or
    # within the opt-in limit where it opts in; and every group that fits the opt-in limit is cached
    edges = [DEFAULT_SHARED - static, optin - static]
    for group in sorted({0, 4, 32_768, *(e + d for e in edges for d in (-4, 0, 4)), 2 * optin}):
        cached, dynamic, opt_in = ops.group_norm_shared_plan(group, static, optin)
        assert cached == (static + group <= optin) and dynamic == (group if cached else 0)
        assert opt_in == (static + dynamic > DEFAULT_SHARED)
        assert static + dynamic <= (optin if opt_in else DEFAULT_SHARED)
