"""Training (Algorithm 1), its checkpoints and resume, the data loaders, and the converter."""
import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_fast as df
from ddpm_fast.cli import main
from ddpm_fast.cli.data import digits_dataset, image_folder_dataset
from ddpm_fast.classifier import NoisyClassifier
from ddpm_fast.cli.train import CHECKPOINT, EMA_WEIGHTS, TrainConfig, train

TINY = dict(ch=8, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1, in_channels=1,
            resolution=8, num_groups=4)


def _tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return df.UNet(**TINY, **overrides)


def _tiny_classifier():
    torch.manual_seed(0)
    return NoisyClassifier(3, **{k: v for k, v in TINY.items() if k != "out_ch"})


def test_digits_dataset():
    sklearn = pytest.importorskip("sklearn")  # noqa: F841
    data = digits_dataset(16)
    assert data.shape == (1797, 1, 16, 16) and data.dtype == torch.float32
    assert data.min() == -1 and data.max() == 1


def test_image_folder_dataset(tmp_path):
    for i, size in enumerate([(20, 10), (8, 8), (9, 15)]):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    data = image_folder_dataset(tmp_path, 8)
    assert data.shape == (3, 3, 8, 8)
    assert torch.allclose(data[:, 0, 0, 0], torch.tensor([0.0, 40.0, 80.0]) / 127.5 - 1, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="no images"):
        image_folder_dataset(tmp_path / "empty", 8)


def _loss(model, data, timesteps, seed=1):
    """L_simple on a fixed batch, t and ε (eq. 14), in eval mode."""
    from ddpm_fast.reference.diffusion import training_losses
    g = torch.Generator().manual_seed(seed)
    t, noise = torch.randint(0, timesteps, (data.shape[0],), generator=g), torch.randn(data.shape, generator=g)
    with torch.no_grad():
        return training_losses(model.eval(), df.NoiseSchedule.linear(timesteps), data, t, noise).mean().item()


def test_training_lowers_the_loss_and_writes_checkpoints(tmp_path):
    data = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    config = TrainConfig(steps=40, batch_size=8, lr=2e-3, warmup=1, checkpoint_every=20, timesteps=50)
    model = _tiny_model()
    before = _loss(model, data, 50)
    ema = train(model, data, config, tmp_path, progress=False)
    assert _loss(model, data, 50) < 0.9 * before  # the trained (non-EMA) weights
    assert (tmp_path / CHECKPOINT).is_file() and (tmp_path / EMA_WEIGHTS).is_file()
    loaded = df.UNet.from_pretrained(tmp_path / EMA_WEIGHTS)
    for a, b in zip(loaded.state_dict().values(), ema.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("make, labelled", [
    (_tiny_model, False),
    (lambda: _tiny_model(num_classes=3), True),  # classifier-free guidance's label dropout draws from the run's RNG
    (_tiny_classifier, True),
], ids=["unconditional", "class-conditional", "noisy-classifier"])
def test_resume_continues_bit_for_bit(tmp_path, make, labelled):
    data = torch.rand(32, 1, 8, 8) * 2 - 1
    labels = torch.randint(0, 3, (32,)) if labelled else None
    config = dict(batch_size=8, warmup=2, checkpoint_every=3, timesteps=50, seed=5, p_uncond=0.5)

    def run(steps, out, resume=False, **changed):
        return train(make(), data, TrainConfig(steps=steps, **{**config, **changed}), tmp_path / out, resume=resume,
                     progress=False, labels=labels)
    straight = run(6, "a")
    run(3, "b")
    torch.manual_seed(1234)  # the resumed run must not depend on the global state it starts with
    resumed = run(6, "b", resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="other settings"):
        run(6, "b", resume=True, lr=1e-3)
    if labelled:
        with pytest.raises(ValueError, match="other settings"):  # other labels are other data
            train(make(), data, TrainConfig(steps=6, **config), tmp_path / "b", resume=True, progress=False,
                  labels=labels.flip(0))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(make(), data, TrainConfig(steps=6, **config), tmp_path / "c", resume=True, progress=False, labels=labels)


def test_cli_train_then_sample_every_output(tmp_path, capsys):
    pytest.importorskip("sklearn")
    run = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--out", str(run), "--steps", "2", "--batch-size", "4",
                 "--resolution", "8", "--ch", "8", "--ch-mult", "1,2", "--attn-resolutions", "4",
                 "--num-groups", "4", "--quiet"]) == 0
    model = str(run / EMA_WEIGHTS)
    common = ["--model", model, "--num", "3", "--method", "ddim", "--steps", "4", "--timesteps", "1000", "--quiet"]
    assert main(["sample", *common, "--out", str(tmp_path / "s.npz"), "--trajectory", str(tmp_path / "t.png")]) == 0
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (3, 8, 8, 1) and arr.dtype == np.uint8
    # 4 frames (all steps) × 3 samples, 42 px wide, enlarged 13× to reach 512 px
    assert Image.open(tmp_path / "t.png").size == (13 * (4 * 10 + 2), 13 * (3 * 10 + 2))
    assert main(["sample", *common, "--out", str(tmp_path / "pngs") + "/"]) == 0
    names = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png"]
    # the same seed gives the same samples in every format
    pngs = np.stack([np.asarray(Image.open(tmp_path / "pngs" / name)) for name in names])
    assert pngs.dtype == np.uint8 and np.array_equal(pngs, arr[..., 0]) and arr.max() > arr.min()
    assert main(["sample", *common, "--out", str(tmp_path / "grid.png"), "--grid-width", "0"]) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert np.array_equal(grid[2:10, 2:10], arr[0, ..., 0]) and np.array_equal(grid[2:10, 12:20], arr[1, ..., 0])
    assert main(["sample", *common, "--out", str(tmp_path / "s.jpg")]) == 2
    assert "output must be a .png" in capsys.readouterr().err


def test_convert_state_dicts(tmp_path, capsys):
    model = _tiny_model(3)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    (tmp_path / "config.json").write_text(json.dumps(model.config))
    assert main(["convert", str(tmp_path / "bare.pt"), str(tmp_path / "m.safetensors"),
                 "--config", str(tmp_path / "config.json")]) == 0
    converted = df.UNet.from_pretrained(tmp_path / "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), model.state_dict().values()))
    assert main(["convert", str(tmp_path / "bare.pt"), str(tmp_path / "x.safetensors")]) == 2
    assert "pass config=" in capsys.readouterr().err
    torch.save({"config": model.config, "state_dict": model.state_dict()}, tmp_path / "full.pth")
    assert df.UNet.from_pretrained(tmp_path / "full.pth").config == model.config
    (tmp_path / "cut.pt").write_bytes((tmp_path / "bare.pt").read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable weights-only"):
        df.UNet.from_pretrained(tmp_path / "cut.pt", config=model.config)
    torch.save({"state_dict": model.state_dict(), "config": model.config, "code": Image.Image}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights-only"):
        df.UNet.from_pretrained(tmp_path / "evil.pt")
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("conv_out")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"missing keys \['conv_out.bias', 'conv_out.weight'\]"):
        df.UNet.from_pretrained(tmp_path / "partial.pt", config=model.config)


def test_weights_files_are_written_whole_and_readable_like_other_files(tmp_path):
    # safetensors alone creates 0600 files; ours follow the umask (0022 → 0644) and leave no .tmp
    model = _tiny_model()
    model.save_pretrained(tmp_path / "m.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert df.UNet.from_pretrained(tmp_path / "m.safetensors").config == model.config


def _run(tmp, steps, name, **kwargs):
    data = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    config = TrainConfig(**{**dict(steps=steps, batch_size=4, warmup=1, timesteps=20, checkpoint_every=2), **kwargs})
    return train(_tiny_model(), data, config, tmp / name, progress=False)


def test_a_run_killed_before_its_ema_file_is_mended_on_resume_or_rerun(tmp_path, monkeypatch, capsys):
    from ddpm_fast.checkpoints import pretrained_bytes
    expected = pretrained_bytes(_run(tmp_path, 4, "whole"))
    assert (tmp_path / "whole" / EMA_WEIGHTS).read_bytes() == expected
    save, calls = df.UNet.save_pretrained, []

    def killed_at_the_second(self, path, overwrite=True):
        calls.append(path)
        if len(calls) == 2:  # step 4's checkpoint is written, its model.safetensors not
            raise KeyboardInterrupt
        return save(self, path, overwrite)
    with monkeypatch.context() as m:
        m.setattr(df.UNet, "save_pretrained", killed_at_the_second)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, 4, "killed")
    run = tmp_path / "killed"
    assert (run / EMA_WEIGHTS).read_bytes() != expected  # step 2's EMA beside step 4's checkpoint
    # two identical runs write identical bytes (safetensors' metadata in a fixed order)
    assert (run / CHECKPOINT).read_bytes() == (tmp_path / "whole" / CHECKPOINT).read_bytes()
    capsys.readouterr()
    data = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    config = TrainConfig(steps=4, batch_size=4, warmup=1, timesteps=20, checkpoint_every=2)
    train(_tiny_model(), data, config, run, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "model.safetensors was not the EMA weights of checkpoint.safetensors at step 4" in err
    assert (run / EMA_WEIGHTS).read_bytes() == expected
    (run / EMA_WEIGHTS).unlink()  # a finished run rerun without its model file
    _run(tmp_path, 4, "killed")
    assert "model.safetensors was missing: written again" in capsys.readouterr().err
    assert (run / EMA_WEIGHTS).read_bytes() == expected
    _run(tmp_path, 4, "killed")  # all is well: nothing said, nothing written
    assert "written again" not in capsys.readouterr().err


def test_a_fifo_in_place_of_the_checkpoint_is_refused_by_name(tmp_path):
    (tmp_path / "run").mkdir()
    os.mkfifo(tmp_path / "run" / CHECKPOINT)
    with pytest.raises(ValueError, match="checkpoint.safetensors is a FIFO, not a regular file: refused"):
        _run(tmp_path, 2, "run")


def test_a_diverging_run_stops_at_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # Adam's first step moves each weight by about lr: 1e30 still finite, the next step's loss not
    with pytest.raises(FloatingPointError, match=r"training diverged at step 2: the loss is nan and [\d,]+ weights are "
                                                 r"not finite; .*checkpoint.safetensors keeps step 1, the last good one"):
        _run(tmp_path, 40, "run", lr=1e30, checkpoint_every=1)
    from ddpm_fast.checkpoints import read_safetensors
    tensors, metadata = read_safetensors(tmp_path / "run" / CHECKPOINT)
    assert all(t.isfinite().all() for t in tensors.values() if t.is_floating_point())
    assert df.UNet.from_pretrained(tmp_path / "run" / EMA_WEIGHTS).conv_out.weight.isfinite().all()
