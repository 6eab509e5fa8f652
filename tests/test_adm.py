"""The ADM U-Net and noisy classifier (ddpm_fast/adm.py) against guided-diffusion's and
improved-diffusion's own networks (the golden fixtures of tests/golden/adm/, made by
tests/golden/make_adm_fixtures.py), and their flags, presets and loaders
(ddpm_fast/adm_checkpoints.py, DESIGN §2.7)."""
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ddpm_fast
from ddpm_fast import adm_checkpoints
from ddpm_fast.adm import ADMClassifier, ADMUNet
from ddpm_fast.adm_checkpoints import PRESETS, guided_classifier_config, guided_model_config, parse_flags
from ddpm_fast.cli.main import main
from helpers import cuda_or_skip, relative_error

GOLDEN = Path(__file__).parent / "golden" / "adm"
FIXTURES = sorted(p.stem for p in GOLDEN.glob("*.safetensors"))
CLASSES = {"ADMUNet": ADMUNet, "ADMClassifier": ADMClassifier}


def load_fixture(name: str):
    """(our network holding their weights, in eval mode, its inputs, their output)."""
    with safe_open(str(GOLDEN / f"{name}.safetensors"), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    state = {k[len("state."):]: v.float() for k, v in tensors.items() if k.startswith("state.")}
    model = CLASSES[metadata["class"]](**json.loads(metadata["config"])).load_checked(state, name).eval()
    inputs = [tensors["x"], tensors["t"]] + ([tensors["y"]] if "y" in tensors else [])
    return model, inputs, tensors["out"], state


def test_every_option_has_a_fixture():
    metadata = [safe_open(str(GOLDEN / f"{n}.safetensors"), framework="pt").metadata() for n in FIXTURES]
    configs = [json.loads(m["config"]) for m in metadata]
    unets = [c for c, m in zip(configs, metadata) if m["class"] == "ADMUNet"]
    assert len(FIXTURES) == 8 and len(unets) == 6
    assert {m["reference"] for m in metadata} == {"guided_diffusion.unet.UNetModel", "improved_diffusion.unet.UNetModel",
                                                  "guided_diffusion.unet.EncoderUNetModel"}
    for key in ("use_scale_shift_norm", "resblock_updown", "use_new_attention_order"):
        assert {c.get(key, False) for c in configs} == {False, True}, key
    assert {c.get("num_head_channels", -1) == -1 for c in configs} == {False, True}  # heads by count and by size
    assert {c.get("num_classes") is None for c in unets} == {False, True}
    assert {c["out_channels"] for c in unets} == {3, 6}  # learned sigma and not


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("backend", ["auto", "reference", "torch"])
def test_agrees_with_their_network(name, backend):
    model, inputs, expected, _ = load_fixture(name)
    model.backend = backend
    with torch.no_grad():
        out = model(*inputs)
        out_cl = model(inputs[0].to(memory_format=torch.channels_last), *inputs[1:])
    assert out.shape == expected.shape
    assert relative_error(out, expected) < 1e-5
    assert relative_error(out_cl, expected) < 1e-5


@pytest.mark.parametrize("name", FIXTURES)
def test_float64_reference_agrees_with_their_float32_network(name):
    model, inputs, expected, _ = load_fixture(name)
    model.double().backend = "reference"
    with torch.no_grad():
        out = model(inputs[0].double(), *inputs[1:])
    assert out.dtype == torch.float64 and relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("name", ["gd_updown_new_heads_cond", "gd_classifier_ss_updown"])
def test_triton_kernels_in_the_interpreter(name):
    pytest.importorskip("triton")
    model, inputs, expected, _ = load_fixture(name)
    model.backend = "triton"
    with torch.no_grad():
        assert relative_error(model(*inputs), expected) < 1e-5


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_agrees_with_their_network_on_cuda(name, backend):
    """Triton's attention (float32 as tf32x3) and GroupNorm kernels, or the CUDA C++ GroupNorm op."""
    device = cuda_or_skip()
    model, inputs, expected, _ = load_fixture(name)
    model.to(device).backend = backend
    with torch.no_grad():
        out = model(*(tensor.to(device) for tensor in inputs))
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_classifier_gradient_for_guidance(device):
    """∇ₓ log p_φ(y | x_t, t) through the fused ops (classifier guidance) equals the float64
    reference's; on CUDA the attention runs SDPA where autograd records (no Triton backward)."""
    from ddpm_fast.classifier import classifier_gradient
    device = cuda_or_skip() if device == "cuda" else torch.device("cpu")
    model, (x, t), _, _ = load_fixture("gd_classifier_ss_updown")
    y = torch.tensor([1, 8])
    fused = classifier_gradient(model.to(device), x.to(device), t.to(device), y.to(device))
    model.double().backend = "reference"
    reference = classifier_gradient(model, x.to(device), t.to(device), y.to(device))
    assert fused.dtype == torch.float32 and relative_error(fused, reference) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_as_exact_as_the_plain_maths(dtype):
    """DESIGN §6: in 16 bits, the fused path's error at most 2× that of the plain maths in 16 bits."""
    model, inputs, expected, _ = load_fixture("gd_ss_updown_new_headch_cond_sigma")
    model.to(dtype)
    with torch.no_grad():
        fused = model(inputs[0].to(dtype), *inputs[1:])
        model.backend = "reference"
        plain = model(inputs[0].to(dtype), *inputs[1:])
    assert fused.dtype == dtype
    assert relative_error(fused, expected) <= max(1e-2, 2 * relative_error(plain, expected))


@pytest.mark.parametrize("name", [n for n in FIXTURES if "classifier" not in n])
@pytest.mark.parametrize("shape, layout", [((1, 3, 4, 12), "nchw"), ((3, 3, 12, 4), "channels_last"),
                                           ((2, 3, 8, 20), "strided")])
def test_fused_path_matches_float64_reference_on_fresh_inputs(name, shape, layout):
    """Batch 1 and 3, non-square sizes (the tokens' order), channels_last and a strided view."""
    model, inputs, _, _ = load_fixture(name)
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], generator=generator)[..., ::2] if layout == "strided" \
        else torch.randn(shape, generator=generator)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x
    t = torch.randint(0, 1000, (shape[0],), generator=generator)
    y = [torch.randint(0, model.num_classes, (shape[0],), generator=generator)] if len(inputs) == 3 else []
    with torch.no_grad():
        out = model(x, t, *y)
        model.double().backend = "reference"
        reference = model(x.double(), t, *y)
    assert relative_error(out, reference) < 1e-5


def test_batch_elements_are_independent():
    model, (x, t, y), expected, _ = load_fixture("gd_ss_updown_new_headch_cond_sigma")
    with torch.no_grad():
        one = model(x[1:], t[1:], y[1:])
    assert relative_error(one, expected[1:]) < 1e-5


def shape_digest(model) -> str:
    lines = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sorted(model.state_dict().items()))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_their_state_dict(name):
    """Every preset's network has the keys and shapes their own scripts build from its flags."""
    golden = json.loads((GOLDEN / "presets.json").read_text())["presets"][name]
    preset = PRESETS[name]
    cls = ADMClassifier if preset.builder == "classifier" else ADMUNet
    with torch.device("meta"):
        model = cls(**preset.config())
    assert golden["verbatim_in_readme"] or preset.builder == "classifier"
    assert sum(p.numel() for p in model.parameters()) == golden["parameters"]
    assert shape_digest(model) == golden["sha256"]


def meta_state_dict(preset: str):
    cls = ADMClassifier if PRESETS[preset].builder == "classifier" else ADMUNet
    with torch.device("meta"):
        return cls(**PRESETS[preset].config()).state_dict()


def test_wrong_preset_is_one_line_naming_the_first_difference():
    with pytest.raises(ValueError) as error:  # checked on the meta device: nothing of 400M parameters is allocated
        ddpm_fast.from_guided_diffusion(meta_state_dict("64x64_diffusion"), preset="128x128_diffusion")
    message = str(error.value)
    assert "\n" not in message
    # the first in the network's order (time_embed comes first), then the first few of each kind
    assert "first difference: key 'time_embed.0.weight' expected (1024, 256), got (768, 192);" in message
    assert "'input_blocks.0.0.weight: expected (256, 3, 3, 3), got (192, 3, 3, 3)'" in message
    assert "] and 422 more" in message
    with pytest.raises(ValueError, match=r"first difference: key 'input_blocks.7.1.norm.weight' expected \(512,\), "
                                         r"missing;"):
        ddpm_fast.from_guided_diffusion(meta_state_dict("256x256_diffusion_uncond"), preset="128x128_diffusion",
                                        num_channels=256)
    with pytest.raises(ValueError, match="first difference: unexpected key 'label_emb.weight'"):
        ddpm_fast.from_guided_diffusion(meta_state_dict("256x256_diffusion"), preset="256x256_diffusion_uncond")
    with pytest.raises(ValueError, match="first difference: key 'label_emb.weight' expected .* missing"):
        ddpm_fast.from_guided_diffusion(meta_state_dict("256x256_diffusion_uncond"), preset="256x256_diffusion")


def test_preset_kind_and_name_are_checked():
    with pytest.raises(ValueError, match="'64x64_classifier' is a classifier: load it with "
                                         "classifier_from_guided_diffusion"):
        ddpm_fast.from_guided_diffusion({}, preset="64x64_classifier")
    with pytest.raises(ValueError, match="is a diffusion model: load it with from_guided_diffusion"):
        ddpm_fast.classifier_from_guided_diffusion({}, preset="lsun_cat")
    with pytest.raises(ValueError, match="no preset 'lsun_dog'; the presets are 64x64_diffusion, "):
        ddpm_fast.from_guided_diffusion({}, preset="lsun_dog")


@pytest.mark.parametrize("flags, message", [
    (dict(image_size=64, num_channels=64, num_res_blocks=1, num_channel=3), "has no flag 'num_channel'"),
    (dict(num_channels=64, num_res_blocks=1), "needs image_size"),
    (dict(image_size=64, num_channels=64, num_res_blocks=1, class_cond="True"), "class_cond must be a bool"),
    (dict(image_size=64, num_channels=64, num_res_blocks=1, num_heads=True), "num_heads must be a int"),
    (dict(image_size=64, num_channels=64, num_res_blocks=1, attention_resolutions="32;16"),
     "comma-separated positive ints such as '32,16,8', got '32;16'"),
    (dict(image_size=48, num_channels=64, num_res_blocks=1), "image_size 48 has no default channel_mult"),
    (dict(image_size=64, num_channels=64, num_res_blocks=1, channel_mult="1,x"), "channel_mult must be comma"),
    (dict(image_size=64, num_channels=48, num_res_blocks=1), "divisible by the 32 GroupNorm groups"),
    (dict(image_size=64, num_channels=64, num_res_blocks=1, num_head_channels=48), "num_head_channels must be -1"),
    (dict(image_size=64, num_channels=64, num_res_blocks=1, num_heads=3), "must divide the width of every attention"),
    (dict(image_size=64, num_channels=64, num_res_blocks=1, dropout=1.0), r"dropout must lie in \[0, 1\)"),
])
def test_bad_model_flags_are_refused_by_name(flags, message):
    with pytest.raises(ValueError, match=message):
        ddpm_fast.from_guided_diffusion({}, **flags)


def test_bad_classifier_flags_are_refused_by_name():
    with pytest.raises(ValueError, match="classifier_pool must be 'attention'"):
        guided_classifier_config(classifier_pool="adaptive")
    with pytest.raises(ValueError, match="has no flag 'num_channels'"):
        ddpm_fast.classifier_from_guided_diffusion({}, num_channels=3)


def test_flag_text_is_read_as_their_scripts_read_it():
    text = PRESETS["64x64_diffusion"].flags
    assert text.startswith("--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1")
    flags = parse_flags(text, adm_checkpoints.GUIDED_MODEL_FLAGS, adm_checkpoints.GUIDED_DIFFUSION_FLAGS)
    assert flags["num_channels"] == 192 and flags["class_cond"] is True and flags["noise_schedule"] == "cosine"
    assert parse_flags("--learn_sigma yes --use_fp16 0", adm_checkpoints.GUIDED_MODEL_FLAGS) == dict(
        learn_sigma=True, use_fp16=False)
    with pytest.raises(ValueError, match="--class_cond expects a boolean"):
        parse_flags("--class_cond maybe", adm_checkpoints.GUIDED_MODEL_FLAGS)
    with pytest.raises(ValueError, match="--num_channels expects an int, got '1.5'"):
        parse_flags("--num_channels 1.5", adm_checkpoints.GUIDED_MODEL_FLAGS)
    with pytest.raises(ValueError, match="unknown flag --batch_size"):
        parse_flags("--batch_size 4", adm_checkpoints.GUIDED_MODEL_FLAGS)
    with pytest.raises(ValueError, match="'--name value' pairs"):
        parse_flags("--class_cond", adm_checkpoints.GUIDED_MODEL_FLAGS)


def test_presets_diffusion_flags():
    assert PRESETS["cifar10_uncond_50M_500K"].diffusion()["rescale_timesteps"] is True  # improved's default
    assert PRESETS["imagenet64_cond_270M_250K"].diffusion()["rescale_timesteps"] is False
    assert PRESETS["64x64_diffusion"].diffusion()["noise_schedule"] == "cosine"
    assert PRESETS["lsun_horse_nodropout"].config()["dropout"] == 0.0


# the fixture gd_ss_legacy_headch_three_levels as guided-diffusion's create_model flags
THREE_LEVELS = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,1,1", attention_resolutions="8,4",
                    dropout=0.1, num_head_channels=32, use_scale_shift_norm=True, learn_sigma=True)
THREE_LEVELS_TEXT = " ".join(f"--{k} {v}" for k, v in THREE_LEVELS.items())


def test_pt_loads_weights_only_in_eval_mode(tmp_path, monkeypatch):
    _, inputs, expected, state = load_fixture("gd_ss_legacy_headch_three_levels")
    torch.save(state, tmp_path / "model.pt")
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    model = ddpm_fast.from_guided_diffusion(tmp_path / "model.pt", **THREE_LEVELS)
    assert calls == [dict(map_location="cpu", weights_only=True)]
    assert not model.training and model.config == guided_model_config(**THREE_LEVELS) | dict(
        attention_resolutions=[2, 4], channel_mult=[1, 1, 1], num_heads_upsample=1,  # -1: num_heads, resolved
        timestep_scale=1.0)  # guided-diffusion never rescales t
    with torch.no_grad():
        assert relative_error(model(*inputs), expected) < 1e-5
    assert not ddpm_fast.from_guided_diffusion(state, **THREE_LEVELS).training


class Payload:
    """Anything but tensors: unpickling it would run code."""


def test_pt_holding_code_is_refused(tmp_path):
    torch.save({"weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="holds pickled code or objects other than tensors, refused and never run"):
        ddpm_fast.from_guided_diffusion(tmp_path / "evil.pt", **THREE_LEVELS)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict of tensors"):
        ddpm_fast.from_guided_diffusion(tmp_path / "list.pt", **THREE_LEVELS)


def test_improved_diffusion_flags():
    config = adm_checkpoints.improved_model_config(image_size=32, num_channels=128, num_res_blocks=3, learn_sigma=True,
                                                   dropout=0.3)
    assert config == PRESETS["cifar10_uncond_50M_500K"].config()
    assert config["channel_mult"] == (1, 2, 2, 2) and config["attention_resolutions"] == (2, 4)
    assert config["num_heads"] == 4 and config["use_scale_shift_norm"] and not config["use_new_attention_order"]
    _, inputs, expected, state = load_fixture("id_plain_uncond")
    with pytest.raises(ValueError, match="first difference"):  # its image size has no improved-diffusion default
        ddpm_fast.from_improved_diffusion(state, preset="cifar10_uncond_50M_500K")


def test_classifier_loader(tmp_path):
    flags = dict(image_size=64, classifier_width=64, classifier_depth=1)
    torch.manual_seed(0)
    reference = ADMClassifier(**guided_classifier_config(**flags)).eval()
    torch.save(reference.state_dict(), tmp_path / "classifier.pt")
    model = ddpm_fast.classifier_from_guided_diffusion(tmp_path / "classifier.pt", **flags)
    assert not model.training and model.config["out_channels"] == 1000 and model.config["num_head_channels"] == 64
    x, t = torch.randn(1, 3, 64, 64), torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(model(x, t), reference(x, t))


def test_convert_round_trip(tmp_path, capsys):
    _, inputs, expected, state = load_fixture("gd_ss_legacy_headch_three_levels")
    torch.save(state, tmp_path / "model.pt")
    out = tmp_path / "model.safetensors"
    assert main(["convert", str(tmp_path / "model.pt"), str(out), "--flags", THREE_LEVELS_TEXT]) == 0
    assert f"wrote {sum(v.numel() for v in state.values()):,} parameters of ADMUNet(" in capsys.readouterr().out
    for model in (ADMUNet.from_pretrained(out), ddpm_fast.from_guided_diffusion(out),
                  ddpm_fast.from_guided_diffusion(out, **THREE_LEVELS)):
        assert not model.training
        with torch.no_grad():
            assert relative_error(model(*inputs), expected) < 1e-5
    assert main(["convert", str(tmp_path / "model.pt"), str(out), "--flags", THREE_LEVELS_TEXT]) == 0
    assert "kept the identical" in capsys.readouterr().out
    with pytest.raises(ValueError, match="holds ADMUNet.*not the ADMUNet.*the flags describe"):
        ddpm_fast.from_guided_diffusion(out, **(THREE_LEVELS | dict(dropout=0.0)))


def test_convert_errors_are_one_line(tmp_path, capsys):
    _, _, _, state = load_fixture("gd_ss_legacy_headch_three_levels")
    torch.save(state, tmp_path / "model.pt")
    out = str(tmp_path / "out.safetensors")
    assert main(["convert", str(tmp_path / "model.pt"), out, "--preset", "64x64_diffusion"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "first difference: key 'time_embed.0.weight' expected (768, 192), got (128, 32)" in err
    assert main(["convert", str(tmp_path / "model.pt"), out, "--flags", THREE_LEVELS_TEXT, "--config", "small"]) == 2
    assert "give one or the other" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "model.pt"), out, "--flags", "--batch_size 4"]) == 2
    assert "unknown flag --batch_size" in capsys.readouterr().err
    assert not Path(out).exists()


def test_inputs_are_checked():
    model, (x, t, y), _, _ = load_fixture("gd_updown_new_heads_cond")
    with pytest.raises(ValueError, match=r"labels in \[0, 4\], got \[0, 5\]"):  # no "no label" row
        model(x, t, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(TypeError, match="t must hold real timesteps"):
        model(x, torch.tensor([True, False]), y)
    with pytest.raises(ValueError, match="H and W must be divisible by 2"):
        model(x[:, :, :7], t, y)
    with torch.no_grad():  # fractional timesteps (improved-diffusion's rescaled ones) are taken
        assert model(x, t.double() + 0.5, y).shape == (2, 6, 8, 8)
