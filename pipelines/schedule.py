"""What a base model predicts and on which noise schedule: epsilon or v-prediction, and zero terminal SNR.

A model trained to predict v (SD 2.x 768-v, NoobAI-XL V-Pred and other v-prediction SDXL fine-tunes) draws noise
when it is sampled as an epsilon model, and a zero-terminal-SNR model (Lin et al. 2024, "Common Diffusion Noise
Schedules and Sample Steps are Flawed") draws grey, washed-out pictures on the usual schedule. A diffusers folder
says both in its scheduler config; a single-file checkpoint says them the way AUTOMATIC1111 and ComfyUI read them:

- SDXL files mark v-prediction with an empty `v_pred` tensor and zero terminal SNR with a `ztsnr` one (ComfyUI's
  `supported_models.SDXL.model_type`, AUTOMATIC1111's `ztsnr`); files written here carry them too;
- a `NAME.yaml` beside the file with `parameterization: "v"` (AUTOMATIC1111's model config);
- `modelspec.prediction_type` in the file's metadata ("v" or "epsilon", the SAI model spec's values);
- for an SD 2.x file loaded with diffusers' standard config (which takes every SD 2.x file for the 768-v model),
  its weights, as ComfyUI tells SD 2.1 from SD 2.1-base.

`--prediction-type` and `--zero-terminal-snr` (ComfyUI's *ModelSamplingDiscrete* node, A1111's *Noise schedule*
setting) override what the file says.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")
_PREDICTION_ALIASES = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
                       "v-prediction": "v_prediction", "vpred": "v_prediction", "v_pred": "v_prediction"}
V_PRED_KEY = "v_pred"  # ComfyUI / AUTOMATIC1111: an SDXL checkpoint holding this tensor predicts v
ZTSNR_KEY = "ztsnr"  # ... and one holding this one was trained with zero terminal SNR
NOISE_SCHEDULE_KEY = "Noise Schedule"  # AUTOMATIC1111's infotext key of its "Noise schedule for sampling" setting
ZERO_TERMINAL_SNR = "Zero Terminal SNR"  # ... and its value
# ComfyUI's SD 2.x test: the last output block's first norm bias spreads wide in the 768-v model only
_SD2_PROBE_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
_SD2_V_STD = 0.09
# the last step's ᾱ on a zero-terminal-SNR schedule for samplers that divide by it (as diffusers' Euler does)
_ZSNR_LAST_ALPHA_CUMPROD = 2.0 ** -24


def prediction_type_name(value: str, field: str = "prediction_type") -> str:
    """'epsilon' or 'v_prediction' for any usual spelling ('v', 'eps', 'v-prediction'); ConfigError otherwise."""
    canon = _PREDICTION_ALIASES.get(str(value).strip().lower())
    if canon is None:
        raise ConfigError(f"{field}: must be epsilon or v_prediction (v), got {value!r}")
    return canon


def modelspec_prediction_type(prediction_type: str | None) -> str | None:
    """The SAI model spec's value ('epsilon' / 'v') for a scheduler's prediction type."""
    if not prediction_type:
        return None
    return {"epsilon": "epsilon", "v_prediction": "v"}.get(prediction_type)


def _yaml_parameterization(path: Path) -> str | None:
    """AUTOMATIC1111's model config beside a checkpoint (`NAME.yaml`): its `parameterization`, if it has one."""
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    try:
        text = yaml_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    m = re.search(r"^\s*parameterization:\s*[\"']?([A-Za-z_-]+)", text, re.MULTILINE)
    return m.group(1) if m else None


def file_schedule(path: Path, keys: Iterable[str], meta: Mapping[str, str], family: str,
                  standard_config: bool) -> tuple[str | None, bool | None, str]:
    """(prediction type, zero terminal SNR, where that was read) from a single-file checkpoint's own marks.

    None where the file says nothing (its config decides). `standard_config`: the file is loaded with diffusers'
    standard config for its layout, which cannot tell SD 2.1 (v) from SD 2.1-base (epsilon); then the weights do.
    """
    keys = set(keys)
    pred, zsnr, why = None, None, []
    if ZTSNR_KEY in keys:
        zsnr = True
        why.append(f"its '{ZTSNR_KEY}' tensor")
    parameterization = _yaml_parameterization(path)
    if V_PRED_KEY in keys:
        pred = "v_prediction"
        why.append(f"its '{V_PRED_KEY}' tensor")
    elif parameterization is not None and parameterization.lower() in _PREDICTION_ALIASES:
        pred = _PREDICTION_ALIASES[parameterization.lower()]
        why.append(f"{path.with_suffix('.yaml').name} (parameterization: {parameterization})")
    elif str(meta.get("modelspec.prediction_type", "")).strip().lower() in _PREDICTION_ALIASES:
        pred = _PREDICTION_ALIASES[meta["modelspec.prediction_type"].strip().lower()]
        why.append(f"its metadata (modelspec.prediction_type: {meta['modelspec.prediction_type']})")
    elif standard_config and family == "sd2" and _SD2_PROBE_KEY in keys and (std := _sd2_probe_std(path)) is not None:
        pred = "v_prediction" if std > _SD2_V_STD else "epsilon"
        why.append("its weights (SD 2.1 768-v or SD 2.1-base, told apart as ComfyUI does)")
    return pred, zsnr, " and ".join(why)


def _sd2_probe_std(path: Path) -> float | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            t = f.get_tensor(_SD2_PROBE_KEY).float()
    except Exception:  # noqa: BLE001 - an unreadable tensor: no evidence either way (diffusers' guess stays)
        return None
    return float(t.std(unbiased=False))


def marker_tensors(prediction_type: str | None, zero_terminal_snr: bool) -> dict[str, "torch.Tensor"]:
    """The empty tensors that tell AUTOMATIC1111 and ComfyUI a checkpoint's schedule (written into single files)."""
    import torch

    out = {}
    if prediction_type == "v_prediction":
        out[V_PRED_KEY] = torch.tensor([])
    if zero_terminal_snr:
        out[ZTSNR_KEY] = torch.tensor([])
    return out


def _init_params(cls) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(inspect.unwrap(cls.__init__)).parameters


def zero_snr_betas(config: Mapping) -> "torch.Tensor":
    """The model's betas rescaled to zero terminal SNR (Lin et al. 2024, algorithm 1), with the last ᾱ at 2^-24
    rather than 0, so that samplers which divide by ᾱ (sigma-based ones) see a large but finite last sigma."""
    import torch
    from diffusers import DDPMScheduler

    plain = {k: v for k, v in config.items() if not k.startswith("_")}
    plain["rescale_betas_zero_snr"] = True
    ac = DDPMScheduler.from_config(plain).alphas_cumprod.clone().double()
    ac[-1] = _ZSNR_LAST_ALPHA_CUMPROD
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return (1 - alphas).float()


def sampler_config(cls, own: Mapping, extra: Mapping, sampler: str) -> dict:
    """The config to build sampler class `cls` from, on the model's own schedule `own` (prediction type, zero
    terminal SNR) with the sampler's own options `extra`. On a zero-terminal-SNR schedule every sampler starts from
    the last timestep (trailing spacing, as the paper asks); one that cannot take the schedule is refused."""
    config = {**own, **extra}
    if not own.get("rescale_betas_zero_snr"):
        return config
    params = _init_params(cls)
    if "timestep_spacing" in params and "timestep_spacing" not in extra:
        config["timestep_spacing"] = "trailing"
    if "rescale_betas_zero_snr" in params:
        return config
    if "trained_betas" in params:
        config.pop("rescale_betas_zero_snr")
        config["trained_betas"] = zero_snr_betas(own).tolist()
        return config
    raise ConfigError(f"scheduler: {sampler} cannot sample a zero-terminal-SNR schedule; use Euler, Euler a, "
                      f"DPM++ 2M, DDIM or UniPC")


def model_schedule(pipe) -> tuple[str, bool]:
    """(prediction type, zero terminal SNR) of a loaded pipeline's own scheduler."""
    cfg = pipe.scheduler.config
    return str(cfg.get("prediction_type", "epsilon")), bool(cfg.get("rescale_betas_zero_snr", False))


def apply_schedule(pipe, prediction_type: str | None = None, zero_terminal_snr: bool | None = None) -> None:
    """Set the pipeline's own scheduler to predict `prediction_type` on (or off) a zero-terminal-SNR schedule; None
    keeps what it has. A scheduler class that cannot carry the zero-SNR option is replaced by DDIM, the paper's
    sampler, so that the option stays in the model's config (saved with it, read by training and every sampler)."""
    from diffusers import DDIMScheduler

    pred, zsnr = model_schedule(pipe)
    pred = prediction_type_name(prediction_type) if prediction_type is not None else pred
    zsnr = bool(zero_terminal_snr) if zero_terminal_snr is not None else zsnr
    if (pred, zsnr) == model_schedule(pipe):
        return
    cls = type(pipe.scheduler)
    if zsnr and "rescale_betas_zero_snr" not in _init_params(cls):
        cls = DDIMScheduler
    own = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    own.update(prediction_type=pred, rescale_betas_zero_snr=zsnr)
    if zsnr:
        own["timestep_spacing"] = "trailing"
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.scheduler = cls.from_config(own)
    finally:
        diffusers_logging.set_verbosity(level)


def schedule_label(pipe) -> str:
    """'v-prediction, zero terminal SNR' and the like, for messages."""
    pred, zsnr = model_schedule(pipe)
    label = "v-prediction" if pred == "v_prediction" else pred
    return f"{label}, zero terminal SNR" if zsnr else label
