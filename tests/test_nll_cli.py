"""`ddpm-fast nll`: a two-process job killed with SIGKILL and resumed by one process writes the
bytes of an uninterrupted one-process job (the bound's noise is keyed by image index, DESIGN §3),
a finished job rerun is a no-op, the report and the figures, and bad inputs as one-line errors
with nothing written. A tiny U-Net (tests/test_distributed.py's) keeps each run to seconds."""
import subprocess
import time

import numpy as np
import pytest

from ddpm_fast.cli import main
from ddpm_fast.cli.shards import finished_manifest, work_folder
from test_distributed import _command, _env, _in_process, _kill_tree, model_file  # noqa: F401 (a fixture)

NUM, BATCH = 12, 2  # 6 shards


def _args(model_file, out, *extra):
    return ["nll", "--model", model_file, "--dataset", "digits", "--num-images", str(NUM), "--batch-size", str(BATCH),
            "--timesteps", "30", "--seed", "2", "--device", "cpu", "--quiet", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def uninterrupted(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("nll") / "nll.npz"
    assert _in_process(_args(model_file, out)) == 0
    return out


def test_report_arrays_and_figures(model_file, uninterrupted, tmp_path, capsys):
    with np.load(uninterrupted) as f:
        assert f["terms"].shape == (NUM, 30) and f["bpd"].shape == (NUM,) and not bool(f["estimate"])
        assert np.allclose(f["bpd"], f["prior"] + f["terms"].sum(1), rtol=1e-12)
    out = tmp_path / "estimate.npz"
    assert main(_args(model_file, out, "--timesteps-subset", "5", "--curve", str(tmp_path / "curve.png"),
                      "--progressive", str(tmp_path / "grid.png"))) == 0
    printed = capsys.readouterr().out
    assert "an ESTIMATE over 5 of the timesteps" in printed and "were quantised" in printed
    assert (tmp_path / "curve.png").stat().st_size > 0 and (tmp_path / "grid.png").stat().st_size > 0


def test_killed_sharded_job_resumes_to_the_uninterrupted_bytes(model_file, uninterrupted, tmp_path):
    out = tmp_path / "nll.npz"
    job = subprocess.Popen(_command(_args(model_file, out), 2), env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(work_folder(out).glob("terms-*.npz")) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        _kill_tree(job.pid)
        job.wait()
    assert not out.exists(), "the job finished before it could be killed: give it more work"
    assert _in_process(_args(model_file, out)) == 2  # an unfinished job needs --resume
    assert _in_process(_args(model_file, out, "--resume")) == 0
    assert out.read_bytes() == uninterrupted.read_bytes()
    before = finished_manifest(out).stat().st_mtime_ns
    assert _in_process(_args(model_file, out)) == 0  # the finished job: a no-op
    assert finished_manifest(out).stat().st_mtime_ns == before


def test_bad_inputs_are_one_line_errors(model_file, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "x.npz"
    cases = [
        (["--data", str(empty)], "no images"),
        (["--num-images", "5000"], "--num must be in [1, 1797]"),
        (["--label", "3"], "is unconditional"),
        (["--timesteps-subset", "1"], "--timesteps-subset must be in [2, 30]"),
        (["--shard-size", "3"], "multiple of --batch-size"),
    ]
    for extra, message in cases:
        base = [a for a in _args(model_file, out) if a not in ("--dataset", "digits")] if extra[0] == "--data" else \
            [a for a in _args(model_file, out)]
        if extra[0] == "--num-images":
            base = base[:base.index("--num-images")] + base[base.index("--num-images") + 2:]
        assert main(base + extra) == 2, extra
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1, error
        assert not out.exists() and not work_folder(out).exists()
    assert main(["nll", "--model", "digits-cond", "--num", "2", "--out", str(out), "--quiet"]) == 2
    assert "is class-conditional: pass --label given" in capsys.readouterr().err
    assert main(["nll", "--out", str(tmp_path / "x.png")]) == 2
    assert "--out must be a .npz file" in capsys.readouterr().err
