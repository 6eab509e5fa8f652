"""`ddpm-fast sample` under torchrun (gloo on the CPU): the same bytes on any number of
processes, a job killed with SIGKILL and resumed ends with the bytes of an uninterrupted one,
and resuming with other settings is refused. A tiny U-Net keeps each run to seconds; every
process runs one thread (what torchrun sets), since bitwise equality needs the same thread
count."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm_fast as df
from ddpm_fast.cli import main
from ddpm_fast.cli.shards import finished_manifest, work_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(ch=8, out_ch=1, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, in_channels=1,
            resolution=8, num_groups=4)
NUM, BATCH = 24, 2  # 12 shards: a kill after the first leaves most of the job undone


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = df.UNet(**TINY)
    with torch.no_grad():  # off the near-zero init, so the samples depend on the weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    model.save_pretrained(path)
    return str(path)


def _args(model_file, out, *extra):
    return ["sample", "--model", model_file, "--num-samples", str(NUM), "--batch-size", str(BATCH), "--timesteps",
            "60", "--seed", "5", "--device", "cpu", "--quiet", "--out", str(out), *extra]


def _env():
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _command(args, processes, launcher=()):
    if processes == 1:
        return [sys.executable, "-m", "ddpm_fast.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            *launcher, "-m", "ddpm_fast.cli", *args]


def _run(args, processes, launcher=()):
    return subprocess.run(_command(args, processes, launcher), env=_env(), capture_output=True, text=True,
                          timeout=300)


def _in_process(args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun processes
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(model_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "samples.npz"
    assert _in_process(_args(model_file, out)) == 0
    return out


@pytest.fixture(scope="module")
def killed(model_file, tmp_path_factory) -> Path:
    """The work folder of a two-process job killed (SIGKILL, the whole process group) once its
    first shard was on disk."""
    out = tmp_path_factory.mktemp("killed") / "samples.npz"
    shards = work_folder(out)
    job = subprocess.Popen(_command(_args(model_file, out), 2), env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(shards.glob("samples-*.npz")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        _kill_tree(job.pid)
        job.wait()
    assert not out.exists(), "the job finished before it could be killed: give it more work"
    return out


def _kill_tree(pid):
    """SIGKILL `pid` and every process below it, as a batch scheduler ends a job: killing
    torchrun's process group alone is not enough, its workers run in sessions of their own."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, i = [pid], 0
    while i < len(tree):
        tree += children.get(tree[i], [])
        i += 1
    for p in tree:  # the launcher first, so it cannot start replacements
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_two_processes_write_the_bytes_of_one(model_file, uninterrupted, tmp_path):
    out = tmp_path / "samples.npz"
    args = [a for a in _args(model_file, out) if a != "--quiet"]  # progress bars on, each rank's output apart:
    result = _run(args, 2, launcher=["--log-dir", str(tmp_path / "logs"), "--redirects", "3"])
    assert result.returncode == 0, result.stderr
    logs = {int(p.parent.name): p.read_text() for p in (tmp_path / "logs").rglob("stderr.log")}
    assert sorted(logs) == [0, 1] and "360/360" in logs[0] and "step" not in logs[1]  # rank 0's bar alone
    assert out.read_bytes() == uninterrupted.read_bytes()
    images = np.load(out)["arr_0"]
    assert images.shape == (NUM, 8, 8, 1) and len({image.tobytes() for image in images}) == NUM
    manifest = json.loads(finished_manifest(out).read_text())
    assert [(r["world_size"], r["threads"]) for r in manifest["launches"]] == [(2, 1)]
    assert manifest["settings"]["micro_batch"] == BATCH and manifest["completed"] == [[0, NUM]]
    stdout = "".join(p.read_text() for p in (tmp_path / "logs").rglob("stdout.log"))
    assert stdout.count("wrote 24 samples") == 1  # rank 0 alone reports


def test_a_killed_job_resumes_to_the_uninterrupted_bytes(killed, uninterrupted, tmp_path, model_file):
    out = tmp_path / "samples.npz"
    shutil.copytree(work_folder(killed), work_folder(out))
    done = sorted(work_folder(out).glob("samples-*.npz"))
    assert 1 <= len(done) < NUM // BATCH
    recorded = json.loads((work_folder(out) / "manifest.json").read_text())["completed"]
    on_disk = {int(p.name.split("-")[1]) for p in done}
    assert all(start in on_disk for start, stop in recorded for start in range(start, stop, BATCH))
    result = _run(_args(model_file, out, "--resume"), 2)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == uninterrupted.read_bytes()  # no index missing, none twice, same bytes
    assert not work_folder(out).exists()
    assert [r["world_size"] for r in json.loads(finished_manifest(out).read_text())["launches"]] == [2, 2]


def test_resume_on_another_number_of_processes(killed, uninterrupted, tmp_path, model_file):
    out = tmp_path / "samples.npz"
    shutil.copytree(work_folder(killed), work_folder(out))
    assert _in_process(_args(model_file, out, "--resume")) == 0
    assert out.read_bytes() == uninterrupted.read_bytes()


@pytest.mark.parametrize("change,message", [
    (["--seed", "6"], "seed 5 → 6"), (["--timesteps", "50"], "timesteps 60 → 50"),
    (["--batch-size", "4"], "micro_batch 2 → 4"), (["--no-clip"], "clip_denoised True → False"),
])
def test_resume_with_other_settings_is_refused(killed, tmp_path, model_file, capsys, change, message):
    out = tmp_path / "samples.npz"
    shutil.copytree(work_folder(killed), work_folder(out))
    before = sorted(p.name for p in work_folder(out).iterdir())
    args = _args(model_file, out, "--resume")
    for i in range(0, len(change), 2):
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
        else:
            args.append(change[i])
    assert main(args) == 2
    error = capsys.readouterr().err
    assert error.startswith("ddpm-fast: error: --resume refused") and message in error
    assert error.count("\n") == 1  # one line
    assert sorted(p.name for p in work_folder(out).iterdir()) == before and not out.exists()


def test_resume_refused_on_every_rank(killed, tmp_path, model_file):
    out = tmp_path / "samples.npz"
    shutil.copytree(work_folder(killed), work_folder(out))
    result = _run(_args(model_file, out, "--resume", "--seed", "7"), 2)
    assert result.returncode != 0 and result.stderr.count("--resume refused") == 1  # rank 0 says it once


def test_an_unfinished_job_needs_resume(killed, tmp_path, model_file, capsys):
    out = tmp_path / "samples.npz"
    shutil.copytree(work_folder(killed), work_folder(out))
    assert main(_args(model_file, out)) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err


def test_another_batch_size_agrees_to_float_tolerance(uninterrupted, tmp_path, model_file):
    out = tmp_path / "samples.npz"
    args = _args(model_file, out)
    args[args.index("--batch-size") + 1] = "3"
    assert _in_process(args) == 0
    a, b = np.load(out)["arr_0"].astype(int), np.load(uninterrupted)["arr_0"].astype(int)
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.99  # uint8 rounding of float-level differences


def test_check_finite_stops_at_the_first_non_finite_step(tmp_path, model_file, capsys):
    model = df.UNet.from_pretrained(model_file)
    with torch.no_grad():
        model.conv_out.bias.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan.safetensors")
    args = ["sample", "--model", str(tmp_path / "nan.safetensors"), "--num-samples", "2", "--timesteps", "10",
            "--quiet", "--out", str(tmp_path / "s.npz")]
    assert _in_process([*args, "--check-finite"]) == 2
    assert "x stopped being finite after the update at timestep 9 (step 1 of 10)" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()
