"""Model files (DESIGN §9, files): the configuration covered by the checksum, the same request
giving the same bytes, and a bundled name never shadowed by a local file."""
import json
import warnings

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import ddpm_fast as df
from ddpm_fast.checkpoints import Notice
from ddpm_fast.cli import main

from test_train import _tiny_model as _tiny


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_an_edited_configuration_is_refused(tmp_path):
    _tiny().save_pretrained(tmp_path / "m.safetensors")
    tensors, metadata = _read(tmp_path / "m.safetensors")
    config = json.loads(metadata["ddpm_fast_config"])
    assert config["num_groups"] == 4
    edited = {**metadata, "ddpm_fast_config": json.dumps({**config, "num_groups": 8})}  # the checksums kept
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata=edited)
    with pytest.raises(ValueError, match=r"is corrupt: its metadata \(the configuration\) do not match"):
        df.UNet.from_pretrained(tmp_path / "edited.safetensors")


def test_the_same_weights_give_the_same_bytes(tmp_path):
    # safetensors writes its metadata in a hash map's order, which varies from call to call
    model = _tiny()
    for i in range(8):
        model.save_pretrained(tmp_path / f"{i}.safetensors")
    files = {(tmp_path / f"{i}.safetensors").read_bytes() for i in range(8)}
    assert len(files) == 1
    tensors, metadata = _read(tmp_path / "0.safetensors")
    assert sorted(metadata) == ["ddpm_fast_config", "ddpm_fast_metadata_sha256", "ddpm_fast_tensors_sha256"]


def test_an_identical_reconversion_is_kept(tmp_path, capsys):
    model = _tiny(3)
    model.save_pretrained(tmp_path / "m.safetensors")
    for _ in range(4):
        assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "again.safetensors")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("wrote") and all(line.startswith("kept the identical") for line in out[1:]), out


def test_a_bundled_name_is_not_shadowed_by_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # a user's own folder, say of training images
    with pytest.warns(Notice, match=r"'digits' loads the bundled model digits, not the local digits .* pass ./digits"):
        model = df.UNet.from_pretrained("digits")
    assert model.config == df.UNet.digits().config
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        df.UNet.from_pretrained("./digits")  # a path: the folder itself
    (tmp_path / "digits").rmdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df.UNet.from_pretrained("digits")
