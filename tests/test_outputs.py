"""Where a sampling job writes (DESIGN §9, files): one resolved target checked and written, only
what the job itself created ever removed, every name it will create checked before any work,
and only regular files read (a planted FIFO is refused by name, never waited on)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.cli import main, shards
from ddpm_fast.cli.images import finished_manifest, output_target, work_folder

SAMPLE = ["sample", "--model", "random-small", "--timesteps", "5", "--num", "3", "--quiet"]


def _one_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note: ")]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_a_users_folder_named_like_a_work_folder_is_never_removed(tmp_path, capsys):
    mine = tmp_path / "pngs.parts"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert main([*SAMPLE, "--out", f"{tmp_path}/pngs/"]) == 2
    assert "pngs.parts is in the way: it is not the work folder of a sampling job" in _one_line(capsys)
    assert (mine / "notes.txt").read_text() == "precious"
    (mine / "notes.txt").unlink()  # empty, still the user's: kept
    assert main([*SAMPLE, "--out", f"{tmp_path}/pngs/"]) == 2
    assert mine.is_dir() and not (tmp_path / "pngs").exists()


def test_checks_and_writes_go_to_one_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in ("d/", "d", "./d/", "x/../d", str(tmp_path / "d") + "/"):
        assert output_target(out) == tmp_path / "d"
        assert work_folder(out) == tmp_path / "d.parts" and finished_manifest(out) == tmp_path / "d.manifest.json"
    for out in ("/", "//", "/./"):
        with pytest.raises(ValueError, match="is the root folder"):
            output_target(out)


def test_the_root_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the old checks looked here, at the name "" left of "/"
    before = sorted(os.listdir("/"))
    assert main([*SAMPLE, "--out", "/"]) == 2  # `--out "$UNSET_VARIABLE/"`
    assert "output '/' is the root folder" in _one_line(capsys)
    assert sorted(os.listdir("/")) == before and list(tmp_path.iterdir()) == []


def test_a_folder_output_holding_other_files_needs_overwrite_and_keeps_them(tmp_path, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    (folder / "000000.png").write_bytes(b"a user's picture")
    (folder / "notes.txt").write_text("precious")
    assert main([*SAMPLE, "--out", f"{folder}/"]) == 2
    assert "is not the finished output of a job" in _one_line(capsys)
    assert (folder / "000000.png").read_bytes() == b"a user's picture"
    assert main([*SAMPLE, "--out", f"{folder}/", "--overwrite"]) == 0
    assert (folder / "notes.txt").read_text() == "precious"  # a name the package does not write: untouched
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000001.png", "000002.png", "notes.txt"]


def test_an_unrelated_manifest_is_not_replaced_unasked(tmp_path, capsys):
    out = tmp_path / "s.npz"
    finished_manifest(out).write_text('{"my": "own notes"}')
    assert main([*SAMPLE, "--out", str(out)]) == 2
    assert "s.npz.manifest.json exists and is not a ddpm_fast.sampling-job/1 manifest: pass --overwrite" in \
        _one_line(capsys)
    assert finished_manifest(out).read_text() == '{"my": "own notes"}' and not out.exists()
    assert main([*SAMPLE, "--out", str(out), "--overwrite"]) == 0
    assert json.loads(finished_manifest(out).read_text())["format"] == shards.FORMAT
    out.unlink()  # the package's own record of an output since deleted: replaced without asking
    assert main([*SAMPLE, "--out", str(out)]) == 0 and out.is_file()


@pytest.mark.parametrize("kind", ["npz", "dir"])
def test_a_name_too_long_for_the_job_is_refused_before_any_work(tmp_path, capsys, kind):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "x" * (limit - 30) + (".npz" if kind == "npz" else "")  # fits, but its manifest's temporary does not
    out = str(tmp_path / name) + ("/" if kind == "dir" else "")
    assert main([*SAMPLE, "--out", out]) == 2
    assert f"is too long: the job also writes '.{name}.manifest.json." in _one_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_trajectory_onto_another_file_is_refused_before_the_output_is_drawn(tmp_path, capsys):
    trajectory = tmp_path / "t.png"
    trajectory.write_bytes(b"someone else's picture")
    assert main([*SAMPLE, "--out", str(tmp_path / "s.npz"), "--trajectory", str(trajectory)]) == 2
    assert "exists with other content: pass --overwrite to replace it: '" + str(trajectory) in _one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.png"]
    assert trajectory.read_bytes() == b"someone else's picture"


def _fifo(path):
    os.mkfifo(path)
    return path


def test_a_fifo_planted_as_a_manifest_is_refused_without_blocking(tmp_path, capsys):
    out = tmp_path / "s.npz"
    _fifo(finished_manifest(out))
    assert main([*SAMPLE, "--out", str(out)]) == 2
    assert "s.npz.manifest.json is a FIFO, not a regular file: refused" in _one_line(capsys)
    os.unlink(finished_manifest(out))
    work_folder(out).mkdir()
    _fifo(work_folder(out) / "manifest.json")
    assert main([*SAMPLE, "--out", str(out), "--resume"]) == 2
    assert "manifest.json is a FIFO, not a regular file: refused" in _one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz.parts"]


def test_a_fifo_among_the_training_images_is_refused_by_name(tmp_path):
    from ddpm_fast.cli.data import image_folder_dataset
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    _fifo(tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"b.png is a FIFO, not a regular file: refused"):
        image_folder_dataset(tmp_path, 8)
    os.unlink(tmp_path / "b.png")
    assert image_folder_dataset(tmp_path, 8).shape == (1, 3, 8, 8)
    assert torch.equal(image_folder_dataset(tmp_path, 8), torch.full((1, 3, 8, 8), -1.0))
