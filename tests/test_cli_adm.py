"""ddpm-fast sample on guided-diffusion / improved-diffusion checkpoints (--preset, --classifier,
--classifier-preset, --respacing; DESIGN §2.7): the job draws exactly what Sampler draws with the
preset's network and process. The published networks are hundreds of millions of parameters, so
tiny presets of the same form stand in for them."""
import numpy as np
import pytest
import torch

from ddpm_fast import Sampler, adm_checkpoints
from ddpm_fast.adm_checkpoints import Preset, classifier_from_guided_diffusion, from_guided_diffusion, sampling
from ddpm_fast.cli import main
from ddpm_fast.cli.images import to_uint8

MODEL = ("--image_size 64 --num_channels 32 --num_res_blocks 1 --channel_mult 1,1,1 --attention_resolutions 16 "
         "--num_head_channels 16 --learn_sigma True --class_cond True --use_scale_shift_norm True --resblock_updown "
         "True --use_new_attention_order True --diffusion_steps 200 --noise_schedule cosine --rescale_timesteps True "
         "--timestep_respacing 4")
CLASSIFIER = "--image_size 64 --classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 8"


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """.pt state dicts of random networks under the tiny presets "tiny" and "tiny_classifier"."""
    monkeypatch.setitem(adm_checkpoints.PRESETS, "tiny", Preset("guided", MODEL, ""))
    monkeypatch.setitem(adm_checkpoints.PRESETS, "tiny_classifier", Preset("classifier", CLASSIFIER, ""))
    torch.manual_seed(0)
    paths = {}
    for name, network in (("tiny", adm_checkpoints.ADMUNet(**Preset("guided", MODEL, "").config())),
                          ("tiny_classifier", adm_checkpoints.ADMClassifier(**Preset("classifier", CLASSIFIER,
                                                                                     "").config()))):
        with torch.no_grad():
            for p in network.parameters():  # their zero-initialised output layers would give ε ≡ 0
                p.add_(0.05 * torch.randn_like(p))
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(network.state_dict(), paths[name])
    return paths


def drawn(path) -> np.ndarray:
    return np.load(path)["arr_0"]


def expected(model_pt, steps=None, classifier_pt=None, scale=None, labels=(5, 5)) -> np.ndarray:
    schedule, process = sampling(adm_checkpoints.preset("tiny").diffusion())
    process["steps"] = steps or process["steps"]
    classifier = classifier_from_guided_diffusion(classifier_pt, preset="tiny_classifier") if classifier_pt else None
    sampler = Sampler(from_guided_diffusion(model_pt, preset="tiny"), schedule, **process, classifier=classifier,
                      classifier_scale=scale)
    return to_uint8(sampler.sample(len(labels), seed=3, labels=list(labels)))


def test_a_preset_samples_as_the_sampler_does(checkpoints, tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", "--model", str(checkpoints["tiny"]), "--preset", "tiny", "--label", "5", "--num", "2",
                 "--seed", "3", "--out", str(out), "--quiet"]) == 0
    assert "4 steps" in capsys.readouterr().out  # the preset's timestep_respacing
    np.testing.assert_array_equal(drawn(out), expected(checkpoints["tiny"]))
    assert main(["sample", "--model", str(checkpoints["tiny"]), "--preset", "tiny", "--label", "5", "--num", "2",
                 "--seed", "3", "--respacing", "ddim2", "--out", str(tmp_path / "r.npz"), "--quiet"]) == 0
    np.testing.assert_array_equal(drawn(tmp_path / "r.npz"), expected(checkpoints["tiny"], steps="ddim2"))


def test_classifier_guidance_with_a_preset(checkpoints, tmp_path):
    out = tmp_path / "g.npz"
    assert main(["sample", "--model", str(checkpoints["tiny"]), "--preset", "tiny", "--classifier",
                 str(checkpoints["tiny_classifier"]), "--classifier-preset", "tiny_classifier", "--classifier-scale",
                 "4", "--label", "7", "--num", "2", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    guided = expected(checkpoints["tiny"], classifier_pt=checkpoints["tiny_classifier"], scale=4.0, labels=(7, 7))
    np.testing.assert_array_equal(drawn(out), guided)
    assert not np.array_equal(guided, expected(checkpoints["tiny"], labels=(7, 7)))


@pytest.mark.parametrize("extra,message", [
    (["--respacing", "ddim2", "--steps", "2"], "give one"),
    (["--timesteps", "100"], "sets the schedule"),
    (["--preset", "tiny_classifier"], "invalid choice"),
    (["--classifier-preset", "tiny_classifier"], "pass --classifier too"),
    (["--classifier", "{classifier}"], "first difference"),  # the default, 64x64_classifier's flags, do not fit it
    (["--respacing", "ddim199"], "respacing"),
])
def test_preset_errors_are_one_line(checkpoints, tmp_path, capsys, extra, message):
    args = ["sample", "--model", str(checkpoints["tiny"]), "--label", "1", "--num", "1", "--out",
            str(tmp_path / "e.npz"), "--quiet"]
    extra = [str(checkpoints["tiny_classifier"]) if a == "{classifier}" else a for a in extra]
    args += extra if "--preset" in extra else ["--preset", "tiny"] + extra
    try:
        status = main(args)
    except SystemExit as exit:  # argparse's own checks
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_respacing_needs_a_preset(tmp_path, capsys):
    assert main(["sample", "--model", "digits", "--respacing", "10", "--out", str(tmp_path / "d.npz"), "--quiet"]) == 2
    assert "pass --preset" in capsys.readouterr().err
