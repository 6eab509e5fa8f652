"""Model files in and out: the bundled models, our safetensors (the constructor arguments in
its metadata), weights-only PyTorch state dicts, diffusers UNet2DModel folders and instances,
and atomic saving. Nothing here unpickles code.

The model class is an argument (`cls`: UNet, NoisyClassifier or a subclass), so this module does
not import the model modules, which import it (DESIGN §4: no import cycles).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ._atomic import (CHECKSUM_KEY, METADATA_CHECKSUM_KEY, check_regular, metadata_sha256, safetensors_bytes,
                      tensors_sha256, write_bytes)
from .integrations.diffusers.convert import convert_diffusers_state_dict, unet_config_from_diffusers

BUNDLED_DIR = Path(__file__).resolve().parent / "weights"
CONFIG_KEY = "ddpm_fast_config"


class Notice(UserWarning):
    """Something the user should know that is not an error (the CLI prints it as one `note:` line)."""


class UnverifiedFileWarning(Notice):
    """A file of ours written before its tensor data, or its metadata, carried a checksum:
    loaded with what was not covered unverified."""


def save_pretrained(model, path: str | Path, overwrite: bool = True) -> bool:
    """Write model's weights as safetensors with its constructor arguments (model.config) and the
    sha256 of its tensor data and of its metadata in the metadata, atomically
    (_atomic.save_safetensors)."""
    return write_bytes(path, pretrained_bytes(model), overwrite)


def pretrained_bytes(model) -> bytes:
    """The bytes save_pretrained writes: the same model always gives the same bytes."""
    return safetensors_bytes(model.state_dict(), {CONFIG_KEY: json.dumps(model.config)})


def load_pretrained(cls, name_or_path: str | Path, config: dict | None = None):
    """cls loaded from a bundled model's name, our .safetensors file, a diffusers UNet2DModel
    folder, or a .pt/.pth/.ckpt state dict (torch.load(weights_only=True)); `config` gives the
    constructor arguments of a bare state dict. A bundled name wins over a local file or folder of
    that name, which a path (./digits) loads."""
    bundled = _bundled_name(name_or_path)
    if bundled is not None:
        return _load_safetensors(cls, bundled)
    path = Path(name_or_path)
    if path.is_dir():
        return load_diffusers_folder(cls, path)
    if path.suffix == ".safetensors" and path.is_file():
        return _load_safetensors(cls, path)
    if path.suffix in (".pt", ".pth", ".ckpt") and path.is_file():
        return _load_torch(cls, path, config)
    return _load_safetensors(cls, _bundled(name_or_path, "a .safetensors file, nor a diffusers UNet2DModel folder"))


def load_safetensors(cls, name_or_path: str | Path):
    """cls loaded from a bundled model's name or our .safetensors file (nothing else)."""
    bundled = _bundled_name(name_or_path)
    if bundled is not None:
        return _load_safetensors(cls, bundled)
    path = Path(name_or_path)
    if path.suffix == ".safetensors" and path.is_file():
        return _load_safetensors(cls, path)
    return _load_safetensors(cls, _bundled(name_or_path, "nor a .safetensors file"))


def _bundled_name(name: str | Path) -> Path | None:
    """The bundled file a bare name (a str without a folder) names, or None. A local file or
    folder of that name is not loaded, and a Notice says so: a path (./digits) loads it."""
    bundled = BUNDLED_DIR / f"{name}.safetensors"
    if not isinstance(name, str) or "/" in name or os.sep in name or not bundled.is_file():
        return None
    if Path(name).exists():
        warnings.warn(f"{name!r} loads the bundled model {name}, not the local {name} in {Path.cwd()}: pass ./{name} "
                      f"to load that one", Notice, stacklevel=3)
    return bundled


def _bundled(name: str | Path, alternatives: str) -> Path:
    bundled = BUNDLED_DIR / f"{name}.safetensors"
    if bundled.is_file():
        return bundled
    names = sorted(p.stem for p in BUNDLED_DIR.glob("*.safetensors"))
    raise FileNotFoundError(f"{str(name)!r} is neither a bundled model (bundled: {names or 'none yet'}), "
                            f"{alternatives}")


def read_torch_weights(path: Path):
    """torch.load that never runs pickled code (weights_only=True: only tensors and plain
    containers unpickle); a truncated file or one holding anything else is a ValueError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated files and pickled code both end here
        # one line of our own: torch's message spans lines and advises weights_only=False, which would run the code
        if str(error).startswith("Weights only load failed"):
            raise ValueError(f"{path} is not a readable weights-only PyTorch checkpoint: it holds pickled code or "
                             f"objects other than tensors, refused and never run") from None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a readable weights-only PyTorch checkpoint: {first}") from None


def read_safetensors(path: Path, ours: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a truncated or corrupt one is a ValueError.
    The sha256 of the tensor data (CHECKSUM_KEY) and of the metadata (METADATA_CHECKSUM_KEY),
    where recorded, must match; a file of ours (`ours`) without them loads with an
    UnverifiedFileWarning saying what was not verified."""
    from safetensors import safe_open
    check_regular(path)  # safetensors would block on a FIFO
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except Exception as error:  # safetensors' own error type derives from Exception alone
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    if CHECKSUM_KEY in metadata:
        if tensors_sha256(tensors) != metadata[CHECKSUM_KEY]:
            raise ValueError(f"{path} is corrupt: its tensor data do not match the sha256 its metadata records")
    elif ours:
        warnings.warn(f"{path} records no sha256 of its tensor data (written by an older ddpm_fast): loaded "
                      f"unverified; save it again to add one", UnverifiedFileWarning, stacklevel=2)
    if METADATA_CHECKSUM_KEY in metadata:
        if metadata_sha256(metadata) != metadata[METADATA_CHECKSUM_KEY]:
            raise ValueError(f"{path} is corrupt: its metadata (the configuration) do not match the sha256 they "
                             f"record")
    elif ours and CHECKSUM_KEY in metadata:
        warnings.warn(f"{path} records no sha256 of its metadata (written by an older ddpm_fast): its tensors were "
                      f"verified, its configuration was not; save it again to cover both", UnverifiedFileWarning,
                      stacklevel=2)
    return tensors, metadata


def build_checked(cls, config: dict, state_dict: dict[str, torch.Tensor], source: str):
    """cls(**config) holding `state_dict`. The shapes are compared on the meta device first, so
    a config asking for absurd sizes is refused without allocating them."""
    skeleton(cls, config, source).check_state_dict(state_dict, source)
    return cls(**config).load_checked(state_dict, source)


def skeleton(cls, config: dict, source: str):
    """cls(**config) on the meta device: its shapes without allocating them. Arguments that are
    not cls's, or sizes no tensor can have, are a ValueError naming `source`."""
    try:
        with torch.device("meta"):
            return cls(**config)
    except TypeError as error:  # an unknown or missing argument
        raise ValueError(f"{source}: its configuration are not {cls.__name__} arguments: {error}") from None
    except RuntimeError as error:  # "Storage size calculation overflowed"
        raise ValueError(f"{source}: its configuration asks for tensors too large to exist "
                         f"({str(error).strip().splitlines()[0]}): {config}") from None


def from_diffusers(cls, model):
    """cls with the weights of a diffusers UNet2DModel instance, in its dtype."""
    config = unet_config_from_diffusers(dict(model.config))
    state_dict = convert_diffusers_state_dict(model.state_dict(), len(config["ch_mult"]))
    return cls(**config).load_checked(state_dict, f"diffusers {type(model).__name__}").to(next(model.parameters()).dtype)


def load_diffusers_folder(cls, folder: str | Path):
    """cls from a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors
    or .bin, the latter through torch.load(weights_only=True))."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a diffusers UNet2DModel folder")
    try:
        config = unet_config_from_diffusers(json.loads(config_path.read_text()))
    except ValueError as error:  # json's decode error included
        raise ValueError(f"{config_path}: {error}") from error
    weights = folder / "diffusion_pytorch_model.safetensors"
    if weights.is_file():
        state_dict = read_safetensors(weights)[0]
    elif (folder / "diffusion_pytorch_model.bin").is_file():
        weights = folder / "diffusion_pytorch_model.bin"
        state_dict = read_torch_weights(weights)
    else:
        raise FileNotFoundError(f"{folder} has no diffusion_pytorch_model.safetensors or .bin")
    return build_checked(cls, config, convert_diffusers_state_dict(state_dict, len(config["ch_mult"])), str(weights))


def _load_torch(cls, path: Path, config: dict | None):
    content = read_torch_weights(path)
    if isinstance(content, dict) and "state_dict" in content:
        config = content.get("config", config)
        content = content["state_dict"]
    if config is None:
        raise ValueError(f"{path} holds a bare state dict: pass config= (e.g. UNet.ddpm_cifar10().config)")
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its config must be a dict of UNet arguments, got {type(config).__name__}")
    return build_checked(cls, config, content, str(path))


def _load_safetensors(cls, path: Path):
    state_dict, metadata = read_safetensors(path, ours=True)
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path} has no {CONFIG_KEY!r} metadata: not a ddpm_fast checkpoint")
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except ValueError as error:
        raise ValueError(f"{path}: its {CONFIG_KEY!r} metadata are not UNet arguments (not JSON: {error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: its {CONFIG_KEY!r} metadata must be a dict of UNet arguments, got {config!r:.80}")
    return build_checked(cls, config, state_dict, str(path))
