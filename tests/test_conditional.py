"""Class-conditional U-Nets (a label embedding with a no-label token ∅, DESIGN §2.5), their
classifier-free-guidance training, and the noise-conditioned classifier NoisyClassifier."""
import pytest
import torch

from ddpm_fast import UNet
from ddpm_fast.checkpoints import read_safetensors
from ddpm_fast.classifier import NoisyClassifier
from ddpm_fast.cli import main
from ddpm_fast.cli.train import CHECKPOINT, EMA_WEIGHTS, TrainConfig, train
from helpers import relative_error

SMALL = dict(ch=16, out_ch=2, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0,
             in_channels=2, resolution=8, num_groups=8)
ENCODER = {k: v for k, v in SMALL.items() if k != "out_ch"}
TINY_RUN = ["--resolution", "8", "--ch", "8", "--ch-mult", "1,2", "--attn-resolutions", "4", "--num-groups", "4",
            "--batch-size", "4", "--quiet"]


def _perturbed(model):
    """Off the near-zero init, so a wrong output cannot pass."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return _perturbed(UNet(**SMALL, num_classes=3))


def test_labels_shape_the_output_and_the_no_label_token_is_its_own(model):
    x, t = torch.randn(4, 2, 8, 8), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        out = {y: model(x, t, torch.full((4,), y)) for y in range(4)}  # 3 = ∅
        assert all(o.shape == (4, 2, 8, 8) for o in out.values())
        for a in range(4):
            for b in range(a):
                assert relative_error(out[a], out[b]) > 1e-2, (a, b)  # every label, ∅ included, is its own input
        mixed = model(x, t, torch.tensor([0, 1, 2, 3]))
        assert all(relative_error(mixed[i], out[i][i]) < 1e-5 for i in range(4))  # labels act per example
    assert model.label_emb.num_embeddings == 4  # K classes + ∅
    assert UNet(**SMALL).label_emb is None and "num_classes" not in UNet(**SMALL).config


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_every_cpu_backend_agrees_with_the_float64_reference(model, backend):
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor([0, 10, 999]), torch.tensor([2, 0, 3])
    with torch.no_grad():
        reference = UNet(**SMALL, num_classes=3, backend="reference").double()
        reference.load_state_dict(model.state_dict())
        expected = reference(x.double(), t, y)
        model.backend = backend
        assert relative_error(model(x, t, y), expected) < 1e-5  # float32 against float64 (DESIGN §6)


@pytest.mark.parametrize("y, error, match", [
    (None, ValueError, r"class-conditional \(num_classes=3\): expected labels y \[B\] in \[0, 3\].*got none"),
    (torch.tensor([0, 4]), ValueError, r"labels in \[0, 3\] \(3 = no label\), got \[0, 4\]"),
    (torch.tensor([-1, 0]), ValueError, r"labels in \[0, 3\] \(3 = no label\), got \[-1, 0\]"),
    (torch.tensor([0]), ValueError, r"y must have shape \[B\] = \[2\], got \(1,\)"),
    (torch.tensor([0.0, 1.0]), TypeError, "integer class labels, got torch.float32"),
])
def test_bad_labels(model, y, error, match):
    with pytest.raises(error, match=match):
        model(torch.randn(2, 2, 8, 8), torch.tensor([1, 2]), y)


def test_an_unconditional_unet_refuses_labels_and_bad_num_classes():
    with pytest.raises(ValueError, match=r"unconditional UNet \(num_classes=None\): expected no labels, got a tensor"):
        UNet(**SMALL)(torch.randn(2, 2, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="num_classes must be a positive int or None"):
            UNet(**SMALL, num_classes=bad)


def test_save_and_load_roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path / "m.safetensors")
    loaded = UNet.from_pretrained(tmp_path / "m.safetensors").eval()
    assert loaded.config == model.config and loaded.config["num_classes"] == 3
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 3])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_noisy_classifier(tmp_path):
    torch.manual_seed(0)
    clf = NoisyClassifier(5, **ENCODER)
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([0, 10, 999])
    assert torch.equal(clf(x, t), torch.zeros(3, 5))  # the zero-initialised head: p_φ uniform at the start
    clf = _perturbed(clf)
    with torch.no_grad():
        logits = clf(x, t)
        assert logits.shape == (3, 5) and relative_error(clf(x, torch.tensor([500] * 3)), logits) > 1e-2
        reference = NoisyClassifier(5, **ENCODER, backend="reference").double()
        reference.load_state_dict(clf.state_dict())
        assert relative_error(clf(x, t), reference(x.double(), t)) < 1e-5
    assert not any(name.startswith(("up.", "conv_out")) for name in clf.state_dict())  # the encoder half only
    assert NoisyClassifier.digits().config == {**{k: v for k, v in UNet.digits().config.items() if k != "out_ch"},
                                               "num_classes": 10}
    clf.save_pretrained(tmp_path / "c.safetensors")
    loaded = NoisyClassifier.from_pretrained(tmp_path / "c.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, t), logits)
    with pytest.raises(FileNotFoundError, match="neither a bundled model .* nor a .safetensors file"):
        NoisyClassifier.from_pretrained(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        NoisyClassifier(1, **ENCODER)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(32, 2, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (32,), generator=g)


def test_classifier_training_lowers_the_cross_entropy(tmp_path):
    data, labels = _data()
    data = data + labels[:, None, None, None]  # a learnable signal: the class shifts the image
    torch.manual_seed(0)
    clf = NoisyClassifier(3, **ENCODER)
    trained = train(clf, data, TrainConfig(steps=40, batch_size=8, lr=2e-3, warmup=1, timesteps=50), tmp_path,
                    progress=False, labels=labels)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(clf.eval()(data, torch.zeros(32, dtype=torch.long)), labels)
    assert loss < 0.8 * torch.log(torch.tensor(3.0))  # below the uniform guess's log K
    assert NoisyClassifier.from_pretrained(tmp_path / EMA_WEIGHTS).config == trained.config


def test_label_checks_in_training(tmp_path):
    data, labels = _data()
    config = TrainConfig(steps=1, batch_size=4)
    with pytest.raises(ValueError, match="needs labels: got none"):
        train(UNet(**SMALL, num_classes=3), data, config, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="labels given for an unconditional UNet"):
        train(UNet(**SMALL), data, config, tmp_path / "b", progress=False, labels=labels)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\) for num_classes=2, got \[0, 2\]"):
        train(UNet(**SMALL, num_classes=2), data, config, tmp_path / "c", progress=False, labels=labels)
    with pytest.raises(ValueError, match=r"labels must be int64 \[32\]"):
        train(UNet(**SMALL, num_classes=3), data, config, tmp_path / "d", progress=False, labels=labels[:5])
    with pytest.raises(ValueError, match=r"p_uncond must be a probability in \[0, 1\], got -0.1"):
        TrainConfig(p_uncond=-0.1)


def test_cli_trains_both_models(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert main(["train", "--num-classes", "10", "--p-uncond", "0.2", "--out", str(tmp_path / "cond"),
                 "--steps", "2", *TINY_RUN]) == 0
    model = UNet.from_pretrained(tmp_path / "cond" / EMA_WEIGHTS)
    assert model.num_classes == 10 and read_safetensors(tmp_path / "cond" / CHECKPOINT)[1]["step"] == "2"
    assert main(["train-classifier", "--out", str(tmp_path / "clf"), "--steps", "2", *TINY_RUN]) == 0
    assert NoisyClassifier.from_pretrained(tmp_path / "clf" / EMA_WEIGHTS).config["num_classes"] == 10
    capsys.readouterr()


@pytest.mark.parametrize("args, message", [
    (["train", "--num-classes", "10", "--p-uncond", "1.5"], "p_uncond must be a probability in [0, 1], got 1.5"),
    (["train", "--p-uncond", "0.1"], "--p-uncond applies to class-conditional training only: add --num-classes K"),
    (["train", "--num-classes", "7"], "--num-classes must be the data set's number of classes, 10 for --dataset "
                                      "digits, got 7"),
    (["train", "--num-classes", "0"], "--num-classes: expected a positive integer, got 0"),
    (["train", "--num-classes", "10", "--dataset", "FOLDER"], "--num-classes needs a data set with labels: "
                                                             "--dataset 'FOLDER' is a folder of images without labels"),
    (["train-classifier", "--dataset", "FOLDER"], "train-classifier needs a data set with labels"),
])
def test_bad_training_flags(tmp_path, capsys, args, message):
    pytest.importorskip("sklearn")
    args = [str(tmp_path) if a == "FOLDER" else a for a in args]
    message = message.replace("FOLDER", str(tmp_path))
    try:
        status = main([*args, "--out", str(tmp_path / "run"), "--steps", "1", "--quiet"])
    except SystemExit as exit:  # argparse's own checks
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
