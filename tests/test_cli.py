"""ddpm-fast sample, and the picture it writes."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_fast as df
from ddpm_fast.classifier import NoisyClassifier
from ddpm_fast.cli import main
from ddpm_fast.cli.images import grid_image, save_grid, to_uint8, trajectory_png


def test_sample_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--num", "5", "--timesteps", "20", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "randomly initialised" in captured.err and "wrote 5 samples" in captured.out
    seconds, per_image = re.search(r" in ([0-9.]+) s, ([0-9.]+) ms an image$", captured.out.strip()).groups()
    assert float(per_image) == pytest.approx(1e3 * float(seconds) / 5, abs=0.1 + 1e3 * 0.05 / 5)  # s has 1 decimal
    image = Image.open(out)
    # a 3×2 grid of 16×16 with 2-px gaps, 56 px wide, enlarged 10× to reach 512 px
    assert image.size == (10 * (3 * 18 + 2), 10 * (2 * 18 + 2)) and image.mode == "L"
    native = tmp_path / "native.png"
    assert main(["sample", "--num", "5", "--timesteps", "20", "--seed", "3", "--out", str(native), "--quiet",
                 "--grid-width", "0"]) == 0
    assert Image.open(native).size == (3 * 18 + 2, 2 * 18 + 2)
    assert np.array_equal(np.asarray(image)[::10, ::10], np.asarray(Image.open(native)))  # nearest neighbour


def test_sample_ddim_and_errors(tmp_path, capsys):
    out = tmp_path / "ddim.png"
    assert main(["sample", "--num", "2", "--method", "ddim", "--steps", "5", "--eta", "1.0", "--out", str(out),
                 "--quiet"]) == 0
    torch.manual_seed(0)  # --model random-small
    x0 = df.Sampler(df.UNet.small(), df.NoiseSchedule.linear(1000), method="ddim", steps=5, eta=1.0).sample(2)
    assert np.array_equal(np.asarray(Image.open(out)), grid_image(to_uint8(x0))[..., 0])  # the samples asked for
    assert main(["sample", "--model", str(tmp_path / "nothing.safetensors"), "--out", str(out)]) == 2
    assert "neither a bundled model" in capsys.readouterr().err
    assert main(["sample", "--eta", "2", "--method", "ddim", "--steps", "5", "--out", str(out)]) == 2
    assert "eta must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--method", "plms"])


@pytest.mark.parametrize("args,reason", [
    (["--num", "0"], "--num/--num-samples: expected a positive integer, got 0"),
    (["--num-samples", "-3"], "--num/--num-samples: expected a positive integer, got -3"),
    (["--num", "many"], "expected a positive integer, got 'many'"),
    (["--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["--steps", "0", "--method", "ddim"], "--steps: expected a positive integer"),
    (["--dtype", "float8"], "--dtype: invalid choice: 'float8'"),
    (["--model", "no-such-model"], "neither a bundled model"),
    (["--out", "{tmp}/a-file/grid.png"], "is a file, not a folder"),
    (["--out", "{tmp}/grid.jpg"], "output must be a .png"),
    (["--trajectory", "{tmp}/traj.npz"], "output must be .png"),
    (["--model", "digits-cond"], "--model digits-cond draws classes: pass --label N (0 … 9) or --label all"),
    (["--model", "digits-cond", "--label", "all", "--num", "15"], "--num must be a multiple of 10, got 15"),
    (["--model", "digits-cond", "--label", "10"], "--label must be an int in [0, 10) or 'all', got '10'"),
    (["--model", "digits", "--label", "3"], "--model digits is unconditional; pass --classifier"),
    (["--model", "digits", "--guidance-scale", "2"], "needs a class-conditional UNet"),
    (["--model", "digits-cond", "--label", "1", "--guidance-scale", "-1"], "expected a finite number >= 0, got '-1'"),
    (["--model", "digits", "--classifier-scale", "2"], "scales a classifier's gradient: pass classifier="),
])
def test_bad_arguments_give_one_line_and_exit_2(tmp_path, capsys, args, reason):
    (tmp_path / "a-file").write_text("not a folder")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    argv = ["sample", "--timesteps", "5", "--quiet", "--out", str(tmp_path / "ok.png")] + args
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's own checks
        status = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and reason in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "ok.png").exists()


def test_an_unwritable_folder_is_refused_before_sampling(tmp_path):
    # Through the installed entry point, as a user runs it; as root a read-only folder is still
    # writable, so the unwritable place is a path through a regular file.
    (tmp_path / "a-file").write_text("")
    done = subprocess.run([sys.executable, "-m", "ddpm_fast.cli", "sample", "--num", "2", "--timesteps", "5",
                           "--out", str(tmp_path / "a-file" / "out") + "/"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("ddpm-fast: error: cannot write")
    assert "Traceback" not in done.stderr


def test_to_uint8_truncates_like_the_original():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 7)
    assert to_uint8(x).ravel().tolist() == [0, 0, 63, 127, 254, 255, 255]
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match="images must be"):
        to_uint8(torch.zeros(2, 2, 4, 4))


def test_grid_layout(tmp_path):
    x = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 1.0, 0.0)])
    grid = np.asarray(Image.open(save_grid(x, tmp_path / "g.png", nrow=2, padding=1, width=0)))
    assert grid.shape == (11, 11, 3)
    assert (grid[1:5, 1:5] == 0).all() and (grid[1:5, 6:10] == 255).all() and (grid[6:10, 1:5] == 127).all()
    one_row = np.asarray(Image.open(save_grid(x, tmp_path / "r.png", nrow=3, padding=1, width=30)))
    assert one_row.shape == (2 * 6, 2 * 16, 3)  # nrow columns; the smallest whole factor reaching 30 px: 2
    assert (one_row[2:10, 2:10] == 0).all() and (one_row[2:10, 22:30] == 127).all()
    with pytest.raises(ValueError, match="grid width must be an int >= 0, got -1"):
        save_grid(x, tmp_path / "bad.png", width=-1)
    with pytest.raises(ValueError, match="grid nrow must be an int >= 1, got 0"):
        save_grid(x, tmp_path / "bad.png", nrow=0)


def test_sample_with_labels_and_guidance(tmp_path, capsys):
    # --label all: one class a grid row; classifier-free and classifier guidance through the CLI
    out = tmp_path / "classes.png"
    assert main(["sample", "--model", "digits-cond", "--label", "all", "--num", "20", "--method", "ddim", "--steps",
                 "2", "--guidance-scale", "2", "--classifier", "digits-classifier", "--grid-width", "0", "--out",
                 str(out), "--quiet"]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape[:2] == (10 * 18 + 2, 2 * 18 + 2)  # 10 rows (the classes) of 2, 16 px digits, 2 px padding
    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    assert manifest["settings"]["guidance_scale"] == 2.0 and manifest["settings"]["classifier_scale"] == 1.0
    assert "labels_sha256" in manifest["settings"]
    traj = tmp_path / "traj.png"
    assert main(["sample", "--model", "digits", "--label", "4", "--classifier", "digits-classifier",
                 "--classifier-scale", "3", "--num", "2", "--method", "ddim", "--steps", "2", "--out",
                 str(tmp_path / "four.png"), "--trajectory", str(traj), "--quiet"]) == 0
    sampler = df.Sampler(df.UNet.from_pretrained("digits"), df.NoiseSchedule.linear(1000), method="ddim", steps=2,
                         classifier=NoisyClassifier.from_pretrained("digits-classifier"), classifier_scale=3.0)
    assert traj.read_bytes() == trajectory_png(sampler.trajectory(2, frames=2, labels=[4, 4]))
