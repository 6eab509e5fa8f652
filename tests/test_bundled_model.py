"""The bundled digits model (ddpm_fast/weights/digits.safetensors): present, small, the fused
CPU path samples it as the reference does, and it passes the digits quality gate (DESIGN §6)
(benchmarks/digits_quality.py) on 500 DDIM-100 samples, a gate that real digits pass and an
untrained network fails."""
import importlib.util
from pathlib import Path

import numpy as np
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
    clf, accuracy, real_confident = quality.classifier(real, labels)
    assert accuracy >= 0.97, f"the gate's classifier must reach 97% on held-out digits, got {accuracy:.3f}"
    # calibrated: held-out real digits meet the confidence criterion the samples must meet
    assert real_confident >= quality.CONFIDENT_SHARE, real_confident
    return clf, real


def test_bundled_weights_are_small_and_load():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size <= 10 * 2 ** 20
    model = df.UNet.from_pretrained("digits")
    assert (model.in_channels, model.resolution) == (1, 16)


def test_real_digits_come_back_exactly_from_the_training_resolution():
    from ddpm_fast.cli.data import digits_dataset
    real, _ = quality.real_digits()
    assert np.abs(quality.as_digits(digits_dataset(16)) - real).max() < 1e-9


def test_quality_gate(measured):
    # The gate as DESIGN §6 states it: 500 samples, DDIM 100 steps, the fused CPU path.
    clf, real = measured
    model = df.UNet.from_pretrained("digits")
    samples = df.Sampler(model, df.NoiseSchedule.linear(1000), method="ddim", steps=100, backend="cpu").sample(
        500, seed=0, batch_size=250)
    result = quality.gate(samples, clf, real)
    assert quality.passes(result), result


def test_an_untrained_model_fails(measured):
    clf, real = measured
    torch.manual_seed(0)
    model = df.UNet.from_pretrained("digits")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    samples = df.Sampler(model, df.NoiseSchedule.linear(1000), method="ddim", steps=10).sample(100, seed=0)
    result = quality.gate(samples, clf, real)
    # The calibrated classifier calls most of this noise a confident "1" (0.85 at ≥ 0.8 here):
    # the class-share criterion is what rejects a collapsed or untrained model.
    assert not quality.passes(result) and min(result["class_shares"]) < quality.CLASS_SHARE, result


def test_fused_cpu_sampler_equals_the_reference_on_the_bundled_model():
    model = df.UNet.from_pretrained("digits")
    schedule = df.NoiseSchedule.linear(1000)
    fused = df.Sampler(model, schedule, method="ddim", steps=20, backend="cpu").sample(8, seed=3)
    reference = df.Sampler(model, schedule, method="ddim", steps=20, backend="reference").sample(8, seed=3)
    assert relative_error(fused, reference) <= 1e-5
