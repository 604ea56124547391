"""Load a Stable Diffusion base model from a diffusers folder, a single-file checkpoint or a hub id.

The family (sd1, sd2, sdxl) is detected from the weights' shapes and structure, never from a
file name. Pickle files are refused unless allow_pickle=True.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelLoadError
from .weights_io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, load_pickle, read_header, refuse_pickle

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BASE = Path(os.environ.get("LORA_STUDIO_BASE", ROOT / "sample_data" / "toy-sd"))
FAMILIES = ("sd1", "sd2", "sdxl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class BaseModel:
    """A loaded base model and what we know about it."""

    pipe: object  # a diffusers StableDiffusionPipeline / StableDiffusionXLPipeline
    family: str
    source: str
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    vae_name: str | None = None  # a separate VAE in use (pipelines.vae.use_vae), recorded as A1111's "VAE"
    # where a single file's v-prediction / zero terminal SNR was read from, when that changed its config's
    schedule_note: str | None = None

    @property
    def prediction_type(self) -> str:
        """'epsilon' or 'v_prediction': what the UNet predicts (its scheduler config's)."""
        return str(self.pipe.scheduler.config.get("prediction_type", "epsilon"))

    @property
    def zero_terminal_snr(self) -> bool:
        """Trained on a zero-terminal-SNR schedule (Lin et al. 2024): sampled on it too."""
        return bool(self.pipe.scheduler.config.get("rescale_betas_zero_snr", False))

    @property
    def native_resolution(self) -> int:
        unet = self.pipe.unet
        return int(unet.config.sample_size) * int(self.pipe.vae_scale_factor)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def family_from_configs(unet_cfg: dict, text_cfg: dict | None, has_second_encoder: bool) -> str:
    """Family from component configs (which describe the weights' shapes)."""
    if has_second_encoder or unet_cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    ctx = unet_cfg.get("cross_attention_dim")
    act = (text_cfg or {}).get("hidden_act")
    # SD 2.x uses an OpenCLIP ViT-H text encoder (1024 wide, gelu); SD 1.x uses CLIP ViT-L (quick_gelu)
    if ctx == 1024 or act == "gelu":
        return "sd2"
    return "sd1"


def detect_family(pipe) -> str:
    """Family of a loaded pipeline, from its modules' actual weight shapes."""
    te2 = getattr(pipe, "text_encoder_2", None)
    unet = pipe.unet
    cfg = dict(unet.config)
    k = next((m for n, m in unet.named_modules() if n.endswith("attn2.to_k")), None)
    if k is not None:
        cfg["cross_attention_dim"] = k.weight.shape[1]
    te = getattr(pipe, "text_encoder", None)
    return family_from_configs(cfg, dict(te.config.to_dict()) if te is not None else None, te2 is not None)


def _folder_family(folder: Path) -> str:
    try:
        unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{folder}: not a Stable Diffusion pipeline folder (no unet/config.json)") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{folder / 'unet' / 'config.json'}: invalid JSON ({e})") from None
    te_path = folder / "text_encoder" / "config.json"
    text_cfg = json.loads(te_path.read_text()) if te_path.exists() else None
    return family_from_configs(unet_cfg, text_cfg, (folder / "text_encoder_2").is_dir())


def _pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _check_folder_weights(folder: Path, allow_pickle: bool) -> bool:
    """True when safetensors weights are present; refuse pickle-only folders unless allowed."""
    has_st = any(folder.rglob(f"*{SAFETENSORS_SUFFIX}"))
    if not has_st:
        pickles = [p for p in folder.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            refuse_pickle(pickles[0], allow_pickle)
        elif not allow_pickle:
            raise ModelLoadError(f"{folder}: no .safetensors weights found")
    return has_st


def _load_folder(folder: Path, allow_pickle: bool, dtype: torch.dtype):
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"{folder}: not a diffusers pipeline folder (no model_index.json)")
    family = _folder_family(folder)
    use_st = _check_folder_weights(folder, allow_pickle)
    cls = _pipeline_class(family)
    try:
        pipe = cls.from_pretrained(
            folder, dtype=dtype, use_safetensors=use_st, local_files_only=True,
            safety_checker=None, requires_safety_checker=False,
        ) if family != "sdxl" else cls.from_pretrained(
            folder, dtype=dtype, use_safetensors=use_st, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(f"{folder}: could not load the pipeline ({e})") from None
    return pipe, family


def _load_file(path: Path, allow_pickle: bool, dtype: torch.dtype, config: str | None):
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        refuse_pickle(path, allow_pickle)
        keys = list(load_pickle(path))  # CorruptWeightsError naming the file for an empty/corrupt/foreign one
    elif suffix == SAFETENSORS_SUFFIX:
        try:
            header, _ = read_header(path)
        except Exception as e:  # CorruptWeightsError / FileNotFoundError already name the file
            raise ModelLoadError(str(e)) from None
        keys = [k for k in header if k != "__metadata__"]
    else:
        raise ModelLoadError(f"{path}: unsupported file type '{suffix}' (expected .safetensors)")
    from .single_file import detect_family_from_single_file_keys, load_single_file

    family = detect_family_from_single_file_keys(keys, path)
    pipe = load_single_file(path, _pipeline_class(family), config_dir=config, dtype=dtype,
                            tokenizer_dir=_tokenizer_dir_for(config), allow_pickle=allow_pickle)
    return pipe, family


def _tokenizer_dir_for(config: str | None) -> Path | None:
    """Tokenizer for single files that embed their own configs: the config folder's, else the toy model's.

    The embedded toy model's tokenizer is the one every file exported from it was trained with.
    """
    if config and (Path(config) / "tokenizer").is_dir():
        return Path(config)
    return DEFAULT_BASE if (DEFAULT_BASE / "tokenizer").is_dir() else None


def load_base(
    source: str | os.PathLike | None = None,
    *,
    allow_pickle: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    config: str | None = None,
    prediction_type: str | None = None,
    zero_terminal_snr: bool | None = None,
) -> BaseModel:
    """Load a base model from a diffusers folder, a single-file checkpoint or a hub id.

    `config` is an optional diffusers config folder for single-file checkpoints whose shapes are
    not a standard SD 1.x/2.x/XL layout. `prediction_type` ('epsilon' / 'v_prediction') and
    `zero_terminal_snr` override what the model says of its schedule (None: keep it; see pipelines.schedule).
    """
    from .schedule import apply_schedule, prediction_type_name

    if prediction_type is not None:
        prediction_type = prediction_type_name(prediction_type)
    src = str(source) if source is not None else str(DEFAULT_BASE)
    dev = torch.device(device) if device is not None else default_device()
    dt = dtype or default_dtype(dev)
    path = Path(src).expanduser()
    if path.is_dir():
        pipe, family = _load_folder(path, allow_pickle, dt)
        name = path.name
    elif path.is_file():
        pipe, family = _load_file(path, allow_pickle, dt, config)
        name = path.stem
    elif _HUB_ID.match(src) and not src.startswith((".", "/", "~")) and path.suffix == "":
        pipe, family = _load_hub(src, allow_pickle, dt)
        name = src
    else:
        raise ModelLoadError(f"{src}: no such file or folder (and not a hub id like 'owner/model')")
    pipe.to(dev)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    note = pipe.__dict__.pop("_schedule_note", None)
    if prediction_type is not None or zero_terminal_snr is not None:
        apply_schedule(pipe, prediction_type, zero_terminal_snr)
        note = None  # the caller's choice, not something read from the file
    return BaseModel(pipe=pipe, family=family, source=src, name=name, device=dev, dtype=dt, schedule_note=note)


def _load_hub(repo_id: str, allow_pickle: bool, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(repo_id, dtype=dtype, use_safetensors=not allow_pickle)
    except Exception as e:  # noqa: BLE001 - network and hub errors come in many types
        raise ModelLoadError(f"{repo_id}: could not load from the hub ({type(e).__name__}: {e})") from None
    if not hasattr(pipe, "unet"):
        raise ModelLoadError(f"{repo_id}: not a UNet Stable Diffusion pipeline ({type(pipe).__name__})")
    return pipe, detect_family(pipe)
