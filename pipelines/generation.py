"""Text-to-image generation on a loaded base model, with AUTOMATIC1111-style PNG metadata."""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, PngImagePlugin

from .base_models import BaseModel
from .errors import ConfigError
from .prompts import encode as encode_prompts
from .prompts import encoder_hidden, needs_syntax
from .prompt_editing import at_step, schedule as prompt_schedule
from .embeddings import mentions, used_hashes
from .schedule import NOISE_SCHEDULE_KEY, ZERO_TERMINAL_SNR
from .weights_io import atomic_write

from .samplers import SCHEDULERS, scheduler_name  # noqa: F401 - re-exported: the sampler list lives there

HIRES_UPSCALERS = ("Latent", "Lanczos")


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
    # AUTOMATIC1111's Hires fix: the image is made at width x height, enlarged hires_scale times and drawn again
    # from it (img2img at denoising_strength) with hires_steps steps (0: steps); 1 = off
    hires_scale: float = 1.0
    hires_steps: int = 0
    hires_upscaler: str = "Latent"  # Latent (the latents enlarged, A1111's default) or Lanczos (the picture)
    denoising_strength: float = 0.7  # how much of the picture the second pass (or img2img) draws anew
    # img2img: the picture to start from (a file path or a PIL image), stretched to width x height; like
    # AUTOMATIC1111, the parameters record its denoising strength but not the picture
    init_image: Any = None
    # inpainting (with init_image): white where the picture is drawn anew, black where it stays; blurred by
    # mask_blur pixels (A1111's default 4). Outside the mask the result is the starting picture itself.
    mask_image: Any = None
    mask_blur: int = 4
    # AUTOMATIC1111's variation seed ("Extra"): each image's starting noise is its seed's, moved towards the noise
    # of subseed + i by subseed_strength (spherical interpolation); the images then share the seed
    subseed: int = -1  # -1: a random one, recorded in the image
    subseed_strength: float = 0.0
    # A1111's Tiling: every convolution of the UNet and the VAE pads around the picture's edges (circular), so the
    # picture continues across them and tiles seamlessly (textures, patterns)
    tiling: bool = False
    # CFG rescale (Lin et al. 2024; the A1111 extension's "CFG Rescale", ComfyUI's RescaleCFG): the guided prediction
    # is scaled back towards the spread of the prompt's own, by this share (0: off; 0.7 the paper's), against the
    # over-exposed pictures high CFG gives on v-prediction and zero-terminal-SNR models
    cfg_rescale: float = 0.0
    # A1111's "Noise schedule for sampling": True samples on a zero-terminal-SNR schedule, False on the usual one,
    # None on the model's own (a ztsnr model's is zero terminal SNR)
    zero_terminal_snr: bool | None = None
    # A1111's Batch size: the images are made this many at a time (0: all at once), so a large number of them
    # fits in a GPU's memory; the same seeds give the same images either way
    batch_size: int = 0

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
        if not 1.0 <= float(self.hires_scale) <= 4.0:
            raise ConfigError(f"hires_scale: must be between 1 (off) and 4, got {self.hires_scale}")
        if isinstance(self.hires_steps, bool) or not isinstance(self.hires_steps, int) or not 0 <= self.hires_steps <= 500:
            raise ConfigError(f"hires_steps: must be a whole number between 0 (the same as steps) and 500, got "
                              f"{self.hires_steps!r}")
        if not 0.0 < float(self.denoising_strength) <= 1.0:
            raise ConfigError(f"denoising_strength: must be above 0 and at most 1, got {self.denoising_strength}")
        up = next((u for u in HIRES_UPSCALERS if u.lower() == str(self.hires_upscaler).strip().lower()), None)
        if up is None:
            raise ConfigError(f"hires_upscaler: must be one of {', '.join(HIRES_UPSCALERS)}, got "
                              f"'{self.hires_upscaler}'")
        self.hires_upscaler = up
        if isinstance(self.mask_blur, bool) or not isinstance(self.mask_blur, int) or not 0 <= self.mask_blur <= 64:
            raise ConfigError(f"mask_blur: must be a whole number of pixels between 0 and 64, got {self.mask_blur!r}")
        if self.mask_image is not None and self.init_image is None:
            raise ConfigError("mask_image: a mask says where to draw anew on a starting picture: give init_image too")
        if self.init_image is not None and self.hires_scale > 1:
            raise ConfigError("hires_scale: Hires fix enlarges an image made from the prompt; starting from an "
                              "image (img2img), set the width and height wanted instead (as AUTOMATIC1111's img2img)")
        self.scheduler = scheduler_name(self.scheduler)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or not 0 <= self.batch_size <= 64:
            raise ConfigError(f"batch_size: images made at a time must be a whole number between 0 (all at once) and "
                              f"64, got {self.batch_size!r}")
        if isinstance(self.cfg_rescale, bool) or not 0.0 <= float(self.cfg_rescale) <= 1.0:
            raise ConfigError(f"cfg_rescale: the share of CFG rescale must be between 0 and 1, got {self.cfg_rescale!r}")
        self.cfg_rescale = float(self.cfg_rescale)
        if self.zero_terminal_snr is not None and not isinstance(self.zero_terminal_snr, bool):
            raise ConfigError(f"zero_terminal_snr: must be true, false or unset (the model's own), got "
                              f"{self.zero_terminal_snr!r}")
        if self.seed is None or int(self.seed) < 0:
            self.seed = int(torch.randint(0, 2**32 - 1, (1,)).item())
        self.seed = int(self.seed)
        if not 0.0 <= float(self.subseed_strength) <= 1.0:
            raise ConfigError(f"subseed_strength: the variation strength must be between 0 and 1, got "
                              f"{self.subseed_strength}")
        if self.subseed_strength > 0:
            if self.init_image is not None:
                raise ConfigError("subseed_strength: a variation seed varies the starting noise of an image made "
                                  "from the prompt; starting from an image (img2img), set it to 0")
            if self.subseed is None or int(self.subseed) < 0:
                self.subseed = int(torch.randint(0, 2**32 - 1, (1,)).item())
        self.subseed = int(self.subseed if self.subseed is not None else -1)


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    parameters: str  # the A1111 `parameters` text
    size: tuple[int, int] | None = None  # the recorded Size: the first pass's, before a Hires fix (None: image's)
    subseed: int | None = None  # its variation seed, when it has one
    interrupted: int | None = None  # interrupted (A1111's Interrupt): the sampler steps it got, of steps_of(req)


def set_scheduler(pipe, name: str, zero_terminal_snr: bool | None = None) -> None:
    """Swap the pipeline's sampler. Each is built from the model's own schedule configuration (its prediction type,
    zero terminal SNR), so one sampler's options (SDE, Karras, trailing timesteps) never carry over into the next.
    `zero_terminal_snr` True / False samples on (or off) a zero-terminal-SNR schedule whatever the model's own."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    from .schedule import sampler_config

    name = scheduler_name(name)
    cls_name, extra = SCHEDULERS[name]
    made = pipe.__dict__.get("_sampler_made")  # (name, zero SNR, the scheduler this function put there)
    if made is not None and made[2] is pipe.scheduler:
        if made[:2] == (name, zero_terminal_snr):
            return
    else:  # the first call, or a scheduler put there from outside: its configuration is the model's own
        pipe.__dict__["_own_scheduler_config"] = {k: v for k, v in pipe.scheduler.config.items()
                                                  if not k.startswith("_") and k != "use_karras_sigmas"}
    own = dict(pipe.__dict__["_own_scheduler_config"])
    if zero_terminal_snr is not None:
        own["rescale_betas_zero_snr"] = zero_terminal_snr
    cls = getattr(diffusers, cls_name)
    config = sampler_config(cls, own, extra, name)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the model's keys a sampler has no use for are kept, not warned about
    try:
        pipe.scheduler = cls.from_config(config)
    finally:
        diffusers_logging.set_verbosity(level)
    pipe.__dict__["_sampler_made"] = (name, zero_terminal_snr, pipe.scheduler)


def samples_zero_snr(pipe, req: GenerationRequest) -> bool:
    """Whether `req` samples on a zero-terminal-SNR schedule on this pipeline (its own, or the request's)."""
    if req.zero_terminal_snr is not None:
        return req.zero_terminal_snr
    own = pipe.__dict__.get("_own_scheduler_config") or pipe.scheduler.config
    return bool(own.get("rescale_betas_zero_snr", False))


@contextlib.contextmanager
def cfg_rescaled(pipe, guidance: float, phi: float):
    """CFG rescale (Lin et al. 2024, eq. 15-16) in every diffusers pipeline, img2img and inpainting included (their
    SD 1.x forms have no `guidance_rescale`): the UNet's output for the [negative; prompt] batch is hooked so that
    the pipeline's own combination u + g(c - u) gives φ·x·σ(c)/σ(x) + (1 - φ)·x, x the guided prediction: the
    negative half is replaced by the u' that combines to it, u' = (target - g·c) / (1 - g). Equal to diffusers'
    `guidance_rescale` where a pipeline has it (tested). No-op without CFG (g ≤ 1, or an LCM-distilled UNet)."""
    unet = pipe.unet
    if phi <= 0 or guidance <= 1 or getattr(unet.config, "time_cond_proj_dim", None) is not None:
        yield
        return

    def hook(module, args, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        u, c = sample.float().chunk(2)
        x = u + guidance * (c - u)
        dims = list(range(1, x.ndim))
        target = phi * x * (c.std(dim=dims, keepdim=True) / x.std(dim=dims, keepdim=True)) + (1 - phi) * x
        new = torch.cat([(target - guidance * c) / (1 - guidance), c]).to(sample.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        output.sample = new
        return output

    handle = unet.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


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
    return encoder_hidden(te, tok.input_ids.to(device), -(skip + 1), True, mask).to(te.dtype)


def format_parameters(req: GenerationRequest, seed: int, width: int, height: int, model: BaseModel,
                      extra: dict[str, str] | None = None, subseed: int | None = None) -> str:
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
    if getattr(model, "vae_name", None):  # A1111 writes the VAE file's name
        pairs["VAE"] = model.vae_name
    if ti := used_hashes(model, [req.prompt, req.negative_prompt]):
        pairs["TI hashes"] = ti
    if req.clip_skip > 1:  # A1111 writes it only when set
        pairs["Clip skip"] = str(req.clip_skip)
    if req.hires_scale > 1 or req.init_image is not None:
        pairs["Denoising strength"] = f"{req.denoising_strength:g}"
    if req.mask_image is not None:  # A1111 records the blur of an inpainting mask (not the mask)
        pairs["Mask blur"] = str(req.mask_blur)
    if req.tiling:  # A1111 writes it only when on
        pairs["Tiling"] = "True"
    if req.cfg_rescale > 0:  # the A1111 extension's key (Forge's builtin writes "Rescale CFG", read too)
        pairs["CFG Rescale"] = f"{req.cfg_rescale:g}"
    if samples_zero_snr(model.pipe, req):  # A1111 writes its setting's value when the schedule is on
        pairs[NOISE_SCHEDULE_KEY] = ZERO_TERMINAL_SNR
    if req.subseed_strength > 0:  # A1111's keys: image i's variation seed is subseed + i
        pairs["Variation seed"] = str(req.subseed if subseed is None else subseed)
        pairs["Variation seed strength"] = f"{req.subseed_strength:g}"
    if req.hires_scale > 1:  # A1111's keys; Size stays the first pass's
        pairs["Hires upscale"] = f"{req.hires_scale:g}"
        if req.hires_steps:
            pairs["Hires steps"] = str(req.hires_steps)
        pairs["Hires upscaler"] = req.hires_upscaler
    pairs.update(extra or {})
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items()))
    return "\n".join(lines)


_NEEDS_QUOTES = re.compile(r'[,:"\n]')


def with_pairs(parameters: str, pairs: dict[str, str]) -> str:
    """More 'Key: value' pairs at the end of a `parameters` text, quoted as AUTOMATIC1111 quotes a value with
    commas, colons, quotes or line breaks (JSON)."""
    text = ", ".join(f"{k}: {json.dumps(v, ensure_ascii=False) if _NEEDS_QUOTES.search(v) else v}"
                     for k, v in pairs.items())
    return f"{parameters}, {text}" if text else parameters


def add_parameters(img: "GeneratedImage", pairs: dict[str, str]) -> None:
    """More 'Key: value' pairs at the end of an image's parameters and its PNG text (see with_pairs)."""
    img.parameters = with_pairs(img.parameters, pairs)
    img.image.info["parameters"] = img.parameters


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
    interrupt: Callable[[], bool] | None = None,
) -> list[GeneratedImage]:
    """Generate req.num_images images; image i uses seed req.seed + i (as AUTOMATIC1111 does).

    From the prompt alone, or from `req.init_image` (img2img); with a Hires fix, the result is enlarged and
    drawn again. `step_hook(i)` runs before sampler step i (0-based) of each pass: before its first UNet call,
    then after each step. `on_progress(done, total)` counts the steps of all passes. `interrupt()` is asked
    after each step: once it says True the sampler stops and the images are decoded as far as they got, with no
    Hires pass (AUTOMATIC1111's Interrupt); they carry the steps they got in `interrupted`.
    """
    if req.batch_size and req.num_images > req.batch_size:
        return _in_batches(model, req, on_progress, extra_parameters, cross_attention_kwargs, step_hook, interrupt)
    pipe = model.pipe
    skip = clip_skip_arg(model, req.clip_skip)
    width = req.width or model.native_resolution
    height = req.height or model.native_resolution
    set_scheduler(pipe, req.scheduler, req.zero_terminal_snr)
    variation = req.subseed_strength > 0  # A1111: the images share the seed, their variation seeds count up
    if variation and inpainting_model(model):
        raise ConfigError("subseed_strength: variation seeds are not applied with an inpainting checkpoint; set it "
                          "to 0")
    seeds = [req.seed if variation else req.seed + i for i in range(req.num_images)]
    subseeds = [req.subseed + i for i in range(req.num_images)] if variation else [None] * req.num_images
    gen_device = "cpu" if model.device.type == "mps" else model.device
    init = _init_image(req.init_image, width, height) if req.init_image is not None else None
    hires = req.hires_scale > 1
    first, second = _passes(req)
    total, done = first[2] + second[2], [0]

    # A1111's prompt editing ([from:to:when], [a|b]): each pass's texts by sampler step
    encoded: dict = {}  # (prompt, negative) -> embeddings, for both passes
    edits = [_PromptEdits(model, req, skip, req.steps, cache=encoded)]
    if hires:
        edits.append(_PromptEdits(model, req, skip, req.steps, req.hires_steps or req.steps, cache=encoded))
    current = [edits[0]]

    stopped: list[int | None] = [None]

    def _cb(p, step, timestep, kw):
        if step_hook is not None:
            step_hook(step + 1)
        if current[0].active:
            current[0].swap(p, step + 1, kw)
        done[0] += 1
        if on_progress is not None:
            on_progress(min(done[0], total), total)
        if interrupt is not None and stopped[0] is None and interrupt():
            stopped[0] = done[0]
            p._interrupt = True  # diffusers' pipelines skip their remaining steps, then decode
        return kw

    with torch.inference_mode(), tiled(pipe, req.tiling), cfg_rescaled(pipe, req.guidance, req.cfg_rescale):
        def run(p, **kw):
            if step_hook is not None:
                step_hook(0)
            out = p(**current[0].pipeline_args(), guidance_scale=req.guidance, num_images_per_prompt=req.num_images,
                    generator=[torch.Generator(device=gen_device).manual_seed(s) for s in seeds],
                    callback_on_step_end=_cb, cross_attention_kwargs=cross_attention_kwargs, **kw).images
            current[0] = edits[-1]  # a later pass is the Hires fix's
            return out

        latent_out = "latent" if hires and req.hires_upscaler == "Latent" else "pil"
        if inpainting_model(model) and req.mask_image is None:
            # an inpainting checkpoint (9-channel UNet) draws through its inpainting input, with the whole picture
            # masked, as A1111 runs them for txt2img and img2img (the masked picture is then all grey)
            images = run(_inpaint(pipe, model.device), **_whole_mask(pipe, init, width, height, model.device),
                         num_inference_steps=first[0], strength=first[1], output_type=latent_out)
        elif init is None:
            noise = (variation_noise(pipe, seeds, subseeds, req.subseed_strength, width, height, gen_device,
                                     model.device) if variation else None)
            images = run(pipe, num_inference_steps=req.steps, width=width, height=height, output_type=latent_out,
                         latents=noise)
        elif req.mask_image is not None:
            mask = _mask(req.mask_image, width, height, req.mask_blur)
            images = run(_inpaint(pipe, model.device), image=init, mask_image=mask, width=width, height=height,
                         num_inference_steps=first[0], strength=first[1])
            images = [Image.composite(im, init, mask) for im in images]  # A1111's overlay: the rest stays as it was
        else:
            images = run(_img2img(pipe), image=_latents_of(pipe, [init], model.device),
                         num_inference_steps=first[0], strength=first[1])
        if hires and stopped[0] is not None:  # interrupted in the first pass: no Hires pass
            if latent_out == "latent":
                images = _decode(pipe, images)
        elif hires:
            big_w, big_h = (max(8, int(v * req.hires_scale) // 8 * 8) for v in (width, height))
            if latent_out == "latent":  # A1111's "Latent" upscaler: the latents enlarged (bilinear)
                f = getattr(pipe, "vae_scale_factor", 8)
                bigger = torch.nn.functional.interpolate(images, size=(big_h // f, big_w // f), mode="bilinear")
            else:
                bigger = _latents_of(pipe, [im.resize((big_w, big_h), Image.LANCZOS) for im in images], model.device)
            if inpainting_model(model):
                images = run(_inpaint(pipe, model.device), **_whole_mask(pipe, bigger, big_w, big_h, model.device),
                             num_inference_steps=second[0], strength=second[1])
            else:
                images = run(_img2img(pipe), image=bigger, num_inference_steps=second[0], strength=second[1])
    results = []
    for img, seed, sub in zip(images, seeds, subseeds):
        params = format_parameters(req, seed, width, height, model, extra_parameters, subseed=sub)
        img.info["parameters"] = params
        results.append(GeneratedImage(image=img, seed=seed, parameters=params, size=(width, height), subseed=sub,
                                      interrupted=stopped[0]))
    return results


def _in_batches(model, req: GenerationRequest, on_progress, extra_parameters, cross_attention_kwargs, step_hook,
                interrupt) -> list[GeneratedImage]:
    """`generate` batch_size images at a time (A1111's Batch count × Batch size): batch j makes images from
    j·batch_size on, with their own seeds (or variation seeds), so every image is the one a single batch makes.
    An Interrupt ends the batch it comes in and leaves the later ones out."""
    from dataclasses import replace

    variation = req.subseed_strength > 0
    starts = list(range(0, req.num_images, req.batch_size))
    out: list[GeneratedImage] = []
    for j, start in enumerate(starts):
        sub = replace(req, num_images=min(req.batch_size, req.num_images - start), batch_size=0,
                      seed=req.seed if variation else req.seed + start,
                      subseed=req.subseed + start if variation else req.subseed)
        progress = None if on_progress is None else (
            lambda done, total, j=j: on_progress(j * total + done, len(starts) * total))
        got = generate(model, sub, progress, extra_parameters, cross_attention_kwargs, step_hook, interrupt)
        out += got
        if any(g.interrupted is not None for g in got):
            break
    return out


def _decode(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """Latents (the pipeline's own scaling) as pictures, as the pipeline decodes its output."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    x = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]
    return pipe.image_processor.postprocess(x, output_type="pil")


@contextlib.contextmanager
def tiled(pipe, on: bool = True):
    """A1111's Tiling while the block runs: every 2-D convolution of the UNet and the VAE (an adapter's own
    convolutions too) pads circularly, so the picture wraps around at its edges. Spatial attention and group
    norms see the whole picture anyway, so the model is then shift-equivariant on a torus: the picture has no edge."""
    convs = [m for part in (pipe.unet, pipe.vae) for m in part.modules()
             if isinstance(m, torch.nn.Conv2d) and m.padding_mode != "circular"] if on else []
    before = [m.padding_mode for m in convs]
    for m in convs:
        m.padding_mode = "circular"
    try:
        yield
    finally:
        for m, mode in zip(convs, before):
            m.padding_mode = mode


class _PromptEdits:
    """The prompt and negative prompt of each sampler step of one pass under A1111's prompt editing, each
    distinct pair encoded once (A1111's encoding; `cache` shares them with a Hires fix's other pass) and put into
    the pipeline between steps."""

    def __init__(self, model: BaseModel, req: GenerationRequest, skip: int | None, steps: int,
                 hires_steps: int | None = None, cache: dict | None = None):
        self.model, self.skip = model, skip
        self.pos = prompt_schedule(req.prompt, steps, hires_steps)
        self.neg = prompt_schedule(req.negative_prompt or "", steps, hires_steps)
        self.active = len({t for _, t in self.pos}) > 1 or len({t for _, t in self.neg}) > 1
        self.xl = model.family == "sdxl"
        self._cache: dict[tuple[str, str], dict[str, torch.Tensor]] = {} if cache is None else cache
        self._last: tuple[str, str] | None = None

    def encoded(self, step: int) -> dict[str, torch.Tensor]:
        pair = (at_step(self.pos, step), at_step(self.neg, step))
        if pair not in self._cache:
            self._cache[pair] = encode_prompts(self.model, pair[0], pair[1], self.skip)
        return self._cache[pair]

    def pipeline_args(self) -> dict[str, Any]:
        """The pipeline's text arguments for the pass's first step (and, when the texts change, the tensors
        its step callback is handed)."""
        self._last = prompt, negative = at_step(self.pos, 0), at_step(self.neg, 0)
        if self.active:
            extra = ["prompt_embeds", "add_text_embeds"] if self.xl else ["prompt_embeds"]
            return dict(self.encoded(0), callback_on_step_end_tensor_inputs=["latents", *extra])
        # the same texts at every step. A1111's encoding for weights, chunks, embeddings and clip skip (both
        # prompts through the same layer: diffusers' own clip_skip skips the positive only); diffusers' own for
        # a plain prompt
        model = self.model
        if self.skip is not None or any(needs_syntax(model.pipe.tokenizer, p) or mentions(model, p)
                                        for p in (prompt, negative)):
            return self.encoded(0)
        return dict(prompt=prompt, negative_prompt=negative or None)

    def swap(self, pipe, step: int, kw: dict) -> None:
        """Sets `kw`'s text embeddings to those of sampler step `step` where its texts differ from the step
        before (the pipeline holds them negative first, each repeated for the images of the batch)."""
        pair = (at_step(self.pos, step), at_step(self.neg, step))
        if pair == self._last or "prompt_embeds" not in kw:
            return
        self._last = pair
        enc = self.encoded(step)
        held = kw["prompt_embeds"]
        cfg = bool(getattr(pipe, "do_classifier_free_guidance", True))
        n = held.shape[0] // (2 if cfg else 1)

        def batch(pos, neg, like):
            pos, neg = pos.to(like), neg.to(like)
            return torch.cat([neg.repeat(n, *[1] * (neg.dim() - 1)), pos.repeat(n, *[1] * (pos.dim() - 1))]) if cfg \
                else pos.repeat(n, *[1] * (pos.dim() - 1))

        kw["prompt_embeds"] = batch(enc["prompt_embeds"], enc["negative_prompt_embeds"], held)
        if self.xl and "add_text_embeds" in kw:
            kw["add_text_embeds"] = batch(enc["pooled_prompt_embeds"], enc["negative_pooled_prompt_embeds"],
                                          kw["add_text_embeds"])


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from a to b (per batch row), as AUTOMATIC1111 mixes a seed's noise with a variation
    seed's; nearly parallel rows are interpolated linearly."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    dot = (fa / fa.norm(dim=1, keepdim=True) * fb / fb.norm(dim=1, keepdim=True)).sum(1).clamp(-1, 1)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    near = dot.abs() > 0.9995
    wa = torch.where(near, 1 - t, torch.sin((1 - t) * omega) / torch.where(near, 1.0, so))
    wb = torch.where(near, t, torch.sin(t * omega) / torch.where(near, 1.0, so))
    return (wa[:, None] * fa + wb[:, None] * fb).view_as(a).to(a.dtype)


def variation_noise(pipe, seeds: list[int], subseeds: list[int], strength: float, width: int, height: int,
                    gen_device, device) -> torch.Tensor:
    """The starting latents of a variation-seed batch: image i's seed noise moved towards its variation seed's by
    `strength` (drawn as the pipeline draws its own, so strength 0 would be the plain seed's noise)."""
    from diffusers.utils.torch_utils import randn_tensor

    f = getattr(pipe, "vae_scale_factor", 8)
    shape = (1, pipe.vae.config.latent_channels, height // f, width // f)
    dtype = pipe.unet.dtype

    def draw(seed: int) -> torch.Tensor:
        return randn_tensor(shape, generator=torch.Generator(device=gen_device).manual_seed(seed), device=device,
                            dtype=dtype)

    return torch.cat([slerp(strength, draw(s), draw(ss)) for s, ss in zip(seeds, subseeds)])


def _passes(req: GenerationRequest) -> tuple[tuple[int, float, int], tuple[int, float, int]]:
    """(schedule steps, diffusers strength, steps run) of `req`'s first pass (txt2img or img2img) and of its
    Hires pass (all zero without one)."""
    first = img2img_schedule(req.steps, req.denoising_strength) if req.init_image is not None else (
        req.steps, 1.0, req.steps)
    second = hires_schedule(req.hires_steps or req.steps, req.denoising_strength) if req.hires_scale > 1 else (
        0, 1.0, 0)
    return first, second


def steps_of(req: GenerationRequest) -> int:
    """The sampler steps `generate` runs for `req` per image: its img2img or txt2img pass, and a Hires pass."""
    first, second = _passes(req)
    return first[2] + second[2]


def _strength_for(schedule: int, run: int) -> float:
    """The diffusers img2img strength that runs exactly the last `run` steps of a `schedule`-step schedule
    (diffusers runs int(schedule * strength) of them; the half step keeps float rounding off the count)."""
    return min(1.0, (run + 0.5) / schedule)


def img2img_schedule(steps: int, strength: float) -> tuple[int, float, int]:
    """(schedule steps, diffusers strength, steps run) of AUTOMATIC1111's img2img: the last int(steps *
    strength) + 1 steps of a `steps`-step schedule, so never none (diffusers alone runs one fewer, and none at
    a low strength)."""
    run = min(steps, int(steps * strength) + 1)
    return steps, _strength_for(steps, run), run


def hires_schedule(steps: int, strength: float) -> tuple[int, float, int]:
    """(schedule steps, diffusers strength, steps run) of AUTOMATIC1111's Hires fix pass: exactly `steps` steps,
    the last ones of a schedule of int(steps / strength) steps."""
    schedule = min(1000, max(steps, int(steps / min(strength, 0.999))))  # schedulers take up to 1000
    return schedule, _strength_for(schedule, steps), steps


def _latents_of(pipe, images: list[Image.Image], device) -> torch.Tensor:
    """The UNet's latents of `images`: the VAE's mean, scaled as the pipeline decodes them. diffusers' img2img
    samples the VAE's posterior instead, which on a VAE that learnt no variance (the toy model's: std ~1) buries
    the picture in noise; SD's VAE gives nearly the mean either way."""
    return _vae_mean(pipe, pipe.image_processor.preprocess(images), device)


def _vae_mean(pipe, x: torch.Tensor, device) -> torch.Tensor:
    """Scaled latents of pictures `x` in [-1, 1]: the VAE's mean (see _latents_of)."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))  # SDXL's VAE in fp16
    if upcast:
        vae.to(torch.float32)
    try:
        lat = scaled_mean(vae, x.to(device=device, dtype=vae.dtype))
    finally:
        if upcast:
            vae.to(torch.float16)
    return lat.to(pipe.unet.dtype)


def scaled_mean(vae, x: torch.Tensor) -> torch.Tensor:
    """The VAE's mean latents of `x` (on the VAE's device and dtype), shifted and scaled as the UNet sees them."""
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return (vae.encode(x).latent_dist.mean - shift) * float(vae.config.scaling_factor)


def _open_image(src, name: str) -> Image.Image:
    """A request's picture: a PIL image as it is, or the file it names (errors name the field and the file)."""
    if isinstance(src, Image.Image):
        return src
    path = Path(src)
    try:
        with Image.open(path) as f:
            f.load()
            return f.copy()
    except FileNotFoundError:
        raise ConfigError(f"{name}: {path.name}: no such file") from None
    except OSError:
        raise ConfigError(f"{name}: {path.name}: not an image this app can read") from None


def _mask(src, width: int, height: int, blur: int) -> Image.Image:
    """An inpainting mask as A1111 takes it: grey levels (white: draw anew), stretched to the size, blurred."""
    from PIL import ImageFilter

    m = _open_image(src, "mask_image")
    if m.mode in ("RGBA", "LA") and m.getchannel("A").getextrema()[0] < 255:  # a painted layer: its strokes
        m = m.getchannel("A")
    m = m.convert("L")
    m = m if m.size == (width, height) else m.resize((width, height), Image.LANCZOS)
    return m.filter(ImageFilter.GaussianBlur(blur)) if blur else m


def inpainting_model(model: BaseModel) -> bool:
    """An inpainting checkpoint (sd-v1-5-inpainting and kin): its UNet takes the noisy latents, the mask and the
    masked picture's latents (9 channels)."""
    return int(getattr(model.pipe.unet.config, "in_channels", 4)) == 9


def _whole_mask(pipe, start, width: int, height: int, device) -> dict:
    """The inpainting pipeline's inputs for drawing the whole picture: `start` (a picture, latents, or None for
    txt2img) everywhere masked, and the masked picture's latents those of plain grey, which is what the
    inpainting UNet was trained to see where nothing is kept (A1111's conditioning for these models)."""
    grey = Image.new("RGB", (width, height), (127, 127, 127))
    n = len(start) if isinstance(start, (list, torch.Tensor)) else 1
    return dict(image=grey if start is None else start, mask_image=Image.new("L", (width, height), 255),
                masked_image_latents=_latents_of(pipe, [grey] * n, device), width=width, height=height)


def _inpaint(pipe, device):
    """The inpainting pipeline on the same modules, encoding the picture with the VAE's mean (see _latents_of)."""
    from diffusers import AutoPipelineForInpainting

    out = _from_pipe(AutoPipelineForInpainting, pipe)
    out._encode_vae_image = lambda image, generator=None: _vae_mean(pipe, image, device)
    return out


def _img2img(pipe):
    from diffusers import AutoPipelineForImage2Image

    return _from_pipe(AutoPipelineForImage2Image, pipe)


def _from_pipe(auto, pipe):
    """`auto`'s pipeline on the same modules as `pipe` (adapters and all) and the same sampler, quiet."""
    out = auto.from_pipe(pipe)
    if hasattr(out, "set_progress_bar_config"):
        out.set_progress_bar_config(disable=True)
    return out


def _init_image(src, width: int, height: int) -> Image.Image:
    """img2img's starting picture, RGB, stretched to width x height (A1111's "Just resize")."""
    im = _open_image(src, "init_image").convert("RGB")
    return im if im.size == (width, height) else im.resize((width, height), Image.LANCZOS)


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
    "set_scheduler", "scheduler_name", "clip_skip_arg", "HIRES_UPSCALERS",
]
