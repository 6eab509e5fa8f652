"""The CLI's no-traceback rule (DESIGN §9, files): every way a careless or hostile user was seen to get a
traceback or a bare errno ends in one line that names the problem, with exit status 2 (130 for
Ctrl-C), and the work it refused never starts."""
import json

import pytest
import torch
from safetensors.torch import save_file

import ddpm_fast as df
from ddpm_fast import _atomic
from ddpm_fast.cli import main
from ddpm_fast.cli.train import CHECKPOINT, EMA_WEIGHTS

D = ["sample", "--model", "digits", "--method", "ddim", "--steps", "5", "--quiet", "--num", "2"]
TR = ["train", "--quiet", "--ch", "8", "--ch-mult", "1,2", "--num-groups", "4", "--attn-resolutions", "4",
      "--resolution", "8", "--batch-size", "4"]


def _run_dir(tmp):
    """A finished 2-step training run in tmp/run."""
    if not (tmp / "run" / CHECKPOINT).exists():
        assert main([*TR, "--steps", "2", "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def _truncated_checkpoint(tmp):
    run = _run_dir(tmp)
    (run / CHECKPOINT).write_bytes((run / CHECKPOINT).read_bytes()[:1000])
    return run


def _model_in_place_of_checkpoint(tmp):
    run = _run_dir(tmp)
    (run / CHECKPOINT).write_bytes((run / EMA_WEIGHTS).read_bytes())
    return run


def _diffusers_config(content):
    def make(tmp):
        (tmp / "unet").mkdir()
        (tmp / "unet" / "config.json").write_text(content)
        return tmp / "unet"
    return make


def _absurd_metadata(tmp):
    model = df.UNet.small()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "absurd.safetensors"),
              metadata={"ddpm_fast_config": json.dumps({**model.config, "ch": 10 ** 7})})
    return tmp / "absurd.safetensors"


def _disk_full(monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(_atomic.os, "fsync", full)


def _ctrl_c(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(df.Sampler, "sample", interrupted)


# (argv with {tmp} and {made} placeholders, what to set up, monkeypatch, exit status, what the line says)
CASES = {
    "device nonsense": ([*D, "--device", "nonsense"], None, None, 2, "--device: expected cpu, cuda or cuda:N, got 'nonsense'"),
    "device meta": ([*D, "--device", "meta"], None, None, 2, "--device: expected cpu, cuda or cuda:N, got 'meta'"),
    "train device meta": ([*TR, "--device", "meta", "--out", "{tmp}/r"], None, None, 2, "expected cpu, cuda"),
    "checkpoint-every 0": ([*TR, "--checkpoint-every", "0", "--out", "{tmp}/r"], None, None, 2,
                           "checkpoint_every must be a positive int, got 0"),
    "batch too large to allocate": (["sample", "--model", "digits", "--num", "4000000000", "--batch-size",
                                     "4000000000", "--timesteps", "3", "--quiet"], None, None, 2, "out of memory"),
    "train batch too large": ([*TR, "--steps", "1", "--batch-size", str(10 ** 13), "--out", "{tmp}/r"], None, None, 2,
                              "out of memory"),
    "timesteps beyond the noise keys": ([*D, "--timesteps", str(2 ** 33)], None, None, 2, "T must be an int in [1, 2^32)"),
    "convert through a file": (["convert", "{made}", "{tmp}/a-file/m.safetensors"], _run_dir, None, 2,
                               "is a file, not a folder"),
    "convert to a folder": (["convert", "{made}/model.safetensors", "{tmp}"], _run_dir, None, 2,
                            "is a folder: expected a .safetensors file"),
    "resume a truncated checkpoint": ([*TR, "--steps", "4", "--resume", "--out", "{made}"], _truncated_checkpoint, None,
                                      2, "is not a readable safetensors file"),
    "resume a model file": ([*TR, "--steps", "4", "--resume", "--out", "{made}"], _model_in_place_of_checkpoint, None,
                            2, "is not a checkpoint of ddpm-fast train"),
    "disk full saving a checkpoint": ([*TR, "--steps", "1", "--out", "{tmp}/r"], None, _disk_full, 2,
                                      "No space left on device: '{tmp}/r/checkpoint.safetensors'"),
    "disk full sampling": ([*D, "--out", "{tmp}/s.npz"], None, _disk_full, 2, "No space left on device: '{tmp}/"),
    "diffusers config a list": ([*D, "--model", "{made}"], _diffusers_config("[1, 2]"), None, 2,
                                "config must be a JSON object of options, got [1, 2]"),
    "diffusers config null": ([*D, "--model", "{made}"], _diffusers_config("null"), None, 2,
                              "config must be a JSON object of options, got None"),
    "diffusers config bad values": ([*D, "--model", "{made}"], _diffusers_config(
        '{"block_out_channels": "abc", "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"], '
        '"sample_size": 8, "flip_sin_to_cos": false, "freq_shift": 1, "downsample_padding": 0, "norm_eps": 1e-6}'),
        None, 2, "block_out_channels must be a non-empty list of positive ints, got 'abc'"),
    "diffusers config not JSON": ([*D, "--model", "{made}"], _diffusers_config("{oops"), None, 2, "config.json: "),
    "absurd sizes in metadata": ([*D, "--model", "{made}"], _absurd_metadata, None, 2, "does not match UNet"),
    "trajectory a folder": ([*D, "--out", "{tmp}/s.png", "--trajectory", "{tmp}"], None, None, 2,
                            "is a folder: expected a .png file"),
    "ch-mult a,b": ([*TR, "--ch-mult", "a,b", "--out", "{tmp}/r"], None, None, 2,
                    "--ch-mult: expected comma-separated integers >= 0 such as 1,2,2, got 'a,b'"),
    "train seed 2**64": ([*TR, "--seed", str(2 ** 64), "--out", "{tmp}/r"], None, None, 2,
                         "--seed: expected an integer in [0, 2^63)"),
    "sample seed -1": ([*D, "--seed", "-1"], None, None, 2, "--seed: expected an integer in [0, 2^63), got '-1'"),
    "grad-clip -1": ([*TR, "--grad-clip", "-1", "--out", "{tmp}/r"], None, None, 2, "grad_clip must be a number > 0"),
    "ema-decay 5": ([*TR, "--ema-decay", "5", "--out", "{tmp}/r"], None, None, 2, "ema_decay must be a number in [0, 1]"),
    "train steps 0": ([*TR, "--steps", "0", "--out", "{tmp}/r"], None, None, 2, "steps must be a positive int, got 0"),
    "resume behind the checkpoint": ([*TR, "--steps", "1", "--resume", "--out", "{made}"], _run_dir, None, 2,
                                     "is at step 2, past --steps 1"),
    "channels 2": ([*TR, "--channels", "2", "--out", "{tmp}/r"], None, None, 2, "--channels: invalid choice: 2"),
    "Ctrl-C": ([*D, "--out", "{tmp}/s.png"], None, _ctrl_c, 130, "ddpm-fast: interrupted"),
}
if not torch.cuda.is_available():
    CASES["device cuda without a GPU"] = ([*D, "--device", "cuda"], None, None, 2, "has no usable CUDA GPU")


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_line_and_no_traceback(name, tmp_path, capsys, monkeypatch):
    argv, setup, patch, status, says = CASES[name]
    (tmp_path / "a-file").write_text("")
    made = setup(tmp_path) if setup is not None else None
    if patch is not None:
        patch(monkeypatch)
    capsys.readouterr()
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{made}", str(made)) for a in argv]
    if "--out" not in argv and argv[0] == "sample":
        argv += ["--out", str(tmp_path / "never.png")]
    try:
        got = main(argv)
    except SystemExit as exit:  # argparse's own checks
        got = exit.code
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note: ")]
    assert got == status and len(err) == 1, err
    assert says.replace("{tmp}", str(tmp_path)) in err[0] and "Traceback" not in err[0], err
    assert not (tmp_path / "never.png").exists() and not list(tmp_path.glob("*.parts"))
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".*.lock"))
