"""The DDPM U-Net: the paper's architecture and parameter count, checkpoints, bad input.
(Numerical equality with diffusers' UNet2DModel is in test_diffusers_parity.py.)"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import UNet
from ddpm_fast.ops.conv2d import PackedConv2d
from ddpm_fast.unet import get_timestep_embedding
from helpers import relative_error

SMALL = dict(ch=16, out_ch=2, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
             in_channels=2, resolution=8, num_groups=8)


def test_cifar10_net_has_the_papers_parameter_count():
    with torch.device("meta"):
        model = UNet.ddpm_cifar10()
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 51
    assert len([m for m in model.modules() if type(m).__name__ == "AttnBlock"]) == 6


def test_presets_are_the_shipped_architectures():
    from safetensors import safe_open
    with safe_open("ddpm_fast/weights/digits.safetensors", framework="pt") as f:
        bundled = json.loads(f.metadata()["ddpm_fast_config"])
    assert UNet.digits().config == bundled  # `ddpm-fast train`'s defaults make this network
    small = UNet.small(out_ch=3)
    assert small.config["out_ch"] == 3 and small.config["resolution"] == 16
    with torch.device("meta"):
        assert UNet.ddpm_cifar10(dropout=0.0).config == {**UNet.ddpm_cifar10().config, "dropout": 0.0}


def test_timestep_embedding_is_the_originals():
    t = torch.tensor([0, 1, 999])
    emb = get_timestep_embedding(t, 8)
    freqs = [math.exp(-math.log(10000) * k / 3) for k in range(4)]
    expected = [[math.sin(ti * f) for f in freqs] + [math.cos(ti * f) for f in freqs] for ti in (0, 1, 999)]
    assert torch.allclose(emb, torch.tensor(expected), atol=1e-4)
    assert get_timestep_embedding(t, 9).shape == (3, 9)


def test_forward_shapes_dtypes_and_layouts():
    torch.manual_seed(0)
    model = UNet(**SMALL).eval()
    with torch.no_grad():  # off the near-zero init (output RMS 7.5e-6), so a wrong output cannot pass
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([0, 10, 999])
    with torch.no_grad():
        out = model(x, t)
        assert out.shape == (3, 2, 8, 8) and out.dtype == torch.float32
        assert out.square().mean().sqrt() > 0.1
        assert relative_error(model(x[1:2], t[1:2]), out[1:2]) < 1e-5  # batch 1
        assert relative_error(model(x[1:2], torch.tensor([500])), out[1:2]) > 1e-2  # another t is another output
        assert torch.allclose(model(x, torch.tensor(10)), model(x, torch.full((3,), 10)))  # scalar t broadcasts
        cl = model(x.to(memory_format=torch.channels_last), t)
        assert relative_error(cl, out) < 1e-5
        assert relative_error(model.double()(x.double(), t), out) < 1e-5  # float32 against float64 (DESIGN §6)


def test_downsample_pads_like_tf_same():
    model = UNet(**SMALL)
    down = model.down[0].downsample
    x = torch.randn(1, 16, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert torch.allclose(down(x), expected) and down(x).shape == (1, 16, 4, 4)


def test_residual_branches_start_at_zero():
    # the original's init_scale=0 on each branch's last layer: a fresh net is near identity per block
    model = UNet(**SMALL)
    assert model.conv_out.weight.abs().max() < 1e-4 and model.down[0].block[0].conv2.weight.abs().max() < 1e-4


def test_save_and_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = UNet(**SMALL)
    model.save_pretrained(tmp_path / "m.safetensors")
    loaded = UNet.from_pretrained(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_truncated_or_foreign_checkpoints_are_refused(tmp_path):
    from safetensors.torch import save_file
    model = UNet(**SMALL)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.pop("conv_in.weight")
    save_file(state, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no 'ddpm_fast_config' metadata"):
        UNet.from_pretrained(tmp_path / "plain.safetensors")
    save_file(state, str(tmp_path / "cut.safetensors"), metadata={"ddpm_fast_config": __import__("json").dumps(model.config)})
    with pytest.raises(ValueError, match=r"missing keys \['conv_in.weight'\]"):
        UNet.from_pretrained(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError, match="bundled"):
        UNet.from_pretrained("no-such-model")


class _Payload:
    """Unpickling it runs code: creates `marker` (what an attacker's os.system would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _diffusers_folder(path, weights_name, weights_bytes):
    path.mkdir()
    config = dict(sample_size=8, in_channels=2, out_channels=2, block_out_channels=[16, 32], layers_per_block=1,
                  norm_num_groups=8, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                  up_block_types=["AttnUpBlock2D", "UpBlock2D"], attention_head_dim=None, norm_eps=1e-6,
                  freq_shift=1, flip_sin_to_cos=False, downsample_padding=0)  # the DDPM architecture
    (path / "config.json").write_text(json.dumps(config))
    (path / weights_name).write_bytes(weights_bytes)
    return path


def test_pickled_code_never_runs(tmp_path, capsys):
    from ddpm_fast.cli import main
    marker = tmp_path / "marker"
    model = UNet(**SMALL)
    torch.save({"config": model.config, "state_dict": model.state_dict(), "extra": _Payload(marker)},
               tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is live: full unpickling runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match="not a readable weights-only PyTorch checkpoint"):
        UNet.from_pretrained(tmp_path / "evil.pt")
    folder = _diffusers_folder(tmp_path / "evil_diffusers", "diffusion_pytorch_model.bin",
                               (tmp_path / "evil.pt").read_bytes())
    with pytest.raises(ValueError, match="not a readable weights-only PyTorch checkpoint"):
        UNet.from_pretrained(folder)
    for source in (tmp_path / "evil.pt", folder):
        assert main(["sample", "--model", str(source), "--num", "1", "--out", str(tmp_path / "s.npz"), "--quiet"]) == 2
        assert "weights-only" in capsys.readouterr().err
        assert main(["convert", str(source), str(tmp_path / "m.safetensors")]) == 2
        assert "weights-only" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("damage", ["header", "half", "last byte", "zeros", "json"])
def test_corrupt_safetensors_are_a_clear_error(tmp_path, capsys, damage):
    from ddpm_fast.cli import main
    UNet(**SMALL).save_pretrained(tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    data = {"header": data[:5], "half": data[:len(data) // 2], "last byte": data[:-1], "zeros": bytes(len(data)),
            "json": data[:8] + b"{not json" + data[17:]}[damage]
    (tmp_path / "bad.safetensors").write_bytes(data)
    folder = _diffusers_folder(tmp_path / "bad_diffusers", "diffusion_pytorch_model.safetensors", data)
    for source in (tmp_path / "bad.safetensors", folder):
        with pytest.raises(ValueError, match="is not a readable safetensors file"):
            UNet.from_pretrained(source)
        assert main(["sample", "--model", str(source), "--num", "1", "--out", str(tmp_path / "s.npz"), "--quiet"]) == 2
        assert "is not a readable safetensors file" in capsys.readouterr().err


def test_config_metadata_that_are_not_unet_arguments(tmp_path):
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in UNet(**SMALL).state_dict().items()}
    for config, match in (("{not json", "not UNet arguments"), (json.dumps({**SMALL, "wings": 2}), "wings")):
        save_file(state, str(tmp_path / "m.safetensors"), metadata={"ddpm_fast_config": config})
        with pytest.raises(ValueError, match=match):
            UNet.from_pretrained(tmp_path / "m.safetensors")


@pytest.mark.parametrize("x_shape,t,match", [
    ((2, 3, 8, 8), [1, 2], r"\[B, 2, H, W\]"), ((2, 8, 8), [1, 2], r"\[B, 2, H, W\]"),
    ((2, 2, 7, 8), [1, 2], "divisible by 2"), ((2, 2, 8, 8), [1, 2, 3], "shape \\[B\\]"),
    ((2, 2, 8, 8), [1.0, float("nan")], "finite"),
])
def test_bad_inputs(x_shape, t, match):
    model = UNet(**SMALL)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(x_shape), torch.tensor(t))


def test_backend_reaches_every_block():
    model = UNet(**SMALL, backend="reference")
    blocks = [m for m in model.modules() if type(m).__name__ in ("ResnetBlock", "AttnBlock")]
    assert blocks and all(m.backend == "reference" for m in blocks)
    model.backend = "auto"
    assert all(m.backend == "auto" for m in blocks)
    with pytest.raises(ValueError, match="backend"):
        model.backend = "fast"


@pytest.mark.parametrize("kwargs,match", [
    (dict(ch_mult=()), "ch_mult"), (dict(ch=12), "divisible by num_groups"), (dict(resolution=7), "divisible"),
    (dict(dropout=1.0), "dropout"), (dict(ch=0), "ch"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**{**SMALL, **kwargs})


def _layout_conversions(model, x, t):
    """aten::copy_ calls of one forward (after a first one, which packs the weights) that convert a
    layout, as (the op they are rooted at, the copied shape): rooted at a convolution (whose input
    and weights disagree on the layout, or the packed op reading NCHW) or at an explicit
    contiguous, clone or copy_ — leaving out the copies that are maths (addmm/baddbmm writing
    their bias or residual into the output, the pad, dtype conversions, upsample_nearest2d's own)."""
    with torch.inference_mode():
        model(x, t)
        with torch.profiler.profile(record_shapes=True) as prof:
            model(x, t)
    found = []
    for event in prof.events():
        if event.name != "aten::copy_":
            continue
        root = event
        while root.cpu_parent is not None and root.cpu_parent.name.startswith("aten::"):
            root = root.cpu_parent
        parent = root.cpu_parent.name if root.cpu_parent is not None else None
        if root.name in ("aten::conv2d", "aten::contiguous", "aten::clone", "aten::copy_"):
            found.append((parent if parent == "mkldnn::_convolution_pointwise" else root.name,
                          tuple(event.input_shapes[0])))
    return found


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
@pytest.mark.parametrize("conv", ["torch", "packed"])
def test_forward_keeps_one_layout_on_the_cpu(backend, memory_format, conv):
    # NCHW or channels_last from the first convolution to the last, the attention blocks included.
    # Two threads: with one, PyTorch runs a 1×1 convolution below batch 16 through its slow im2col
    # path (thnn_conv2d), whose own copies would count here whatever the layouts (CI runs with
    # the default threads, OMP_NUM_THREADS=1 runs elsewhere). The packed convolutions (DESIGN §5.8)
    # write channels_last: from NCHW, the network's input and output are the only tensors converted
    # (the image, [B, in_ch, H, W] and [B, out_ch, H, W]), the activations never.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = UNet(**SMALL, backend=backend).eval().to(memory_format=memory_format)
        for module in model.modules():
            if isinstance(module, PackedConv2d):
                module.impl = conv
        x = torch.randn(2, 2, 8, 8).contiguous(memory_format=memory_format)
        expected = []
        if conv == "packed" and memory_format == torch.contiguous_format:
            expected = [("mkldnn::_convolution_pointwise", (2, 2, 8, 8)), ("aten::contiguous", (2, 2, 8, 8))]
        assert _layout_conversions(model, x, torch.tensor([3, 7])) == expected
    finally:
        torch.set_num_threads(threads)
    with torch.inference_mode():
        assert model(x, torch.tensor([3, 7])).is_contiguous(memory_format=memory_format)


def test_torch_backend_equals_the_reference():
    torch.manual_seed(0)
    model = UNet(**SMALL).eval()
    for m in model.modules():  # non-trivial norms and residual branches
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.3), torch.nn.init.normal_(m.bias, 0.0, 0.3)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, 0.0, 0.2)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3, 700])
    with torch.no_grad():
        got = model(x, t)
        model.backend = "reference"
        expected = model.double()(x.double(), t)
    assert relative_error(got, expected) < 1e-5
