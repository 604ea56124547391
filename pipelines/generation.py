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
        out = pipe(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
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
    "set_scheduler", "scheduler_name",
]
