"""ddpm-fast sample, and the picture it writes."""
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_fast.cli import main
from ddpm_fast.images import save_grid, to_uint8


def test_sample_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--num", "5", "--timesteps", "20", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "randomly initialised" in captured.err and "wrote 5 samples" in captured.out
    image = Image.open(out)
    assert image.size == (3 * 18 + 2, 2 * 18 + 2) and image.mode == "L"  # 3×2 grid of 16×16 with 2-px gaps


def test_sample_ddim_and_errors(tmp_path, capsys):
    out = tmp_path / "ddim.png"
    assert main(["sample", "--num", "2", "--method", "ddim", "--steps", "5", "--eta", "1.0", "--out", str(out),
                 "--quiet"]) == 0
    assert out.exists()
    assert main(["sample", "--model", str(tmp_path / "nothing.safetensors"), "--out", str(out)]) == 2
    assert "neither a bundled model" in capsys.readouterr().err
    assert main(["sample", "--eta", "2", "--method", "ddim", "--steps", "5", "--out", str(out)]) == 2
    assert "eta must be" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--method", "plms"])


def test_to_uint8_truncates_like_the_original():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 7)
    assert to_uint8(x).ravel().tolist() == [0, 0, 63, 127, 254, 255, 255]
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match="images must be"):
        to_uint8(torch.zeros(2, 2, 4, 4))


def test_grid_layout(tmp_path):
    x = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 1.0, 0.0)])
    grid = np.asarray(Image.open(save_grid(x, tmp_path / "g.png", nrow=2, padding=1)))
    assert grid.shape == (11, 11, 3)
    assert (grid[1:5, 1:5] == 0).all() and (grid[1:5, 6:10] == 255).all() and (grid[6:10, 1:5] == 127).all()
