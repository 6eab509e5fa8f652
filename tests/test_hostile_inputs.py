"""Property-based tests (hypothesis) over the public ops' arguments: shapes with odd sizes and
batch 1, dtypes including unsupported ones, layouts (NCHW, channels_last, transposed, sliced,
expanded), group counts, devices. Each example has at most one defect: with none, the op
must match the float64 reference; with one, it must raise a Python exception naming what it
expected and what it got — never crash, hang or return a wrong result. The compiled CPU ops run
(impl="cpu"; attention has no C++ op: impl="auto", torch's SDPA on the CPU).

Non-finite values are not a defect: some valid examples hold a NaN or an infinity, and the
output must be NaN/Inf exactly where the reference's is (never masked)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddpm_fast as df
from ddpm_fast.ops import attention, diffusion_step_, group_norm_silu, randn
from ddpm_fast.reference import noise as ref_noise
from ddpm_fast import reference as ref_ops
from ddpm_fast.reference.diffusion_step import diffusion_step as reference_step
from helpers import ulp_distance

# derandomised, without a database, by the profile tests/conftest.py loads ("ci")
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOW = (torch.float16, torch.bfloat16)
FLOATS = (torch.float32, *LOW)


POISONS = [None] * 4 + [float("nan"), float("inf"), float("-inf")]


def _poison(t, value, where):
    """t with one element (picked by the integer `where`) set to `value` (None: t as it is)."""
    if value is not None:
        t = t.clone()
        t.view(-1)[where % t.numel()] = value
    return t


def _tolerance(dtype):
    # DESIGN §6: 1e-5 for float32; half precision is rounded once at the output (2^-8 for bf16)
    return {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 2e-2)


def _close(out, ref, dtype):
    torch.testing.assert_close(out.double(), ref.double(), rtol=_tolerance(dtype), atol=_tolerance(dtype),
                               equal_nan=True)


def _laid_out(t, layout):
    """t (4-D) in a layout: its values never change, only the strides."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # H and W swapped in memory
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced":  # every other element of a wider tensor
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def _raises(call, error, *fragments):
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


LAYOUTS = ["contiguous", "channels_last", "transposed", "sliced"]

# -- group_norm_silu ------------------------------------------------------------------------

GN_DEFECTS = [None] * 6 + ["x dtype", "num_groups", "weight shape", "weight dtype", "add shape", "device", "rank",
                           "empty", "eps"]


@st.composite
def group_norm_cases(draw):
    groups, per_group = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    return dict(dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])),
                n=draw(st.integers(1, 3)), groups=groups, c=groups * per_group, h=draw(st.integers(1, 7)),
                w=draw(st.integers(1, 7)), layout=draw(st.sampled_from(LAYOUTS + ["expanded"])),
                add=draw(st.booleans()), act=draw(st.booleans()), eps=draw(st.sampled_from([1e-6, 1e-3, 0.0])),
                scale=draw(st.sampled_from([1.0, 100.0])), shift=draw(st.sampled_from([0.0, 50.0])),
                seed=draw(st.integers(0, 2 ** 31)), poison=draw(st.sampled_from(POISONS)),
                defect=draw(st.sampled_from(GN_DEFECTS)))


@PROPERTY
@given(group_norm_cases())
def test_group_norm_silu(case):
    g = torch.Generator().manual_seed(case["seed"])
    n, c, h, w, dtype, groups = case["n"], case["c"], case["h"], case["w"], case["dtype"], case["groups"]
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * case["scale"] + case["shift"]
    x = _poison(x, case["poison"], case["seed"]).to(dtype)
    x = x[:1].expand(n, c, h, w) if case["layout"] == "expanded" else _laid_out(x, case["layout"])
    weight, bias = (torch.randn(c, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    add = torch.randn(n, c, generator=g, dtype=torch.float64).to(dtype) if case["add"] else None
    args = dict(x=x, weight=weight, bias=bias, num_groups=groups, eps=case["eps"], add=add, act=case["act"])
    call = lambda: group_norm_silu(**args, impl="cpu")  # noqa: E731
    other = torch.float32 if dtype != torch.float32 else torch.float16
    defect = case["defect"]
    if defect is None:
        out = call()
        ref = ref_ops.group_norm_silu(x.double(), weight.double(), bias.double(), groups, case["eps"],
                                      add=None if add is None else add.double(), act=case["act"])
        assert out.dtype == dtype and out.shape == x.shape
        if case["layout"] == "channels_last" and h * w > 1 and c > 1:
            assert out.is_contiguous(memory_format=torch.channels_last)  # x's memory format kept
        _close(out, ref, dtype)
    elif defect == "x dtype":
        args["x"] = (x * 10).to(torch.int32)
        _raises(call, TypeError, "float32, float16, bfloat16 or float64", "got torch.int32")
    elif defect == "num_groups":
        args["num_groups"] = bad = [0, -1, c + 1][case["seed"] % 3]
        _raises(call, ValueError, f"C = {c} must be divisible by num_groups", f"got num_groups = {bad}")
    elif defect == "weight shape":
        args["weight"] = torch.ones(c + 1, dtype=dtype)
        _raises(call, ValueError, f"weight must have shape ({c},)", f"got ({c + 1},)")
    elif defect == "weight dtype":
        args["weight"] = weight.to(other)
        _raises(call, TypeError, f"weight must have x's dtype {dtype}, got {other}")
    elif defect == "add shape":
        args["add"] = torch.zeros(n, c + 1, dtype=dtype)
        _raises(call, ValueError, f"add must have shape ({n}, {c})", f"got ({n}, {c + 1})")
    elif defect == "device":
        args["bias"] = bias.to("meta")
        _raises(call, ValueError, "bias is on meta but x is on cpu")
    elif defect == "rank":
        args["x"] = x[0]
        _raises(call, ValueError, "x must be 4-D [N, C, H, W]", f"got 3-D {tuple(x[0].shape)}")
    elif defect == "empty":
        args["x"], args["add"] = x[:0], None
        _raises(call, ValueError, "x must not be empty", f"got shape (0, {c}, {h}, {w})")
    else:
        args["eps"] = bad = [-1e-3, float("nan"), float("inf")][case["seed"] % 3]
        _raises(call, ValueError, "eps must be a finite number ≥ 0", f"got {bad!r}")


# -- diffusion_step_ ------------------------------------------------------------------------

STEP_DEFECTS = [None] * 8 + ["x dtype", "output dtype", "shape", "strided non-4-D", "coefs dtype", "coefs shape",
                             "keys dtype", "index range", "index dtype", "seed", "offset", "device", "overlap",
                             "partial overlap", "non-finite row"]
TABLES = {name: df.NoiseSchedule.linear(10).step_table(*args)
          for name, args in {"ddpm": ("ddpm",), "ddpm small": ("ddpm", "fixed_small", False),
                             "ddim": ("ddim", "fixed_large", True, "epsilon", 5, 0.5),
                             "ddim x0": ("ddim", "fixed_large", False, "x0", 4, 1.0)}.items()}


@st.composite
def step_cases(draw):
    rank = draw(st.sampled_from([1, 2, 3, 4, 4, 4, 5]))
    return dict(shape=(draw(st.integers(1, 3)), *draw(st.lists(st.integers(1, 6), min_size=rank - 1,
                                                              max_size=rank - 1))),
                x_layout=draw(st.sampled_from(LAYOUTS)), out_layout=draw(st.sampled_from(LAYOUTS)),
                out_dtype=draw(st.sampled_from(FLOATS)), table=draw(st.sampled_from(sorted(TABLES))),
                index=draw(st.integers(0, 10)), seed=draw(st.integers(0, 2 ** 63 - 1)),
                offset=draw(st.sampled_from([0, 1, 12345, 2 ** 32 - 3])), data_seed=draw(st.integers(0, 2 ** 31)),
                poison=draw(st.sampled_from(POISONS)), defect=draw(st.sampled_from(STEP_DEFECTS)))


@PROPERTY
@given(step_cases())
def test_diffusion_step(case):
    shape, defect = case["shape"], case["defect"]
    if defect in ("overlap", "partial overlap"):
        shape = (2, 2, 3, 3)  # a batch to expand over, a square to transpose
    if defect == "strided non-4-D":
        shape = (shape[0], 3, 4)
    g = torch.Generator().manual_seed(case["data_seed"])
    x = _poison(torch.randn(shape, generator=g) * 1.5, case["poison"], case["data_seed"])
    out = _poison(torch.randn(shape, generator=g), case["poison"], case["data_seed"] // 7).to(case["out_dtype"])
    if len(shape) == 4:
        x, out = _laid_out(x, case["x_layout"]), _laid_out(out, case["out_layout"])
    table = TABLES[case["table"]]
    coefs, keys = table.coefs.float(), table.noise_keys
    index = case["index"] % len(table)
    seed, offset = case["seed"], case["offset"]
    args = dict(x=x, model_output=out, coefs=coefs, noise_keys=keys, step_index=torch.tensor([index]), seed=seed,
                sample_offset=offset)
    call = lambda: diffusion_step_(**args, impl="cpu")  # noqa: E731
    if defect is None:
        before = x.double()
        z = ref_noise.randn(shape, seed, int(keys[index]), offset)
        expected = reference_step(before, out.double(), table.coefs[index], z.double())
        assert call() is x
        _close(x, expected, torch.float32)
    elif defect == "x dtype":
        args["x"] = x.double()
        _raises(call, TypeError, "x must be float32", "got torch.float64")
    elif defect == "output dtype":
        args["model_output"] = bad = out.to([torch.float64, torch.int32][case["seed"] % 2])
        _raises(call, TypeError, "model_output must be float32, float16 or bfloat16", f"got {bad.dtype}")
    elif defect == "shape":
        args["model_output"] = torch.zeros(*shape[:-1], shape[-1] + 1)
        _raises(call, ValueError, f"model_output must have x's shape {tuple(shape)}",
                f"got {(*shape[:-1], shape[-1] + 1)}")
    elif defect == "strided non-4-D":
        args["x"] = x.transpose(1, 2).contiguous().transpose(1, 2)
        _raises(call, ValueError, "tensors that are not 4-D must be contiguous")
    elif defect == "coefs dtype":
        args["coefs"] = table.coefs
        _raises(call, ValueError, "coefs must be a contiguous float32 [S, 14] table", "got torch.float64")
    elif defect == "coefs shape":
        args["coefs"] = coefs[:, :6].contiguous()
        _raises(call, ValueError, "coefs must be a contiguous float32 [S, 14] table", f"({len(table)}, 6)")
    elif defect == "keys dtype":
        args["noise_keys"] = keys.int()
        _raises(call, ValueError, f"noise_keys must be a contiguous int64 [{len(table)}] tensor", "got torch.int32")
    elif defect == "index range":
        bad = [len(table), -1, 2 ** 40][case["seed"] % 3]
        args["step_index"] = torch.tensor([bad])
        _raises(call, IndexError, f"step index {bad} is outside the table of {len(table)} rows")
    elif defect == "index dtype":
        args["step_index"] = torch.tensor([index], dtype=torch.int32)
        _raises(call, ValueError, "step_index must be a one-element int64 tensor", "got torch.int32")
    elif defect == "seed":
        args["seed"] = bad = [-1, 2 ** 63, 1.5][case["seed"] % 3]
        _raises(call, ValueError, "seed must be an int in [0, ", f"got {bad!r}")
    elif defect == "offset":
        args["sample_offset"] = 2 ** 32 - shape[0] + 1  # the last sample's index is 2^32
        _raises(call, ValueError, *([f"sample indices [{2 ** 32 - shape[0] + 1}, {2 ** 32 + 1}) must lie below 2^32"]
                                    if shape[0] > 1 else ["sample_offset must be an int in [0, 4294967296)"]))
    elif defect == "device":
        args["model_output"] = out.to("meta")
        _raises(call, ValueError, "model_output is on meta but x is on cpu")
    elif defect == "overlap":
        args["x"] = x[:1].expand(shape)
        _raises(call, ValueError, "x must not have elements sharing memory", f"got strides {args['x'].stride()}")
    elif defect == "partial overlap":
        args["model_output"] = x.transpose(2, 3)
        _raises(call, ValueError, "model_output overlaps x in memory")
    else:
        bad = coefs.clone()
        bad[index, case["seed"] % 6] = [float("nan"), float("inf")][case["seed"] % 2]
        args["coefs"] = bad
        _raises(call, ValueError, f"coefficient row {index} is not finite")


# -- attention ------------------------------------------------------------------------------

ATTENTION_DEFECTS = [None] * 6 + ["dtype", "mixed dtypes", "rank", "kv shapes", "head dims", "device", "empty",
                                  "head dim too large", "scale"]


@st.composite
def attention_cases(draw):
    return dict(b=draw(st.integers(1, 2)), heads=draw(st.integers(1, 3)), nq=draw(st.integers(1, 9)),
                nk=draw(st.integers(1, 9)), d=draw(st.sampled_from([1, 3, 8, 16, 33])),
                dtype=draw(st.sampled_from(FLOATS)), transposed=draw(st.booleans()),
                scale=draw(st.sampled_from([None, 0.1, 1.0, -0.5])), seed=draw(st.integers(0, 2 ** 31)),
                poison=draw(st.sampled_from(POISONS)), poisoned=draw(st.sampled_from("qkv")),
                defect=draw(st.sampled_from(ATTENTION_DEFECTS)))


@PROPERTY
@given(attention_cases())
def test_attention(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, heads, d, dtype = case["b"], case["heads"], case["d"], case["dtype"]

    def make(name, n):  # [B, heads, n, d]; "transposed": stored as [B, n, heads, d], as a fused projection leaves it
        t = torch.randn(b, n, heads, d, generator=g, dtype=torch.float64)
        t = _poison(t, case["poison"] if case["poisoned"] == name else None, case["seed"]).to(dtype)
        return t.transpose(1, 2) if case["transposed"] else t.transpose(1, 2).contiguous()
    q, k, v = make("q", case["nq"]), make("k", case["nk"]), make("v", case["nk"])
    args = dict(q=q, k=k, v=v, scale=case["scale"])
    call = lambda: attention(**args)  # noqa: E731
    defect = case["defect"]
    if defect is None:
        out = call()
        assert out.dtype == dtype and out.shape == q.shape
        _close(out, ref_ops.attention(q.double(), k.double(), v.double(), case["scale"]), dtype)
    elif defect == "dtype":
        args.update(q=q.double(), k=k.double(), v=v.double())
        _raises(call, TypeError, "float32/float16/bfloat16", "got torch.float64, torch.float64, torch.float64")
    elif defect == "mixed dtypes":
        other = torch.float32 if dtype != torch.float32 else torch.bfloat16
        args["v"] = v.to(other)
        _raises(call, TypeError, "q, k, v must share one dtype", f"got {dtype}, {dtype}, {other}")
    elif defect == "rank":
        args["k"] = k[0]
        _raises(call, ValueError, "k must be [B, heads, N, d]", f"got shape {tuple(k[0].shape)}")
    elif defect == "kv shapes":
        args["v"] = torch.zeros(b, heads, case["nk"] + 1, d, dtype=dtype)
        _raises(call, ValueError, "k = v [B, heads, N_k, d]", f"{(b, heads, case['nk'] + 1, d)}")
    elif defect == "head dims":
        args["q"] = torch.zeros(b, heads, case["nq"], d + 1, dtype=dtype)
        _raises(call, ValueError, "need q [B, heads, N_q, d]", f"{(b, heads, case['nq'], d + 1)}")
    elif defect == "device":
        args["v"] = v.to("meta")
        _raises(call, ValueError, "q, k, v must be on one device", "got cpu, cpu, meta")
    elif defect == "empty":
        args["q"] = q[:, :, :0]
        _raises(call, ValueError, "every size must be >= 1", f"got q {(b, heads, 0, d)}")
    elif defect == "head dim too large":
        args.update({name: torch.zeros(b, heads, 2, 513, dtype=dtype) for name in "qkv"})
        _raises(call, ValueError, "head dim must be <= 512, got 513")
    else:
        args["scale"] = bad = [float("nan"), float("inf"), "0.1"][case["seed"] % 3]
        _raises(call, ValueError, "scale must be a finite number or None", f"got {bad!r}")


# -- randn ----------------------------------------------------------------------------------

RANDN_DEFECTS = [None] * 5 + ["negative size", "float size", "no batch", "seed", "bool seed", "step", "offset"]


@st.composite
def randn_cases(draw):
    return dict(shape=tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))),
                seed=draw(st.integers(0, 2 ** 63 - 1)), step=draw(st.integers(0, 2 ** 32 - 1)),
                offset=draw(st.integers(0, 2 ** 32 - 7)), defect=draw(st.sampled_from(RANDN_DEFECTS)))


@PROPERTY
@given(randn_cases())
def test_randn(case):
    shape, defect = case["shape"], case["defect"]
    args = dict(shape=shape, seed=case["seed"], step=case["step"], sample_offset=case["offset"])
    call = lambda: randn(**args, impl="cpu")  # noqa: E731
    if defect is None:
        z = call()
        ref = ref_noise.randn(shape, case["seed"], case["step"], case["offset"])
        assert z.dtype == torch.float32 and z.shape == shape and torch.isfinite(z).all()
        assert z.numel() == 0 or ulp_distance(z, ref).max() <= 4  # DESIGN §3: normals within 4 ulps
    elif defect in ("negative size", "float size", "no batch"):
        args["shape"] = bad = {"negative size": (*shape, -1), "float size": (*shape[:-1], 2.0), "no batch": ()}[defect]
        _raises(call, ValueError, "shape must be a non-empty sequence of sizes >= 0", f"got {bad}")
    elif defect in ("seed", "bool seed"):
        args["seed"] = bad = True if defect == "bool seed" else [-1, 2 ** 63][case["step"] % 2]
        _raises(call, ValueError, "seed must be an int in [0, ", f"got {bad!r}")
    elif defect == "step":
        args["step"] = 2 ** 32 + case["step"]
        _raises(call, ValueError, "step must be an int in [0, 4294967296)", f"got {2 ** 32 + case['step']}")
    else:
        args["shape"] = (7, *shape[1:])
        args["sample_offset"] = 2 ** 32 - 6
        _raises(call, ValueError, f"sample indices [{2 ** 32 - 6}, {2 ** 32 + 1}) must lie below 2^32")


# -- non-finite values propagate ------------------------------------------------------------

def test_non_finite_values_propagate_through_the_step():
    table = TABLES["ddpm"]
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x[0, 1, 2, 3], out[1, 0, 0, 1], out[1, 2, 3, 3] = float("nan"), float("inf"), float("-inf")
    for clip_row in (0, len(table) - 1):  # a clipping row: the clamp must not turn NaN into ±1
        assert table.coefs[clip_row, 6] == 1
        y = diffusion_step_(x.clone(), out, table.coefs.float(), table.noise_keys, torch.tensor([clip_row]), seed=0,
                            impl="cpu")
        bad = ~torch.isfinite(y)
        assert bad.sum() == 3 and bad[0, 1, 2, 3] and bad[1, 0, 0, 1] and bad[1, 2, 3, 3]
        assert torch.isnan(y[0, 1, 2, 3])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_non_finite_values_propagate_through_group_norm(value, layout):
    x = _laid_out(torch.randn(2, 8, 5, 5), layout)
    x[1, 5, 2, 2] = value  # sample 1, group 2 of 4
    y = group_norm_silu(x, torch.ones(8), torch.zeros(8), 4, impl="cpu")
    assert torch.isnan(y[1, 4:6]).all()  # the whole group's statistics are NaN, so is every output of it
    finite = torch.ones_like(y, dtype=torch.bool)
    finite[1, 4:6] = False
    assert torch.isfinite(y[finite]).all()


def test_non_finite_values_propagate_through_attention():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    q[0, 0, 3, 1] = float("nan")
    out = attention(q, k, v)
    assert torch.isnan(out[0, 0, 3]).all() and torch.isfinite(out[0, 0, :3]).all() and torch.isfinite(out[0, 1]).all()
    v[0, 1, 2, 0] = float("inf")
    out = attention(q, k, v)
    assert not torch.isfinite(out[0, 1, :, 0]).any() and torch.isfinite(out[0, 1, :, 1:]).all()
    k = k[:, :, :1].clone()  # one key, NaN in head 0: every score of that head is NaN (SDPA returns 0 there)
    k[0, 0, 0, 5] = float("nan")
    out = attention(q, k, v[:, :, :1])
    assert torch.isnan(out[0, 0]).all() and torch.isfinite(out[0, 1]).all()
