"""Text-to-image generation on a loaded base model, with AUTOMATIC1111-style PNG metadata."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, PngImagePlugin

from .base_models import BaseModel
from .errors import ConfigError
from .weights_io import atomic_write

# A1111 sampler name -> (diffusers scheduler class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
}
_SCHEDULER_ALIASES = {re.sub(r"[^a-z0-9]", "", k.lower()): k for k in SCHEDULERS}
_SCHEDULER_ALIASES.update({"eulerancestral": "Euler a", "dpmpp2mkarras": "DPM++ 2M Karras", "dpmpp2m": "DPM++ 2M"})


def scheduler_name(name: str) -> str:
    """Canonical A1111 sampler name for a user-typed one ('euler_a', 'dpm++ 2m karras', ...)."""
    key = re.sub(r"[^a-z0-9]", "", name.lower().replace("+", "p"))
    canon = _SCHEDULER_ALIASES.get(key) or _SCHEDULER_ALIASES.get(re.sub(r"[^a-z0-9]", "", name.lower()))
    if canon is None:
        raise ConfigError(f"scheduler: unknown '{name}'; choose one of: {', '.join(SCHEDULERS)}")
    return canon


@dataclass
class GenerationRequest:
    """Everything that determines a generated image (besides the model and adapters)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    guidance: float = 7.0
    seed: int = -1  # -1: pick a random seed, recorded in the image
    width: int | None = None  # None: the base model's native resolution
    height: int | None = None
    num_images: int = 1
    scheduler: str = "DPM++ 2M Karras"
    clip_skip: int = 1  # AUTOMATIC1111's numbering: 1 = the text encoder's last layer, 2 = the one before it

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ConfigError("prompt: must be text")
        if not 1 <= int(self.steps) <= 500:
            raise ConfigError(f"steps: must be between 1 and 500, got {self.steps}")
        if not 0.0 <= float(self.guidance) <= 50.0:
            raise ConfigError(f"guidance: must be between 0 and 50, got {self.guidance}")
        if not 1 <= int(self.num_images) <= 64:
            raise ConfigError(f"num_images: must be between 1 and 64, got {self.num_images}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v > 4096 or v % 8):
                raise ConfigError(f"{name}: must be a multiple of 8 between 8 and 4096, got {v}")
        if isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, int) or not 1 <= self.clip_skip <= 12:
            raise ConfigError(f"clip_skip: must be a whole number between 1 and 12 (1: the text encoder's last "
                              f"layer, as AUTOMATIC1111 counts), got {self.clip_skip!r}")
        self.scheduler = scheduler_name(self.scheduler)
        if self.seed is None or int(self.seed) < 0:
            self.seed = int(torch.randint(0, 2**32 - 1, (1,)).item())
        self.seed = int(self.seed)


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    parameters: str  # the A1111 `parameters` text


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's sampler, keeping the model's own noise schedule configuration."""
    import diffusers

    cls_name, extra = SCHEDULERS[scheduler_name(name)]
    current = pipe.scheduler
    if type(current).__name__ == cls_name and all(current.config.get(k) == v for k, v in extra.items()):
        return
    cls = getattr(diffusers, cls_name)
    cfg = {k: v for k, v in current.config.items() if not k.startswith("_")}
    cfg.pop("use_karras_sigmas", None)
    pipe.scheduler = cls.from_config(cfg, **extra)


def clip_skip_arg(model: BaseModel, clip_skip: int, name: str = "clip_skip") -> int | None:
    """diffusers' `clip_skip` (layers left out after the last; None for none) for AUTOMATIC1111's Clip skip N
    (1: the last layer) on `model`: an SDXL model takes its penultimate layers already (A1111 and kohya apply no
    clip skip there), and no more layers can be left out than the text encoder has."""
    if clip_skip == 1:
        return None
    if model.family == "sdxl":
        raise ConfigError(f"{name}: SDXL models already take the text encoders' penultimate layer (AUTOMATIC1111 and "
                          f"kohya apply no clip skip to them): leave it at 1, got {clip_skip}")
    te = getattr(model.pipe, "text_encoder", None)
    layers = getattr(getattr(te, "config", None), "num_hidden_layers", None)
    if layers is not None and clip_skip > layers:
        raise ConfigError(f"{name}: {model.name}'s text encoder has {layers} layers, so clip skip can be at most "
                          f"{layers}, got {clip_skip}")
    return clip_skip - 1


def skipped_embeddings(pipe, prompts: list[str], skip: int, device) -> torch.Tensor:
    """(B, 77, D) embeddings of `prompts` from the text encoder's layer `skip` before the last, through its final
    norm (AUTOMATIC1111's Clip skip `skip + 1`) for an SD 1.x/2.x pipeline; with gradients where the caller has
    them (a text encoder being trained)."""
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    te = pipe.text_encoder
    mask = tok.attention_mask.to(device) if getattr(te.config, "use_attention_mask", False) else None
    hidden = te(tok.input_ids.to(device), attention_mask=mask, output_hidden_states=True).hidden_states[-(skip + 1)]
    norm = next(m for n, m in te.named_modules() if n.endswith("final_layer_norm"))
    return norm(hidden).to(te.dtype)


def format_parameters(req: GenerationRequest, seed: int, width: int, height: int, model: BaseModel,
                      extra: dict[str, str] | None = None) -> str:
    """AUTOMATIC1111's `parameters` text: prompt, negative prompt, then 'Key: value' pairs."""
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    pairs = {
        "Steps": str(req.steps),
        "Sampler": req.scheduler,
        "CFG scale": f"{req.guidance:g}",
        "Seed": str(seed),
        "Size": f"{width}x{height}",
        "Model": model.name,
        "Model family": model.family,
    }
    if req.clip_skip > 1:  # A1111 writes it only when set
        pairs["Clip skip"] = str(req.clip_skip)
    pairs.update(extra or {})
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items()))
    return "\n".join(lines)


def _quote(v: str) -> str:
    return f'"{v}"' if ("," in v or ":" in v) and not v.startswith('"') else v


def parse_parameters(text: str) -> dict[str, str]:
    """Parse A1111 `parameters` text back into a dict ('Prompt', 'Negative prompt', 'Steps', ...)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    out: dict[str, str] = {}
    pairs = re.findall(r'\s*([\w \-/+]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', last)
    if len(pairs) < 3:  # the last line is not a key/value line: all of it is prompt
        pairs, body = [], lines
    else:
        body = lines[:-1]
    neg_idx = next((i for i, ln in enumerate(body) if ln.startswith("Negative prompt:")), None)
    if neg_idx is None:
        out["Prompt"] = "\n".join(body)
    else:
        out["Prompt"] = "\n".join(body[:neg_idx])
        out["Negative prompt"] = "\n".join(body[neg_idx:])[len("Negative prompt:"):].strip()
    for k, v in pairs:
        v = v.strip()
        if v.startswith('"') and v.endswith('"') and len(v) >= 2:
            v = v[1:-1]
        out[k.strip()] = v
    return out


def request_from_parameters(text: str) -> GenerationRequest:
    """Rebuild the request that made an image from its `parameters` text, the prompt as recorded (its
    `<lora:...>` tags where they were, for a stack to apply); pipelines.recall reads the settings."""
    from dataclasses import replace

    from .recall import recall

    return replace(recall(text).request, prompt=parse_parameters(text).get("Prompt", ""))


def generate(
    model: BaseModel,
    req: GenerationRequest,
    on_progress: Callable[[int, int], None] | None = None,
    extra_parameters: dict[str, str] | None = None,
    cross_attention_kwargs: dict | None = None,
    step_hook: Callable[[int], None] | None = None,
) -> list[GeneratedImage]:
    """Generate req.num_images images; image i uses seed req.seed + i (as AUTOMATIC1111 does).

    `step_hook(i)` runs before sampler step i (0-based): before the first UNet call, then after each step.
    """
    pipe = model.pipe
    skip = clip_skip_arg(model, req.clip_skip)
    width = req.width or model.native_resolution
    height = req.height or model.native_resolution
    set_scheduler(pipe, req.scheduler)
    seeds = [req.seed + i for i in range(req.num_images)]
    gen_device = "cpu" if model.device.type == "mps" else model.device
    generators = [torch.Generator(device=gen_device).manual_seed(s) for s in seeds]

    def _cb(p, step, timestep, kw):
        if step_hook is not None:
            step_hook(step + 1)
        if on_progress is not None:
            on_progress(step + 1, req.steps)
        return kw

    if step_hook is not None:
        step_hook(0)
    with torch.inference_mode():
        if skip is None:
            text = dict(prompt=req.prompt, negative_prompt=req.negative_prompt or None)
        else:  # both prompts through the same layer, as A1111 does (diffusers' own clip_skip skips the positive only)
            pe, ne = skipped_embeddings(pipe, [req.prompt, req.negative_prompt], skip, model.device).chunk(2)
            text = dict(prompt_embeds=pe, negative_prompt_embeds=ne)
        out = pipe(
            **text,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance,
            width=width,
            height=height,
            num_images_per_prompt=req.num_images,
            generator=generators,
            callback_on_step_end=_cb,
            cross_attention_kwargs=cross_attention_kwargs,
        )
    results = []
    for img, seed in zip(out.images, seeds):
        params = format_parameters(req, seed, width, height, model, extra_parameters)
        img.info["parameters"] = params
        results.append(GeneratedImage(image=img, seed=seed, parameters=params))
    return results


def save_png(img: GeneratedImage | Image.Image, path: str | os.PathLike, parameters: str | None = None) -> Path:
    """Write a PNG with its `parameters` text chunk, atomically."""
    if isinstance(img, GeneratedImage):
        parameters, img = img.parameters, img.image
    parameters = parameters if parameters is not None else img.info.get("parameters")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=info))
    return path


def output_paths(out: str | os.PathLike, n: int) -> list[Path]:
    """'circle.png' for one image; 'circle-0.png', 'circle-1.png', ... for several."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        out = out.with_suffix(".png") if out.suffix else out / "image.png"
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def read_png_parameters(path: str | os.PathLike) -> str | None:
    with Image.open(path) as im:
        return im.info.get("parameters")


def request_dict(req: GenerationRequest) -> dict:
    return asdict(req)


__all__ = [
    "SCHEDULERS", "GenerationRequest", "GeneratedImage", "generate", "save_png", "output_paths",
    "format_parameters", "parse_parameters", "request_from_parameters", "read_png_parameters",
    "set_scheduler", "scheduler_name", "clip_skip_arg",
]
