"""Nothing lost, nothing silently wrong (DESIGN §9, files): atomic writes that never follow a planted link,
outputs never replaced unasked, the identical rerun a no-op, manifests that record their output's
sha256, checksummed model files, non-finite models refused by default, training flags checked."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_fast as df
from ddpm_fast import _atomic
from ddpm_fast.checkpoints import UnverifiedFileWarning
from ddpm_fast.cli import main, shards
from ddpm_fast.cli.train import CHECKPOINT, EMA_WEIGHTS, TrainConfig, train

from test_train import _tiny_model as _tiny

SAMPLE = ["sample", "--model", "random-small", "--timesteps", "5", "--num", "3", "--quiet"]


def _data():
    return torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


# -- finding 1: temporary files never follow a planted link -----------------------------------

@pytest.mark.parametrize("out", ["o.npz", "o.png"])
def test_a_link_planted_at_the_old_temporary_name_is_never_followed(tmp_path, out):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    work = tmp_path / "work"
    work.mkdir()
    # the names the old writer used for the output and its manifest: .NAME.<pid>.tmp
    for name in (out, f"{out}.manifest.json"):
        (work / f".{name}.{os.getpid()}.tmp").symlink_to(victim)
    assert main([*SAMPLE, "--out", str(work / out)]) == 0
    assert victim.read_text() == "precious"
    manifest = json.loads(shards.finished_manifest(work / out).read_text())
    assert manifest["complete"] and manifest["output_sha256"] == _atomic.file_sha256(work / out)


def test_a_colliding_temporary_name_is_refused_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    monkeypatch.setattr(_atomic.secrets, "token_hex", lambda n: "guessed")
    (tmp_path / ".m.safetensors.guessed.tmp").symlink_to(victim)
    with pytest.raises(OSError, match="cannot create a file"):
        _tiny().save_pretrained(tmp_path / "m.safetensors")
    assert victim.read_text() == "precious" and not (tmp_path / "m.safetensors").exists()


def test_writers_are_handed_an_open_file_and_a_full_disk_names_the_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(_atomic.os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*m\.safetensors'"):
        _tiny().save_pretrained(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


# -- findings 2, 3, 6: nothing replaced unasked; the identical rerun is a no-op ---------------

def test_the_identical_rerun_is_a_no_op_and_another_job_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main([*SAMPLE, "--out", str(out)]) == 0
    first, manifest = out.read_bytes(), json.loads(shards.finished_manifest(out).read_text())
    assert manifest["output_sha256"] == _atomic.file_sha256(out)
    capsys.readouterr()
    assert main([*SAMPLE, "--out", str(out)]) == 0  # `make sample` twice
    captured = capsys.readouterr()
    assert "already holds these 3 samples" in captured.err and "nothing to do" in captured.err
    assert "wrote" not in captured.out
    assert main([*SAMPLE, "--out", str(out), "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished job with other settings" in err and "seed 0 → 1" in err and "--overwrite" in err
    assert out.read_bytes() == first
    assert main([*SAMPLE, "--out", str(out), "--seed", "1", "--overwrite"]) == 0
    assert out.read_bytes() != first
    assert json.loads(shards.finished_manifest(out).read_text())["settings"]["seed"] == 1


def test_an_output_its_manifest_does_not_record_is_not_replaced(tmp_path, capsys):
    out = tmp_path / "s.npz"
    out.write_bytes(b"someone else's file")
    assert main([*SAMPLE, "--out", str(out)]) == 2
    assert "is not the finished output of a job" in capsys.readouterr().err
    assert out.read_bytes() == b"someone else's file"
    assert main([*SAMPLE, "--out", str(out), "--overwrite"]) == 0
    out.write_bytes(out.read_bytes()[:-1] + b"x")  # changed after the job: its manifest no longer matches
    assert main([*SAMPLE, "--out", str(out), "--resume"]) == 2
    assert "is not the finished output" in capsys.readouterr().err


def test_trajectory_onto_the_output_is_refused_and_an_existing_one_kept(tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main([*SAMPLE, "--out", str(out), "--trajectory", str(out)]) == 2
    assert "--trajectory and --out are both" in capsys.readouterr().err and not out.exists()
    trajectory = tmp_path / "t.png"
    assert main([*SAMPLE, "--out", str(out), "--trajectory", str(trajectory)]) == 0
    drawn = trajectory.read_bytes()
    assert main([*SAMPLE, "--out", str(out), "--trajectory", str(trajectory)]) == 0
    assert "kept the identical" in capsys.readouterr().out and trajectory.read_bytes() == drawn
    assert main([*SAMPLE, "--out", str(tmp_path / "other.png"), "--seed", "4", "--trajectory", str(trajectory)]) == 2
    assert "exists with other content: pass --overwrite" in capsys.readouterr().err
    assert trajectory.read_bytes() == drawn


def test_a_folder_output_reused_with_fewer_samples_keeps_no_stale_pngs(tmp_path, capsys):
    folder = tmp_path / "pngs"
    assert main([*SAMPLE, "--num", "5", "--out", f"{folder}/"]) == 0
    assert main([*SAMPLE, "--num", "2", "--out", f"{folder}/"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*SAMPLE, "--num", "2", "--out", f"{folder}/", "--overwrite"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000001.png"]
    manifest = json.loads(shards.finished_manifest(f"{folder}/").read_text())
    assert manifest["settings"]["num_samples"] == 2 and manifest["output_sha256"]
    assert main([*SAMPLE, "--num", "2", "--out", f"{folder}/"]) == 0  # the same job again: nothing to do
    assert "nothing to do" in capsys.readouterr().err


def test_an_empty_output_name_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*SAMPLE, "--out", ""]) == 2
    assert "empty" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_training_never_replaces_a_run_unasked(tmp_path, capsys):
    config = dict(batch_size=4, warmup=1, timesteps=20, checkpoint_every=10)
    train(_tiny(), _data(), TrainConfig(steps=3, **config), tmp_path, progress=False)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match=r"already holds a training run \(checkpoint.safetensors at step 3.*--overwrite"):
        train(_tiny(), _data(), TrainConfig(steps=2, **config), tmp_path, progress=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    # the same run, finished: a no-op that says so
    train(_tiny(), _data(), TrainConfig(steps=3, **config), tmp_path, progress=False)
    assert "already at step 3" in capsys.readouterr().err and (tmp_path / CHECKPOINT).read_bytes() == before
    with pytest.raises(ValueError, match="at step 3, past --steps 2"):
        train(_tiny(), _data(), TrainConfig(steps=2, **config), tmp_path, resume=True, progress=False)
    other_data = _data().flip(0)
    with pytest.raises(ValueError, match="other settings.*'data'"):
        train(_tiny(), other_data, TrainConfig(steps=5, **config), tmp_path, resume=True, progress=False)
    train(_tiny(), _data(), TrainConfig(steps=2, **config), tmp_path, overwrite=True, progress=False)
    assert (tmp_path / CHECKPOINT).read_bytes() != before


@pytest.mark.parametrize("change,match", [
    (dict(grad_clip=-1.0), "grad_clip must be a number > 0"), (dict(grad_clip=float("nan")), "grad_clip"),
    (dict(ema_decay=5.0), r"ema_decay must be a number in \[0, 1\]"), (dict(steps=0), "steps must be a positive int"),
    (dict(steps=-5), "steps must be a positive int"), (dict(checkpoint_every=0), "checkpoint_every must be"),
    (dict(lr=0.0), "lr must be"), (dict(lr=float("inf")), "lr must be"), (dict(warmup=-1), "warmup must be"),
    (dict(seed=2 ** 64), "seed must be"), (dict(batch_size=0), "batch_size must be"),
])
def test_training_settings_are_checked(change, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**change)


# -- finding 4: a non-finite model fails by default -------------------------------------------

def _nan_model(path):
    model = df.UNet.small()
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    model.save_pretrained(path)
    return model


def test_a_nan_model_fails_without_check_finite(tmp_path, capsys):
    _nan_model(tmp_path / "nan.safetensors")
    args = ["sample", "--model", str(tmp_path / "nan.safetensors"), "--num", "2", "--timesteps", "5", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 of 2 samples hold NaN or infinite values" in err[0] and "--check-finite" in err[0]
    assert not (tmp_path / "s.png").exists() and not shards.work_folder(tmp_path / "s.png").exists()


def test_the_end_of_run_check_reads_the_device_once(monkeypatch):
    def infinite(x, t):
        return torch.full_like(x, float("inf"))
    sampler = df.Sampler(infinite, df.NoiseSchedule.linear(5), backend="cpu", sample_shape=(1, 4, 4))
    reads = []
    item = torch.Tensor.item

    def counted(self):
        reads.append(1)
        return item(self)
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: int(counted(self)))
    with pytest.raises(FloatingPointError, match="finite_check_every=1"):
        sampler.sample(4, batch_size=2)
    assert len(reads) == 1
    assert df.Sampler(df.UNet.small(), df.NoiseSchedule.linear(5), check_finite=False).sample(1).isfinite().all()


# -- finding 7: checksummed model files ------------------------------------------------------

def _flip_a_tensor_byte(path):
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 100] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_model_or_a_checkpoint_are_refused(tmp_path, capsys):
    _tiny().save_pretrained(tmp_path / "m.safetensors")
    _flip_a_tensor_byte(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="is corrupt: its tensor data do not match the sha256"):
        df.UNet.from_pretrained(tmp_path / "m.safetensors")
    config = TrainConfig(steps=2, batch_size=4, warmup=1, timesteps=20)
    train(_tiny(), _data(), config, tmp_path / "run", progress=False)
    _flip_a_tensor_byte(tmp_path / "run" / CHECKPOINT)
    with pytest.raises(ValueError, match="is corrupt"):
        train(_tiny(), _data(), TrainConfig(**{**config.__dict__, "steps": 4}), tmp_path / "run", resume=True,
              progress=False)


@pytest.mark.parametrize("checksums,warning,note", [
    ((), "records no sha256", "loaded unverified"),  # written before either checksum
    ((_atomic.CHECKSUM_KEY,), "its tensors were verified, its configuration was not", "configuration was not"),
])
def test_files_without_a_checksum_load_with_a_notice(tmp_path, capsys, checksums, warning, note):
    from safetensors.torch import save_file
    model = _tiny()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    recorded = {_atomic.CHECKSUM_KEY: _atomic.tensors_sha256(tensors)}
    save_file(tensors, str(tmp_path / "old.safetensors"),
              metadata={"ddpm_fast_config": json.dumps(model.config), **{k: recorded[k] for k in checksums}})
    with pytest.warns(UnverifiedFileWarning, match=warning):
        df.UNet.from_pretrained(tmp_path / "old.safetensors")
    assert main(["sample", "--model", str(tmp_path / "old.safetensors"), "--num", "1", "--timesteps", "3", "--quiet",
                 "--out", str(tmp_path / "s.png")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: ") and note in err[0]


def test_the_bundled_weights_carry_their_checksum():
    from safetensors import safe_open
    with safe_open("ddpm_fast/weights/digits.safetensors", framework="pt") as f:
        recorded = f.metadata()[_atomic.CHECKSUM_KEY]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = df.UNet.from_pretrained("digits")
    # the state-dict checksum of the weights as trained (before the file carried one)
    assert recorded == shards.state_dict_sha256(model) == \
        "d253f20118ee3fce21e17783312660514886bbeb33f691d8b6b1eb8c557eaae4"


# -- leftovers and concurrency ---------------------------------------------------------------

def test_a_second_job_on_the_same_output_is_refused(tmp_path, capsys):
    out = tmp_path / "s.npz"
    with _atomic.exclusive(out, "the output"):
        assert main([*SAMPLE, "--out", str(out)]) == 2
        assert "is being written by another process" in capsys.readouterr().err
    assert main([*SAMPLE, "--out", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.npz.manifest.json"]


def test_a_failed_launch_leaves_nothing_that_blocks_the_next(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.npz"

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 PiB")
    with monkeypatch.context() as m:
        m.setattr(df.Sampler, "sample", out_of_memory)
        assert main([*SAMPLE, "--out", str(out)]) == 2
    assert "out of memory" in capsys.readouterr().err
    assert not shards.work_folder(out).exists()
    assert main([*SAMPLE, "--out", str(out), "--steps", "2", "--method", "ddim"]) == 0


def test_a_work_folder_without_shards_and_a_killed_merges_temporary_are_cleaned_up(tmp_path, capsys):
    out = tmp_path / "s.npz"
    shards.work_folder(out).mkdir()
    (shards.work_folder(out) / "manifest.json").write_text(json.dumps({"format": shards.FORMAT}))  # a launch killed
    # before its first shard (its manifest is renamed into place with the folder)
    (tmp_path / ".s.npz.0123456789abcdef.tmp").write_bytes(b"half an output")  # a merge killed before its rename
    assert main([*SAMPLE, "--out", str(out)]) == 0
    assert "holding no finished shard" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz", "s.npz.manifest.json"]
    assert np.load(out)["arr_0"].shape == (3, 16, 16, 1)


def test_pictures_are_written_through_the_helper(tmp_path):
    from ddpm_fast.cli.images import write_png
    image = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    write_png(image, tmp_path / "a.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), image[..., 0])
    write_png(image, tmp_path / "a.png", overwrite=False)  # the same picture: kept
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_png(image + 1, tmp_path / "a.png", overwrite=False)


# -- the smaller findings ----------------------------------------------------------------------

def test_half_precision_on_the_cpu_says_it_is_slow(tmp_path, capsys):
    assert main([*SAMPLE, "--dtype", "bfloat16", "--out", str(tmp_path / "s.png")]) == 0
    assert "--dtype bfloat16 on the CPU is emulated" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(0, 8, 8), (1, 8), (1, -8, 8), (1, 8.0, 8)])
def test_an_empty_or_malformed_sample_shape_is_refused(shape):
    with pytest.raises(ValueError, match="sample_shape must be three positive ints"):
        df.Sampler(lambda x, t: x, df.NoiseSchedule.linear(5), sample_shape=shape)


@pytest.mark.parametrize("t,error,match", [
    (torch.tensor([1.0, 2.0]), TypeError, "integer timesteps"), (torch.tensor([True, False]), TypeError, "integer"),
    (torch.tensor([3, -1]), ValueError, "timesteps >= 0, got -1"),
])
def test_the_unet_refuses_float_bool_and_negative_t(t, error, match):
    with pytest.raises(error, match=match):
        df.UNet.small()(torch.zeros(2, 1, 16, 16), t)


def test_sampling_restores_each_modules_own_mode():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = df.UNet.small()

        def forward(self, x, t):
            assert not self.training and not self.inner.training
            return self.inner(x, t)
    model = Wrapper().train()
    model.inner.eval()
    df.Sampler(model, df.NoiseSchedule.linear(3), sample_shape=(1, 16, 16)).sample(1)
    assert model.training and not model.inner.training
    assert not any(m.training for m in model.inner.modules())


def test_an_output_name_with_glob_characters_leaves_other_outputs_temporaries(tmp_path):
    others = [tmp_path / ".o1.png.0123456789abcdef.tmp", tmp_path / ".oo.png.0123456789abcdef.tmp"]
    for other in others:
        other.write_bytes(b"another job's temporary")
    for name in ("o[1].png", "o?.png", "*.png"):
        assert _atomic.stale_temporaries(tmp_path / name) == []
    assert main([*SAMPLE, "--out", str(tmp_path / "o[1].png")]) == 0
    assert main([*SAMPLE, "--out", str(tmp_path / "*.png")]) == 0
    assert all(other.read_bytes() == b"another job's temporary" for other in others)
    assert _atomic.stale_temporaries(tmp_path / "o1.png") == [others[0]]


def test_a_model_on_the_meta_device_an_integer_output_and_a_complex_schedule_are_refused():
    with torch.device("meta"):
        ghost = df.UNet.small()
    with pytest.raises(ValueError, match="has parameters on the meta device, which hold no values"):
        df.Sampler(ghost, df.NoiseSchedule.linear(5))
    counts = df.Sampler(lambda x, t: (100 * x).long(), df.NoiseSchedule.linear(5), sample_shape=(1, 4, 4))
    with pytest.raises(TypeError, match=r"the model must return a floating-point tensor \(its prediction\), got "
                                        r"torch.int64"):
        counts.sample(1)
    with pytest.raises(TypeError, match="betas must be real numbers, got torch.complex128"):
        df.NoiseSchedule(torch.linspace(1e-4, 0.02, 10, dtype=torch.complex128))
