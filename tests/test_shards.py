"""Sharded, resumable sampling jobs (ddpm_fast/cli/shards.py) in one process, with a model cheap
enough to run many jobs: the manifest, resume and its refusals, and the merge's checks.
tests/test_distributed.py runs the same jobs under torchrun and kills them."""
import json

import numpy as np
import pytest
import torch

import ddpm_fast as df
from ddpm_fast.cli import shards
from ddpm_fast.cli.images import to_uint8
from ddpm_fast.contract import NOISE_STREAM_VERSION


class Interrupted(Exception):
    pass


class Model:
    """ε_θ = 0.3·tanh(x), counting its calls; raises Interrupted at call `stop_at` (a killed job)."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, x, t):
        self.calls += 1
        if self.calls == self.stop_at:
            raise Interrupted
        return 0.3 * torch.tanh(x)


T, N, BATCH = 4, 10, 2  # 5 shards of 2 samples, 4 steps each: a shard is 4 calls


def _sampler(model=None, **kwargs):
    return df.Sampler(model or Model(), df.NoiseSchedule.linear(T, 0.1, 0.3), sample_shape=(1, 3, 3),
                      backend="cpu", **kwargs)


def _run(out, model=None, sampler_kwargs=None, **kwargs):
    kwargs = {"seed": 3, "micro_batch": BATCH, "model_sha256": "weights", **kwargs}
    return shards.sample_to_file(_sampler(model, **(sampler_kwargs or {})), out, kwargs.pop("num_samples", N),
                                 **kwargs)


def _interrupted(out, after_shards):
    with pytest.raises(Interrupted):
        _run(out, Model(stop_at=after_shards * T + 1))
    return shards.work_folder(out)


def test_output_holds_the_samples_and_the_manifest_the_settings(tmp_path):
    out = tmp_path / "s.npz"
    assert _run(out) == out
    expected = to_uint8(_sampler().sample(N, seed=3, batch_size=BATCH))
    assert np.array_equal(np.load(out)["arr_0"], expected)
    assert not shards.work_folder(out).exists()
    manifest = json.loads(shards.finished_manifest(out).read_text())
    assert manifest["complete"] and manifest["completed"] == [[0, N]]
    settings = manifest["settings"]
    assert (settings["seed"], settings["num_samples"], settings["micro_batch"], settings["shard_size"]) == (3, N, 2, 2)
    assert settings["noise_stream_version"] == NOISE_STREAM_VERSION and settings["backend"] == "cpu"
    assert (settings["method"], settings["steps"], settings["timesteps"], settings["clip_denoised"]) == ("ddpm", T, T,
                                                                                                        True)
    assert (settings["dtype"], settings["eta"], settings["model_sha256"]) == ("float32", 0.0, "weights")
    launch = manifest["launches"][0]
    assert (launch["world_size"], launch["threads"]) == (1, torch.get_num_threads())


def test_an_interrupted_job_resumes_to_the_same_bytes(tmp_path):
    _run(tmp_path / "whole.npz")
    folder = _interrupted(tmp_path / "s.npz", after_shards=2)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["manifest.json", "samples-0000000000-0000000002.npz", "samples-0000000002-0000000004.npz"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["completed"] == [[0, 4]] and not manifest["complete"]
    model = Model()
    _run(tmp_path / "s.npz", model, resume=True)
    assert model.calls == 3 * T  # only the three missing shards are drawn
    assert (tmp_path / "s.npz").read_bytes() == (tmp_path / "whole.npz").read_bytes()
    launches = json.loads(shards.finished_manifest(tmp_path / "s.npz").read_text())["launches"]
    assert len(launches) == 2


def test_an_unfinished_job_is_never_overwritten_without_resume(tmp_path):
    folder = _interrupted(tmp_path / "s.npz", after_shards=1)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ValueError, match=r"holds an unfinished job .* pass --resume"):
        _run(tmp_path / "s.npz")
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("change,message", [
    (dict(seed=4), "seed 3 → 4"), (dict(micro_batch=1), "micro_batch 2 → 1"),
    (dict(shard_size=4), "shard_size 2 → 4"), (dict(num_samples=12), "num_samples 10 → 12"),
    (dict(model_sha256="other"), "model_sha256 'weights' → 'other'"),
    (dict(sampler_kwargs=dict(clip_denoised=False)), "clip_denoised True → False"),
])
def test_resume_with_other_settings_is_refused(tmp_path, change, message):
    folder = _interrupted(tmp_path / "s.npz", after_shards=1)
    model = Model()
    with pytest.raises(ValueError, match="--resume refused: .* other settings") as error:
        _run(tmp_path / "s.npz", model, resume=True, **change)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert model.calls == 0 and (folder / "samples-0000000000-0000000002.npz").is_file()


def test_a_finished_job_resumes_to_nothing(tmp_path, capsys):
    out = tmp_path / "s.npz"
    _run(out)
    model = Model()
    assert _run(out, model, resume=True) == out and model.calls == 0
    assert "nothing to resume" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--resume refused: .*seed 3 → 9"):
        _run(out, resume=True, seed=9)


def test_a_shard_with_other_indices_is_refused(tmp_path):
    folder = _interrupted(tmp_path / "s.npz", after_shards=2)
    first, second = sorted(folder.glob("samples-*.npz"))
    second.write_bytes(first.read_bytes())  # samples 0, 1 again under the name of 2, 3: duplicates and a gap
    with pytest.raises(ValueError, match=r"must hold the samples 2 \.\. 3, holds indices \[0, 1\]"):
        _run(tmp_path / "s.npz", resume=True)


def test_a_truncated_shard_is_refused(tmp_path):
    folder = _interrupted(tmp_path / "s.npz", after_shards=1)
    shard = next(folder.glob("samples-*.npz"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match="is unreadable .*delete it and resume"):
        _run(tmp_path / "s.npz", resume=True)


def test_a_fifo_in_place_of_a_shard_is_refused_without_blocking(tmp_path):
    import os
    folder = _interrupted(tmp_path / "s.npz", after_shards=1)
    shard = next(folder.glob("samples-*.npz"))
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(ValueError, match=f"{shard.name} is a FIFO, not a regular file: refused"):
        _run(tmp_path / "s.npz", resume=True)


def test_the_merge_refuses_a_gap(tmp_path, monkeypatch):
    draw = shards._Job.draw

    def lose_one(self, sampler, k, *rest):  # a shard that never reaches the disk
        if k != 2:
            draw(self, sampler, k, *rest)
    monkeypatch.setattr(shards._Job, "draw", lose_one)
    with pytest.raises(ValueError, match=r"no shard holds the samples \[4, 6\)"):
        _run(tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists()


def test_stale_temporary_files_are_removed_on_resume(tmp_path):
    folder = _interrupted(tmp_path / "s.npz", after_shards=1)
    (folder / ".samples-0000000002-0000000004.npz.999.tmp").write_bytes(b"half a shard")
    _run(tmp_path / "s.npz", resume=True)
    assert not folder.exists()


def test_png_folder_and_grid_outputs(tmp_path):
    expected = to_uint8(_sampler().sample(N, seed=3, batch_size=BATCH))
    _run(f"{tmp_path}/pngs/")
    from PIL import Image
    files = sorted((tmp_path / "pngs").iterdir())
    assert [p.name for p in files] == [f"{i:06d}.png" for i in range(N)]
    assert np.array_equal(np.stack([np.asarray(Image.open(p)) for p in files]), expected[..., 0])
    assert shards.finished_manifest(f"{tmp_path}/pngs/").name == "pngs.manifest.json"
    _run(tmp_path / "grid.png")
    # 4 a row, 3 rows of 3×3 with 2-px gaps: 22 px, enlarged 24× to reach 512 px
    assert Image.open(tmp_path / "grid.png").size == (24 * (4 * 5 + 2), 24 * (3 * 5 + 2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(micro_batch=0), "micro_batch must be a positive int"), (dict(shard_size=3), "multiple of the micro-batch 2"),
    (dict(num_samples=0), "num_samples must be a positive int"),
    (dict(num_samples=2 ** 32 + 1), r"sample indices \[0, 4294967297\) must lie below 2\^32"),
    (dict(seed=-1), "seed must be an int in"),
])
def test_bad_job_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(tmp_path / "s.npz", **kwargs)
    assert not shards.work_folder(tmp_path / "s.npz").exists()  # refused before any work starts


def test_a_bad_output_name_fails_before_sampling(tmp_path):
    model = Model()
    with pytest.raises(ValueError, match="output must be a .png"):
        _run(tmp_path / "s.jpg", model)
    assert model.calls == 0


def test_checksums_follow_the_weights():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.load_state_dict(a.state_dict())
    assert shards.state_dict_sha256(a) == shards.state_dict_sha256(b)
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert shards.state_dict_sha256(a) != shards.state_dict_sha256(b)
    assert shards.step_table_sha256(_sampler()) != shards.step_table_sha256(_sampler(variance="fixed_small"))
