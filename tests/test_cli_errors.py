"""The CLI's no-traceback rule (DESIGN §9, files): every way a careless or hostile user was seen to get a
traceback or a bare errno ends in one line that names the problem, with exit status 2 (130 for
Ctrl-C), and the work it refused never starts."""
import json
import sys

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


def _bomb_folder(tmp):
    from PIL import Image
    (tmp / "images").mkdir()
    Image.new("L", (64, 64)).save(tmp / "images" / "bomb.png")  # a bomb once the limit is lowered below
    return tmp / "images"


def _small_pixel_limit(monkeypatch):
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64² = 4,096 > 2 × 1,000: PIL's DecompressionBombError


def _pickled_code(tmp):
    import os
    torch.save({"state_dict": {}, "config": {}, "run": os.system}, tmp / "evil.pt")
    return tmp / "evil.pt"


def _huge_config(tmp):
    model = df.UNet.small()
    torch.save({"state_dict": model.state_dict(), "config": {**model.config, "ch": 2 ** 40}}, tmp / "huge.pt")
    return tmp / "huge.pt"


def _world_without_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)


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
                                     "4000000000", "--timesteps", "3", "--quiet", "--out", "{tmp}/s.npz"], None, None,
                                    2, "out of memory"),
    "train batch 2**62": ([*TR, "--steps", "1", "--batch-size", str(2 ** 62), "--out", "{tmp}/r"], None, None, 2,
                          "out of memory"),
    "train ch 2**40": ([*TR, "--ch", str(2 ** 40), "--out", "{tmp}/r"], None, None, 2,
                       "the network flags (--ch, --ch-mult, --resolution, ...): its configuration asks for tensors too "
                       "large to exist"),
    "train resolution 0": ([*TR, "--resolution", "0", "--out", "{tmp}/r"], None, None, 2,
                           "resolution must be a positive int, got 0"),
    "train resolution -8": ([*TR, "--resolution", "-8", "--out", "{tmp}/r"], None, None, 2,
                            "resolution must be a positive int, got -8"),
    "train diverges": ([*TR, "--steps", "3", "--lr", "1e30", "--out", "{tmp}/r"], None, None, 2,
                       "training diverged at step 2: the loss is nan"),
    "train on a decompression bomb": ([*TR, "--dataset", "{made}", "--out", "{tmp}/r"], _bomb_folder,
                                      _small_pixel_limit, 2, "bomb.png is not a readable image: Image size (4096 pixels)"),
    "convert a config of ch 2**40": (["convert", "{made}", "{tmp}/m.safetensors"], _huge_config, None, 2,
                                     "huge.pt: its configuration asks for tensors too large to exist"),
    "convert pickled code": (["convert", "{made}", "{tmp}/m.safetensors"], _pickled_code, None, 2,
                             "evil.pt is not a readable weights-only PyTorch checkpoint: it holds pickled code"),
    "WORLD_SIZE=2 without RANK": ([*D], None, _world_without_rank, 2, "WORLD_SIZE=2 asks for a job of 2 processes, "
                                                                       "but RANK is not set: start it with torchrun"),
    "grid-width 2**62": ([*D, "--grid-width", str(2 ** 62), "--out", "{tmp}/o.png"], None, None, 2,
                         "pixels, more than image viewers open"),
    "device cpu:7": ([*D, "--device", "cpu:7"], None, None, 2, "expected cpu, cuda or cuda:N, got 'cpu:7'"),
    "num 2**32 a shard each": ([*D, "--num", str(2 ** 32), "--batch-size", "1"], None, None, 2,
                               "4294967296 samples in shards of 1 make 4,294,967,296 shards, more than 1,048,576"),
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
    "learned variance of a C-channel model": ([*D, "--variance", "learned_range", "--out", "{tmp}/s.png"], None, None,
                                              2, "variance='learned_range' needs a model with 2 output channels for 1 "
                                                 "input channels"),
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
    assert "weights_only=False" not in err[0] and "will likely succeed" not in err[0]  # torch's advice, never relayed
    assert not (tmp_path / "never.png").exists() and not list(tmp_path.glob("*.parts"))
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob(".*.lock"))


@pytest.mark.parametrize("command", [None, "sample", "train", "train-classifier", "convert", "nll"])
def test_every_commands_help_prints(command, capsys):
    # argparse formats help with %: a bare "%" in a help text made `ddpm-fast sample --help` an error
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"] if command else ["--help"])
    out, err = capsys.readouterr()
    assert exit.value.code == 0, err
    assert out.startswith("usage: ddpm-fast") and err == ""
    if command:
        commands = sys.modules["ddpm_fast.cli.main"].build_parser()._subparsers._group_actions[0].choices
        assert command in commands
        for action in commands[command]._actions:
            for flag in action.option_strings:
                assert flag in out


def test_ctrl_c_while_starting_is_one_line_and_130(tmp_path):
    # -X importtime reports each module as it finishes: SIGINT goes right after ddpm_fast._startup,
    # while torch is still being imported
    import signal
    import subprocess
    done = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "ddpm_fast.cli", "sample", "--quiet", "--out",
                             str(tmp_path / "s.png")], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal starts it
    lines = []
    for line in done.stderr:
        lines.append(line)
        if line.rstrip().endswith("ddpm_fast._startup"):
            done.send_signal(signal.SIGINT)
            break
    lines += done.stderr.readlines()
    assert done.wait() == 130
    ours = [line for line in lines if not line.startswith("import time:")]
    assert ours == ["ddpm-fast: interrupted while starting: nothing was done\n"], ours
    assert list(tmp_path.iterdir()) == []
