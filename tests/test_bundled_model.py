"""The bundled digits model (ddpm_fast/weights/digits.safetensors): present, small, the fused
CPU path samples it as the reference does, and its quality does not regress.

Issue 6's full quality gate (benchmarks/digits_quality.py: ≥ 90% of 500 DDIM-100 samples
classified with confidence ≥ 0.8) is measured there and reported; these tests keep a floor
under what the shipped weights reach, and check that the measurement can fail."""
import importlib.util
from pathlib import Path

import pytest
import torch

import ddpm_fast as df
from helpers import relative_error

WEIGHTS = Path(df.__file__).parent / "weights" / "digits.safetensors"
_spec = importlib.util.spec_from_file_location(
    "digits_quality", Path(__file__).resolve().parents[1] / "benchmarks" / "digits_quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


@pytest.fixture(scope="module")
def measured():
    pytest.importorskip("sklearn")
    real, labels = quality.real_digits()
    clf, held_out = quality.classifier(real, labels)
    assert held_out >= 0.97, f"the gate's classifier must reach 97% on held-out digits, got {held_out:.3f}"
    return clf, real


def test_bundled_weights_are_small_and_load():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size <= 10 * 2 ** 20
    model = df.UNet.from_pretrained("digits")
    assert (model.in_channels, model.resolution) == (1, 16)


def test_quality_does_not_regress(measured):
    clf, real = measured
    model = df.UNet.from_pretrained("digits")
    samples = df.Sampler(model, df.NoiseSchedule.linear(1000), method="ddim", steps=50, backend="cpu").sample(
        200, seed=0)
    result = quality.gate(samples, clf, real)
    assert result["confident"] >= 0.70 and min(result["class_shares"]) >= 0.03 and result["copies"] <= 0.05, result


def test_an_untrained_model_fails(measured):
    clf, real = measured
    torch.manual_seed(0)
    model = df.UNet.from_pretrained("digits")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    samples = df.Sampler(model, df.NoiseSchedule.linear(1000), method="ddim", steps=10).sample(100, seed=0)
    assert not quality.passes(quality.gate(samples, clf, real))
    assert quality.gate(samples, clf, real)["confident"] < 0.70


def test_fused_cpu_sampler_equals_the_reference_on_the_bundled_model():
    model = df.UNet.from_pretrained("digits")
    schedule = df.NoiseSchedule.linear(1000)
    fused = df.Sampler(model, schedule, method="ddim", steps=20, backend="cpu").sample(8, seed=3)
    reference = df.Sampler(model, schedule, method="ddim", steps=20, backend="reference").sample(8, seed=3)
    assert relative_error(fused, reference) <= 1e-5
