"""A separate VAE for a base model: AUTOMATIC1111's "SD VAE" setting and ComfyUI's Load VAE node.

Many SD 1.x models ship with a VAE that washes out colours, and users swap in another one
(`vae-ft-mse-840000-ema-pruned.safetensors`, an anime model's own VAE). Such a file holds the VAE alone, in
the original (LDM) key layout, with or without the `first_stage_model.` prefix, as .safetensors (or a pickle,
refused unless allowed); a diffusers-layout file or a diffusers `AutoencoderKL` folder works too. The VAE takes
the base model's own VAE config (its scaling factor included), as A1111 does, and must fit its shapes (SD 1.x
and SDXL VAEs share them, so one family's VAE is not refused on the other).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from .errors import ModelLoadError
from .single_file import VAE_PREFIX, vae_to_ldm
from .weights_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, load_safetensors

VAE_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES)
AUTOMATIC = "Automatic"  # A1111's word for the model's own VAE
_KEEP_LOADED = 2  # other VAEs kept in memory per model, besides its own


def vae_files(folder: str | os.PathLike) -> dict[str, Path]:
    """The VAEs in a folder (A1111's `models/VAE`): files with a weights suffix and diffusers VAE folders, by
    name (the file name, as A1111 records it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if (p.is_file() and p.suffix.lower() in VAE_SUFFIXES) or (p.is_dir() and (p / "config.json").is_file()):
            out[p.name] = p
    return out


def load_vae(path: str | os.PathLike, like, allow_pickle: bool = False):
    """The VAE at `path` as an AutoencoderKL shaped, placed and typed like `like` (the base model's VAE, whose
    config, scaling factor included, it keeps: a diffusers folder's own config.json is not taken either)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a VAE folder (no config.json)")
        weights = [path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                   if (path / n).is_file()]
        if not weights:
            raise ModelLoadError(f"{path}: a VAE folder without its weights (diffusion_pytorch_model.safetensors)")
        path = weights[0]
    elif not path.is_file():
        raise ModelLoadError(f"{path}: no such file or folder")
    if path.suffix.lower() not in VAE_SUFFIXES:
        raise ModelLoadError(f"{path.name}: not a weights file (.safetensors, or with --allow-pickle .pt/.ckpt)")
    sd, _ = load_safetensors(path, allow_pickle=allow_pickle, check_finite=True)
    vae = copy.deepcopy(like)  # the base's config, device and dtype
    vae.load_state_dict(_as_diffusers(sd, like, path))
    return vae.eval().requires_grad_(False)


def _as_diffusers(sd: dict[str, torch.Tensor], like, path: Path) -> dict[str, torch.Tensor]:
    """`sd` (LDM or diffusers names) under the diffusers names of `like`'s weights."""
    sd = {k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k: v for k, v in sd.items()
          if not k.startswith(("loss.", "model_ema."))}
    own = like.state_dict()
    if set(own) <= set(sd):  # already diffusers' layout
        names = {k: k for k in own}
    else:  # LDM names, from the same mapping that writes single-file checkpoints
        names = {ldm: k for k, v in own.items() for ldm in vae_to_ldm(like, {k: v})}
        missing = [n for n in names if n not in sd]
        if missing:
            raise ModelLoadError(f"{path.name}: not a VAE this model can use: {len(missing)} of its {len(names)} "
                                 f"weights are missing (e.g. '{missing[0]}')")
    out = {}
    for name, k in names.items():
        t = sd[name]
        if t.numel() != own[k].numel():
            raise ModelLoadError(f"{path.name}: weight '{name}' has shape {tuple(t.shape)}, this model's VAE needs "
                                 f"{tuple(own[k].shape)}: a VAE made for another kind of model")
        out[k] = t.reshape(own[k].shape).to(own[k].dtype)
    return out


def use_vae(model, path: str | os.PathLike | None, allow_pickle: bool = False) -> None:
    """Decode (and encode) with the VAE at `path` from now on; None: the model's own again. Loaded VAEs stay
    cached on the model (a few), so switching back and forth reads each file once."""
    cache = model.__dict__.setdefault("_vaes", {})
    own = cache.setdefault(None, model.pipe.vae)
    if path is None:
        if model.pipe.vae is not own:
            model.pipe.vae = own
        model.vae_name = None
        return
    key = str(Path(path).resolve())
    vae = cache.get(key)
    if vae is None:
        vae = load_vae(path, own, allow_pickle)
        while len(cache) > _KEEP_LOADED:  # the oldest other VAE goes (never the model's own)
            cache.pop(next(k for k in cache if k is not None))
        cache[key] = vae
    model.pipe.vae = vae
    model.vae_name = Path(path).name


__all__ = ["AUTOMATIC", "VAE_SUFFIXES", "load_vae", "use_vae", "vae_files"]
