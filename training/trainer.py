"""The LoRA training loop: build -> step -> maybe checkpoint -> maybe sample -> export.

Reproducibility: the batch order, noise and timesteps of step k depend only on (seed, k), so a run
resumed from a checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.base_models import BaseModel, load_base
from pipelines.generation import clip_skip_arg, inpainting_model
from pipelines.errors import ConfigError, DatasetError, TrainingError
from pipelines.weights_io import atomic_write
from pipelines.single_file import unet_layout

from . import lora as lora_mod
from .config import TrainConfig
from .dataset import (ScanResult, check_masks, find_mask, load_mask, load_rgb, make_buckets, pick_bucket, resize_crop,
                      resize_crop_at, scan_folder, scan_subsets, to_tensor, vary_caption)
from .optimizers import step_size
from .export import base_hash, export_adapter, export_embedding, write_checkpoint, find_checkpoint, prune_checkpoints, read_checkpoint


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class Progress:
    step: int
    total: int
    loss: float | None = None
    lr: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None
    samples: list[Path] = field(default_factory=list)
    message: str = ""


@dataclass
class TrainResult:
    adapter_path: Path | None
    run_dir: Path
    steps: int
    final_loss: float | None
    seconds: float
    samples: list[Path]
    scan: ScanResult
    stopped: bool = False
    checkpoint: Path | None = None


@dataclass
class Example:
    latent: torch.Tensor  # (4, h, w), already scaled
    caption: str
    size: tuple[int, int]  # (width, height) in pixels
    crop: tuple[int, int]  # (top, left)
    prior: bool = False
    repeats: int = 1  # times per epoch (a kohya folder's repeat count)
    mask: torch.Tensor | None = None  # (1, h, w) loss weights at the latents' size (masked loss), None: all 1


ProgressFn = Callable[[Progress], None]


def _emit(cb: ProgressFn | None, p: Progress) -> None:
    if cb is not None:
        cb(p)


# ----------------------------------------------------------------------------- building
def run_dir_for(cfg: TrainConfig) -> Path:
    return cfg.library_dir / "runs" / cfg.name


def check_name_free(cfg: TrainConfig) -> None:
    """Refuse, before any work, a run whose finished adapter would replace one already in the library.

    A name counts as in use when an adapter of that name up to case exists ('Style' and 'style' are one
    adapter). With `overwrite` the adapter (under its own spelling), its card, preview and config are
    replaced. Resuming a stopped run is not blocked: it has no finished adapter yet. (A card or preview
    left without its adapter, e.g. after the .safetensors was deleted by hand, is the run's own: replaced.)
    """
    from pipelines.library import AdapterLibrary

    if cfg.textual_inversion:  # the embeddings folder's file of that name (words match up to case)
        from pipelines.embeddings import embedding_files

        taken = embedding_files(cfg.embeddings_folder).get(cfg.name.lower())
        if taken is not None and (not cfg.overwrite or taken.name != f"{cfg.name}.safetensors"):
            raise ConfigError(f"name: an embedding called '{taken.stem}' already exists in {taken.parent}"
                              + ("; pass --overwrite (overwrite = true) to replace it, or pick another name"
                                 if not cfg.overwrite else f" as {taken.name}: remove it first, or pick another "
                                 "name"))
        return
    lib = AdapterLibrary(cfg.library_dir)
    existing = lib.find(cfg.name)
    if existing is not None:
        if not cfg.overwrite:
            raise ConfigError(f"name: an adapter called '{existing.stem}' already exists in the library {lib.root}; "
                              "pass --overwrite (overwrite = true) to replace it, or pick another name")
        if existing.stem != cfg.name:  # the export would write a second file differing only in case
            raise ConfigError(f"name: --overwrite replaces '{existing.stem}' under its own spelling: train with "
                              f"--name {existing.stem}, or rename it first (lora-studio loras rename)")


def _latent_step(base: BaseModel) -> int:
    return int(base.pipe.vae_scale_factor) * 2  # even latent sides


@torch.no_grad()
def encode_images(base: BaseModel, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """VAE-encode (3, H, W) tensors in [-1, 1] to scaled latents (4, H/f, W/f); done once per run."""
    from pipelines.generation import scaled_mean

    vae = base.pipe.vae
    out = []
    # in full precision (SD's VAE overflows in fp16), then back to the dtype the pipeline draws with
    dtype = vae.dtype
    vae.to(dtype=torch.float32)
    try:
        for img in images:
            x = img.unsqueeze(0).to(base.device, dtype=torch.float32)  # (1, 3, H, W)
            out.append(scaled_mean(vae, x)[0].float().cpu())
    finally:
        vae.to(dtype=dtype)
    return out


def mask_root(cfg: TrainConfig) -> Path | None:
    """The folder a mask folder mirrors: the images folder; with a kohya dataset config none (kohya's
    conditioning_data_dir holds each subset's masks by file name)."""
    return None if cfg.dataset_config else Path(cfg.images)


def _latent_mask(mask, size: tuple[int, int], crop: tuple[int, int], flip: bool, factor: int) -> torch.Tensor:
    """An image's mask ("L"), cropped and flipped as the image was, as (1, h, w) weights in [0, 1] at the
    latents' size (each latent pixel the mean of the pixels it covers, as kohya's area interpolation)."""
    m = torch.from_numpy(np.asarray(resize_crop_at(mask, size, crop), dtype=np.float32) / 255.0)[None, None]
    if flip:
        m = torch.flip(m, dims=[3])
    return F.interpolate(m, size=(size[1] // factor, size[0] // factor), mode="area")[0]


def build_examples(cfg: TrainConfig, base: BaseModel, scan: ScanResult, resolution: int,
                   prior: bool = False, masks: bool = False, size: tuple[int, int] | None = None) -> list[Example]:
    """The run's examples: each image cropped (and flipped) as configured, VAE-encoded once; with `masks`
    (masked loss), each with its mask's loss weights (see `dataset.find_mask`); `size`: every image cut to
    that (width, height) instead of its bucket."""
    step = _latent_step(base)
    factor = int(base.pipe.vae_scale_factor)
    target = size
    buckets = make_buckets(resolution, step=step) if cfg.buckets else [(resolution, resolution)]
    rng = random.Random(cfg.seed)
    variants = 4 if cfg.crop == "random" else 1
    tensors, meta = [], []
    for item in scan.items:
        img = load_rgb(item.path)
        mask = load_mask(item.path, find_mask(item.path, mask_root(cfg), cfg.mask_dir)) if masks else None
        size = target or pick_bucket(img.width, img.height, buckets)
        for _ in range(variants):
            crop_img, crop = resize_crop(img, size, cfg.crop, rng)
            flips = [False, True] if cfg.random_flip else [False]
            for flip in flips:
                t = to_tensor(crop_img)
                tensors.append(torch.flip(t, dims=[2]) if flip else t)
                lm = _latent_mask(mask, size, crop, flip, factor) if mask is not None else None
                meta.append((item.caption, size, crop, item.repeats, lm))
    latents = encode_images(base, tensors)
    return [Example(lat, cap, size, crop, prior, reps, m) for lat, (cap, size, crop, reps, m) in zip(latents, meta)]


def _cached_base_images(cfg: TrainConfig, base: BaseModel, resolution: int, kind: str, key: str,
                        prompts: list[str], count: int, seed_offset: int, stem: str) -> Path:
    """<library>/.cache/<kind>/<hash of key>/: `count` base-model images of `prompts` (in turn), each
    generated once; later runs with the same key reuse them."""
    import hashlib

    from pipelines.generation import GenerationRequest, generate, save_png

    key += f"|clip_skip={cfg.clip_skip}" if cfg.clip_skip > 1 else ""  # the base draws otherwise with it
    key += f"|vae={Path(cfg.vae).resolve()}" if cfg.vae else ""
    folder = cfg.library_dir / ".cache" / kind / hashlib.sha256(key.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"{stem}-{i:04d}.png"
        if path.exists():
            continue
        req = GenerationRequest(prompt=prompts[i % len(prompts)], steps=cfg.sample_steps,
                                seed=cfg.seed + seed_offset + i, width=resolution, height=resolution, guidance=7.0,
                                clip_skip=cfg.clip_skip)
        save_png(generate(base, req)[0], path)
    return folder


def class_images_folder(cfg: TrainConfig, base: BaseModel, resolution: int) -> Path:
    """The class images for prior preservation: the user's folder, or generated once and cached."""
    if cfg.class_images:
        return Path(cfg.class_images)
    return _cached_base_images(cfg, base, resolution, "class_images",
                               f"{base.source}|{cfg.class_prompt}|{resolution}|{cfg.seed}", [cfg.class_prompt or ""],
                               cfg.num_class_images, 10_000, "class")


def preserve_images_folder(cfg: TrainConfig, base: BaseModel, resolution: int, prompts: list[str]) -> Path:
    """Base-model images of the preservation prompts (one per prompt, in turn), generated once and cached.

    Their noised latents are where base preservation compares the adapter with the base: the states
    that sampling a trigger-free prompt passes through.
    """
    return _cached_base_images(cfg, base, resolution, "preserve_images",
                               json.dumps([base.source, prompts, resolution, cfg.seed]), prompts,
                               cfg.preserve_images, 20_000, "base")


def encode_text(base: BaseModel, prompts: list[str], clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, 77, D) prompt embeddings, and SDXL's pooled embeddings (B, D2) (None otherwise); `clip_skip` as
    AUTOMATIC1111 counts it (1: the text encoder's last layer)."""
    from pipelines.embeddings import expand
    from pipelines.generation import skipped_embeddings

    pipe = base.pipe
    prompts = [expand(base, p) for p in prompts]  # pivotal tuning: the trigger's own tokens (same names in SDXL's two)
    if (skip := clip_skip_arg(base, clip_skip)) is not None:
        return skipped_embeddings(pipe, prompts, skip, base.device), None
    if base.family == "sdxl":
        pe, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=base.device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
        return pe, pooled
    pe, _ = pipe.encode_prompt(prompts, base.device, 1, False)
    return pe, None


class TextCache:
    """Caches text embeddings while the text encoder is frozen; encodes live when it trains.
    `keep=False` (shuffled tags: a new caption nearly every step) encodes every time, without gradients."""

    def __init__(self, base: BaseModel, live: bool, keep: bool = True, clip_skip: int = 1):
        self.base, self.live, self.keep, self.clip_skip = base, live, keep, clip_skip
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.live:
            return encode_text(self.base, prompts, self.clip_skip)
        if not self.keep:
            with torch.no_grad():
                return encode_text(self.base, prompts, self.clip_skip)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            with torch.no_grad():
                pe, pooled = encode_text(self.base, missing, self.clip_skip)
            for i, p in enumerate(missing):
                self.cache[p] = (pe[i], None if pooled is None else pooled[i])
        pe = torch.stack([self.cache[p][0] for p in prompts])
        pooled = None if self.cache[prompts[0]][1] is None else torch.stack([self.cache[p][1] for p in prompts])
        return pe, pooled


def _trigger_word_re(trigger: str):
    """The trigger as a whole word (not inside another word or a hyphenated one), any case."""
    return re.compile(rf"(?<![\w-]){re.escape(trigger.strip())}(?![\w-])", re.IGNORECASE)


KNOWN_WORD_NORM = 1.25  # x the median input-embedding norm of the vocabulary's words: a word the encoder learned
NEIGHBOUR_POOL = 256  # words encoded in context to rank the neighbours (closest input embeddings first)
NEIGHBOUR_CAPTIONS = 4  # captions the distance is averaged over


@torch.no_grad()
def trigger_neighbours(base: BaseModel, trigger: str, captions: list[str], k: int) -> list[str]:
    """The k words of the base model's vocabulary whose place in the captions the trigger takes most nearly:
    the relative L2 distance between the (77, D) conditioning of a caption and of the same caption with
    the trigger swapped for the word, averaged over a few captions, smallest first.

    These are the words an adapter is most likely to drag along with the trigger (the UNet cannot tell
    their prompts apart from the trigger's unless it is shown the difference), so base preservation keeps
    their images as the base draws them. Candidates: whole words of the tokenizer (letters only, 3+
    characters, not in any caption) that the text encoder has learned, i.e. whose input embedding norm is
    clearly above the vocabulary's typical one (KNOWN_WORD_NORM x the median): in CLIP almost every word, in
    the toy base the words it was captioned with (its other tokens are untouched initialisations that the
    encoder cannot tell from the trigger either). The NEIGHBOUR_POOL candidates with the input embeddings
    closest to the trigger's are ranked in context.
    """
    if k <= 0:
        return []
    word = _trigger_word_re(trigger)
    with_trigger = [c for c in captions if word.search(c)][:NEIGHBOUR_CAPTIONS]
    if not with_trigger:
        return []
    tok = base.pipe.tokenizer
    emb = base.pipe.text_encoder.get_input_embeddings().weight.detach().float().cpu()
    used = {w.lower() for c in captions for w in re.findall(r"[A-Za-z]+", c)} | {trigger.strip().lower()}
    cands = [(t[:-4], i) for t, i in tok.get_vocab().items()
             if t.endswith("</w>") and t[:-4].isascii() and t[:-4].isalpha() and len(t) >= 7
             and t[:-4].lower() not in used and i < emb.shape[0]]
    if not cands:
        return []
    ids = torch.tensor([i for _, i in cands])
    norms = emb[ids].norm(dim=-1)
    keep = norms >= KNOWN_WORD_NORM * norms.median()
    cands = [c for c, kp in zip(cands, keep.tolist()) if kp]
    if len(cands) > NEIGHBOUR_POOL:
        trig_ids = tok(trigger.strip(), add_special_tokens=False).input_ids
        t_emb = emb[trig_ids].mean(0)
        sims = torch.nn.functional.cosine_similarity(emb[torch.tensor([i for _, i in cands])], t_emb[None], dim=-1)
        cands = [cands[i] for i in sims.argsort(descending=True)[:NEIGHBOUR_POOL].tolist()]
    ref, _ = encode_text(base, with_trigger)
    ref = ref.float()
    dist = torch.zeros(len(cands))
    for j, cap in enumerate(with_trigger):
        prompts = [word.sub(w, cap) for w, _ in cands]
        for s in range(0, len(prompts), 64):
            pe, _ = encode_text(base, prompts[s:s + 64])
            d = (pe.float() - ref[j]).flatten(1).norm(dim=-1) / ref[j].norm()
            dist[s:s + 64] += d.cpu() / len(with_trigger)
    return [cands[i][0] for i in dist.argsort()[:k].tolist()]


def preservation_prompts(cfg: TrainConfig, captions: list[str], swaps: list[str] | tuple[str, ...] = (),
                         readable: bool = False) -> list[str]:
    """The trigger-free prompts on which base preservation keeps the base model's behaviour.

    From each caption: the trigger word taken out, the whole trigger phrase taken out ("in the style
    of sks", "in sks style", "by sks"), and the trigger replaced by the class noun (the class prompt's
    last word: "a photo of sks" -> "a photo of dog"). Then the class prompt, `preserve_prompts`, and ""
    (the unconditional prompt that classifier-free guidance subtracts: an adapter that moves it moves
    every image). Last, each caption with the trigger swapped for each of `swaps` (other words whose images
    must stay as they are: contrastive preservation). `readable` (prompts shown to people, as on the model
    card): where taking out the phrase differs from taking out the word ("in ohwx style" -> "in style"),
    only the phrase goes.
    """
    trig = re.escape(cfg.trigger.strip())
    word = _trigger_word_re(cfg.trigger)
    phrase = re.compile(rf"(?:\b(?:in the style of|in the manner of|in|by|of)\s+)?(?<![\w-]){trig}(?![\w-])"
                        rf"(?:\s+(?:style|art style|art)\b)?", re.IGNORECASE)
    noun = (cfg.class_prompt or "").strip().split()[-1:]

    def tidy(text: str) -> str:
        text = re.sub(r"\s+", " ", text).strip()
        text = re.sub(r"\s+([,.])", r"\1", text)
        text = re.sub(r"^(?:,\s*)+|(?:,\s*)+$", "", text)
        return re.sub(r"\b(a|an) (?=a |an )", "", text).strip()

    out = [""]
    for cap in [*captions, cfg.class_prompt or "", *cfg.preserve_prompts]:
        if not word.search(cap):
            out.append(tidy(cap))
            continue
        bare, whole = tidy(word.sub(" ", cap)), tidy(phrase.sub(" ", cap))
        out += [whole] if readable and whole != bare else [bare, whole]
        if noun:
            out.append(tidy(word.sub(noun[0], cap)))
    for cap in captions:
        if word.search(cap):
            out += [tidy(word.sub(w, cap)) for w in swaps]
    return list(dict.fromkeys(out))


class AdaptersOff:
    """`with AdaptersOff(modules):` runs the modules as the base model (every LoRA layer bypassed)."""

    def __init__(self, modules: list[torch.nn.Module]):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [m for mod in modules for m in mod.modules() if isinstance(m, BaseTunerLayer)]

    def __enter__(self) -> "AdaptersOff":
        for layer in self.layers:
            layer.enable_adapters(False)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            layer.enable_adapters(True)


class BatchSchedule:
    """Which examples form micro-batch k: a pure function of (seed, k), bucket-homogeneous."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, repeats: int = 1):
        self.batch_size, self.seed = batch_size, seed
        self.by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, ex in enumerate(examples):
            self.by_bucket.setdefault(ex.size, []).extend([i] * (repeats * ex.repeats))
        self._epochs: dict[int, list[list[int]]] = {}

    def _epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            rng = random.Random(self.seed * 1_000_003 + e)
            batches = []
            for size in sorted(self.by_bucket):
                idx = self.by_bucket[size][:]
                rng.shuffle(idx)
                for s in range(0, len(idx), self.batch_size):
                    chunk = idx[s:s + self.batch_size]
                    while len(chunk) < self.batch_size:  # top up a short last batch from its own bucket
                        chunk.append(idx[rng.randrange(len(idx))])
                    batches.append(chunk)
            rng.shuffle(batches)
            self._epochs = {e: batches}  # keep only the current epoch
        return self._epochs[e]

    @property
    def per_epoch(self) -> int:
        return sum(math.ceil(len(v) / self.batch_size) for v in self.by_bucket.values())

    def __call__(self, k: int) -> list[int]:
        e, i = divmod(k, self.per_epoch)
        return self._epoch(e)[i]


# ----------------------------------------------------------------------------- one step
def sdxl_time_ids(examples: list[Example], device) -> torch.Tensor:
    rows = [[ex.size[1], ex.size[0], ex.crop[0], ex.crop[1], ex.size[1], ex.size[0]] for ex in examples]
    return torch.tensor(rows, dtype=torch.float32, device=device)  # (B, 6)


def timestep_range(cfg: TrainConfig, num_train_timesteps: int) -> tuple[int, int]:
    """The timesteps [lo, hi) the run trains on: the config's range within the scheduler's."""
    hi = min(cfg.max_timestep, num_train_timesteps)
    if cfg.min_timestep >= hi:
        raise ConfigError(f"min_timestep: must be below max_timestep ({cfg.max_timestep}) and the base's "
                          f"{num_train_timesteps} timesteps, got {cfg.min_timestep}")
    return cfg.min_timestep, hi


def multires_noise(noise: torch.Tensor, gen: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """Pyramid ("multi-resolution") noise: `noise` plus, for level i = 0 … iterations-1, fresh noise drawn at
    the size divided by r**i (r drawn in [2, 4) per level) and enlarged back, times discount**i; then scaled to
    unit std. Coarse levels move whole regions together, which plain noise at the latents' size never asks
    the model to undo (the idea kohya's --multires_noise_iterations implements)."""
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = 2.0 + 2.0 * float(torch.rand((), generator=gen))
        sh, sw = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        low = torch.randn((b, c, sh, sw), generator=gen)
        out += F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if sh == 1 or sw == 1:
            break
    return out / out.std()


def draw_noise(shape: tuple[int, ...], gen: torch.Generator, cfg: TrainConfig,
               num_train_timesteps: int) -> tuple[torch.Tensor, ...]:
    """Noise (with the configured offset and multires levels) and timesteps in [min_timestep, max_timestep)
    for a batch of `shape`, from `gen` alone; with input perturbation (ip_noise_gamma) a third tensor, the
    extra noise of the UNet's input that the target leaves out (see `noisy_input`)."""
    noise = torch.randn(shape, generator=gen)
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=gen)
    if cfg.multires_noise_iterations:
        noise = multires_noise(noise, gen, cfg.multires_noise_iterations, cfg.multires_noise_discount)
    t = torch.randint(*timestep_range(cfg, num_train_timesteps), (shape[0],), generator=gen)
    if cfg.ip_noise_gamma:
        return noise, t, cfg.ip_noise_gamma * torch.randn(shape, generator=gen)
    return noise, t


def noisy_input(scheduler, latents: torch.Tensor, noise_t: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The UNet's input: `latents` noised to their timesteps (with the input perturbation, if drawn)."""
    noise, t = noise_t[0].to(latents.device), noise_t[1].to(latents.device)
    if len(noise_t) > 2:
        noise = noise + noise_t[2].to(latents.device)
    return scheduler.add_noise(latents, noise, t)


def huber_parameter(t: torch.Tensor, scheduler, cfg: TrainConfig) -> torch.Tensor:
    """The pseudo-Huber loss's c for timesteps `t` (B,) under cfg.huber_schedule (Khrapov et al. 2024, "Improving
    Diffusion Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss", as kohya schedules it):
    constant c; exponential from 1 at t = 0 down to c at the last timestep; snr (1 - c) / (1 + σ)² + c,
    σ = sqrt((1 - ᾱ) / ᾱ), near 1 at low noise and near c at high noise."""
    c = cfg.huber_c
    if cfg.huber_schedule == "constant":
        return torch.full(t.shape, c, device=t.device)
    if cfg.huber_schedule == "exponential":
        return torch.exp(math.log(c) / scheduler.config.num_train_timesteps * t.float())
    ac = scheduler.alphas_cumprod.to(t.device)[t].float()
    sigma = ((1 - ac) / ac).sqrt()
    return (1 - c) / (1 + sigma) ** 2 + c


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, scheduler,
                     cfg: TrainConfig) -> torch.Tensor:
    """Each latent pixel's error under cfg.loss_type: l2 the squared error, l1 the absolute one; huber
    2c(sqrt(d² + c²) - c), which is d² for small errors and grows as 2c|d| for large ones; smooth_l1 the same
    without the factor c."""
    if cfg.loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if cfg.loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = huber_parameter(t, scheduler, cfg).view(-1, *[1] * (pred.dim() - 1)).to(pred)
    r = torch.sqrt((pred - target) ** 2 + c ** 2) - c
    return 2 * c * r if cfg.loss_type == "huber" else 2 * r


PRESERVE_MAX_WEIGHT = 100.0  # cap of the clean-image weight 1/SNR of preservation rows (t near T)


def diffusion_loss(base: BaseModel, scheduler, latents: torch.Tensor, cond: torch.Tensor,
                   pooled: torch.Tensor | None, time_ids: torch.Tensor | None, gen: torch.Generator | None,
                   cfg: TrainConfig, dtype: torch.dtype | None = None,
                   noise_t: tuple[torch.Tensor, torch.Tensor] | None = None,
                   tail_target: torch.Tensor | None = None, unet=None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample denoising loss (B,), with min-SNR weighting and noise offset.

    `dtype` is the UNet's weight dtype; pass it (computing it walks every parameter). `noise_t`:
    noise and timesteps drawn beforehand (see `draw_noise`); otherwise they are drawn from `gen`.
    `tail_target`: the targets of the last len(tail_target) rows (base preservation: the base model's
    own prediction) instead of the noise (or velocity). `unet`: what to call instead of the base's UNet
    (its compiled form). `mask`: (B, 1, h, w) weights of each latent pixel's error (masked loss: the error
    times the mask, averaged over every pixel as kohya does, or over the mask's when cfg.mask_mean is "mask").
    """
    dtype = dtype or base.pipe.unet.dtype
    unet = base.pipe.unet if unet is None else unet
    if noise_t is None:
        noise_t = draw_noise(tuple(latents.shape), gen, cfg, scheduler.config.num_train_timesteps)
    noise, t = noise_t[0].to(latents.device), noise_t[1].to(latents.device)
    noisy = noisy_input(scheduler, latents, noise_t)  # (B, 4, h, w)
    pred_type = scheduler.config.prediction_type
    target = scheduler.get_velocity(latents, noise, t) if pred_type == "v_prediction" else noise
    if tail_target is not None and len(tail_target):
        target = torch.cat([target[:len(target) - len(tail_target)], tail_target.to(target)])
    kwargs = {}
    if pooled is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    pred = unet(noisy.to(dtype), t, cond.to(dtype), **kwargs).sample
    err = elementwise_loss(pred.float(), target.float(), t, scheduler, cfg)
    if mask is None:
        loss = err.mean(dim=(1, 2, 3))
    else:
        mask = mask.to(err)
        loss = (err * mask).mean(dim=(1, 2, 3))
        if cfg.mask_mean == "mask":  # the mean over the mask's pixels: a small mask weighs its image as much
            loss = loss / mask.mean(dim=(1, 2, 3)).clamp_min(1e-3)
    ac = scheduler.alphas_cumprod.to(latents.device)[t]
    snr = ac / (1 - ac)
    w = torch.ones_like(loss)
    if cfg.min_snr_gamma:
        w = torch.clamp(snr, max=cfg.min_snr_gamma)
        w = w / (snr + 1) if pred_type == "v_prediction" else w / snr
    if cfg.debiased_estimation:  # 1/sqrt(SNR) (Yu et al. 2023, "Debias the Training of Diffusion Models")
        capped = torch.clamp(snr, max=1000.0)
        w = w / torch.sqrt(capped + 1 if pred_type == "v_prediction" else capped)
    if tail_target is not None and len(tail_target):
        # preservation rows are weighted as errors of the predicted clean image: at high noise a small
        # change of the noise prediction is a large change of the picture (its composition, colours)
        x0w = 1 / (snr + 1) if pred_type == "v_prediction" else 1 / snr
        w = torch.cat([w[:len(w) - len(tail_target)], torch.clamp(x0w, max=PRESERVE_MAX_WEIGHT)[len(w) - len(tail_target):]])
    return loss * w


# ----------------------------------------------------------------------------- the run
LOG_HEADER = ["step", "loss", "lr", "elapsed_s"]


def open_log(path: Path, start: int) -> tuple[IO[str], float]:
    """The run's log.csv, open for appending the rows of steps start+1, start+2, ...

    A new run (start 0) begins a new file with its header. A resumed run keeps the history up to `start`
    (rows after it, from a run stopped or killed after its checkpoint, are redone and dropped; a torn last
    line too), the header once. Also returns the elapsed_s of the last row kept, which the new rows continue.
    """
    by_step: dict[int, list[str]] = {}
    if start > 0 and path.is_file():
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            for row in csv.reader(f):
                try:
                    step, _, _, elapsed = int(row[0]), float(row[1]), float(row[2]), float(row[3])
                except (ValueError, IndexError):  # the header, or a line cut short by a kill
                    continue
                if len(row) == len(LOG_HEADER) and 1 <= step <= start and math.isfinite(elapsed):
                    by_step[step] = row  # a step logged twice (an older resume): the last one counts
    rows = [by_step[k] for k in sorted(by_step)]
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(LOG_HEADER)
    w.writerows(rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text.getvalue(), encoding="utf-8", newline=""))
    return open(path, "a", newline="", encoding="utf-8"), float(rows[-1][3]) if rows else 0.0


class Trainer:
    def __init__(self, cfg: TrainConfig, base: BaseModel | None = None, on_progress: ProgressFn | None = None,
                 stop: StopFlag | None = None):
        self.cfg, self.on_progress, self.stop = cfg, on_progress, stop
        self.base = base
        self.run_dir = run_dir_for(cfg)
        self.samples: list[Path] = []
        self.weight_check = None  # training.weight_check.WeightCheck, at the end of a finished run

    # build ---------------------------------------------------------------
    def build(self) -> None:
        cfg = self.cfg
        check_name_free(cfg)  # before any work: never silently replace a finished adapter
        self.kohya = None  # kohya's dataset config: the subsets (and their class images) instead of one folder
        if cfg.dataset_config:
            from .kohya_dataset import read_kohya_dataset

            self.kohya = read_kohya_dataset(cfg.dataset_config)
            self.scan = scan_subsets(self.kohya.train, cfg.trigger, cfg.instance_template, cfg.caption_prefix_trigger,
                                     cfg.caption_ext, exclude=cfg.mask_dir, name=str(cfg.dataset_config))
        else:
            self.scan = scan_folder(cfg.images, cfg.trigger, cfg.instance_template, cfg.caption_prefix_trigger,
                                    cfg.caption_ext, exclude=cfg.mask_dir)
        if cfg.masked_loss:  # before the base model loads: no mask at all is a mistake, said at once
            check_masks(self.scan.items, mask_root(cfg), cfg.mask_dir, cfg.images or cfg.dataset_config)
        # class images the user gave: scanned now, as an uncaptioned one without a class prompt is an error
        given = self._class_scan() if self._wants_priors() and (cfg.class_images or self._reg()) else None
        self._make_accelerator()
        if not self.is_main:
            self.on_progress = None  # one progress report, from the main process
        _emit(self.on_progress, Progress(0, cfg.max_steps, message=self.scan.report()))
        if self.kohya is not None and self.kohya.not_applied:
            _emit(self.on_progress, Progress(0, cfg.max_steps, message=(
                f"dataset config {cfg.dataset_config}: not applied (LoRA Studio has no such option): "
                + ", ".join(self.kohya.not_applied))))
        # under mixed precision the frozen weights are stored in its dtype (as the diffusers examples do:
        # half the memory, no per-step casts); the LoRA weights and the optimizer stay in fp32
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        # the run's prediction type and schedule: the model's own unless the config overrides them (kohya's
        # --v_parameterization, --zero_terminal_snr); a caller's base with another one is loaded anew, not changed
        pred = None if cfg.prediction_type == "auto" else cfg.prediction_type
        zsnr = True if cfg.zero_terminal_snr else None
        if (self.base is None or cfg.quantize_base  # quantizing changes the base: never a caller's copy
                or (weight_dtype is not None and self.base.pipe.unet.dtype != weight_dtype)
                or (pred is not None and self.base.prediction_type != pred)
                or (zsnr and not self.base.zero_terminal_snr)):
            source = cfg.base if self.base is None else self.base.source
            self.base = load_base(source, device=self.device, dtype=weight_dtype, prediction_type=pred,
                                  zero_terminal_snr=zsnr)
        base = self.base
        if base.zero_terminal_snr and base.prediction_type != "v_prediction":
            raise TrainingError(f"zero_terminal_snr: {base.name} predicts {base.prediction_type}, which cannot be "
                                "trained at zero SNR (the last timestep's picture is pure noise); zero terminal SNR "
                                "is for v-prediction models (set prediction_type v_prediction if it is one)")
        if inpainting_model(base):  # its UNet wants a mask and a masked picture with every latent
            raise TrainingError(f"base: {base.name} is an inpainting model (its UNet takes 9 channels); train on the "
                                "model it was made from (e.g. SD 1.5): a LoRA from there works on both")
        te_targets = cfg.text_targets if cfg.train_text_encoder else None
        lora_mod.check_targets(base.pipe, cfg.unet_targets, te_targets)  # before minutes of encoding
        clip_skip_arg(base, cfg.clip_skip)  # SDXL, or more layers than the text encoder has: said now
        self.base_fingerprint = base_hash(base)  # of the weights as loaded, before any quantization or VAE
        if cfg.vae:  # kohya's --vae: the images encoded (and samples decoded) with another VAE
            from pipelines.vae import use_vae

            use_vae(base, cfg.vae)
        if cfg.quantize_base:
            from pipelines.quantize import quantize_frozen

            frozen = ("unet",) if cfg.train_text_encoder else ("unet", *lora_mod.TEXT_ENCODERS)
            self.quantized = quantize_frozen(base.pipe, cfg.quantize_base, frozen)
        self.resolution = cfg.resolution or base.native_resolution
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(cfg.to_toml())
        self.examples = build_examples(cfg, base, self.scan, self.resolution, masks=cfg.masked_loss)
        if cfg.masked_loss:
            self._report_masks()
        self.priors: list[Example] = []
        if self._wants_priors():
            cscan = given
            if cscan is None:  # generated with the base model (cached)
                if self.is_main:  # the main process generates missing class images; the others wait, then read
                    class_images_folder(cfg, base, self.resolution)
                self.accelerator.wait_for_everyone()
                cscan = self._class_scan(class_images_folder(cfg, base, self.resolution))
            if cscan.subsets:
                _emit(self.on_progress, Progress(0, cfg.max_steps, message="class images: " + cscan.report()))
            # at each size the training images come in, so that a step's class rows stack with its own rows
            for size in sorted({ex.size for ex in self.examples}):
                self.priors += build_examples(cfg.replace(random_flip=False, crop="center"), base, cscan,
                                              self.resolution, prior=True, size=size)
            for ex in self.priors:
                ex.prior = True
        self.preserve: list[str] = []
        base_images: list[Example] = []
        if cfg.preserve_weight > 0:
            caps = [it.caption for it in self.scan.items]
            swaps = list(dict.fromkeys([*cfg.preserve_swaps, *trigger_neighbours(base, cfg.trigger, caps,
                                                                                   cfg.preserve_neighbours)]))
            self.preserve = preservation_prompts(cfg, caps, swaps)
            if swaps and self.is_main:
                _emit(self.on_progress, Progress(0, cfg.max_steps, message=(
                    f"base preservation: the trigger's place also filled with {', '.join(swaps)}")))
            if cfg.preserve_images:
                if self.is_main:
                    _emit(self.on_progress, Progress(0, cfg.max_steps, message=(
                        f"base preservation: {len(self.preserve)} trigger-free prompts; base images "
                        f"({cfg.preserve_images}, cached after the first run)")))
                    preserve_images_folder(cfg, base, self.resolution, self.preserve)
                self.accelerator.wait_for_everyone()
                pscan = scan_folder(preserve_images_folder(cfg, base, self.resolution, self.preserve), cfg.trigger,
                                    "", prefix_trigger=False)
                base_images = build_examples(cfg.replace(random_flip=False, crop="center"), base, pscan,
                                             self.resolution)
        # one global batch of batch_size x processes per step; process r trains on its r-th slice
        global_batch = cfg.batch_size * self.world
        self.schedule = BatchSchedule(self.examples, global_batch, cfg.seed, cfg.repeats)
        self.priors_by_size: dict[tuple[int, int], list[Example]] = {}
        for ex in self.priors:
            self.priors_by_size.setdefault(ex.size, []).append(ex)
        self.prior_schedules = {size: BatchSchedule(exs, global_batch, cfg.seed + 7)
                                for size, exs in self.priors_by_size.items()}
        torch.manual_seed(cfg.seed)  # LoRA A matrices are initialised from the global RNG
        self.lora_configs = {} if cfg.textual_inversion else lora_mod.attach(
            base.pipe, cfg.rank, cfg.lora_alpha, cfg.unet_targets, te_targets, cfg.dropout,
            conv_rank=cfg.lora_conv_rank if cfg.lora_conv_rank != cfg.rank else None,
            conv_alpha=cfg.lora_conv_alpha if cfg.lora_conv_alpha != cfg.lora_alpha else None,
            network=cfg.network, lokr_factor=cfg.lokr_factor, dora=cfg.dora)
        self.components = list(self.lora_configs)
        # pivotal tuning / textual inversion: the trigger's own trainable token vectors (training.pivotal)
        self.pivotal = None
        if cfg.pivotal or cfg.textual_inversion:
            from . import pivotal

            self.pivotal = pivotal.attach(base, cfg)
            self.ti_steps = cfg.max_steps if cfg.textual_inversion else pivotal.training_steps(cfg)
            _emit(self.on_progress, Progress(0, cfg.max_steps, message=(
                f"textual inversion: '{cfg.trigger}' becomes {cfg.ti_vectors} new token vector(s), trained at lr "
                f"{cfg.lr_ti:g}; the model itself stays as it is" if cfg.textual_inversion else
                f"pivotal tuning: '{cfg.trigger}' becomes {cfg.ti_vectors} new token vector(s), trained for "
                f"{self.ti_steps} of {cfg.max_steps} steps at lr {cfg.lr_ti:g}")))
        self.text = TextCache(base, live=cfg.train_text_encoder or self.pivotal is not None,
                              keep=not cfg.shuffle_tags, clip_skip=cfg.clip_skip)
        self.noise_scheduler = self._noise_scheduler()
        self.norms = (0, 0.0, 0.0)  # max-norm regularisation: layers scaled so far, mean and largest norm
        self.unet_dtype = base.pipe.unet.dtype
        if self.preserve:
            self.adapters_off = AdaptersOff([getattr(base.pipe, c) for c in self.components])
            with self.adapters_off, torch.no_grad():  # the base model's embeddings, fixed for the run
                self.preserve_cond = encode_text(base, self.preserve, cfg.clip_skip)
            self.preserve_inputs = self.examples + self.priors + base_images
            self.preserve_by_size: dict[tuple[int, int], list[int]] = {}
            for i, ex in enumerate(self.preserve_inputs):
                self.preserve_by_size.setdefault(ex.size, []).append(i)
        self._build_optimizer()
        # the training step's UNet: compiled on request (the pipeline's own stays as it is, for samples and saving)
        self.unet = torch.compile(base.pipe.unet) if cfg.compile_unet else base.pipe.unet
        if cfg.gradient_checkpointing:
            base.pipe.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for comp in self.components[1:]:
                    getattr(base.pipe, comp).gradient_checkpointing_enable()

    def _noise_scheduler(self):
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(self.base.pipe.scheduler.config)
        timestep_range(self.cfg, sched.config.num_train_timesteps)  # a bad range fails before the first step
        return sched

    def _make_accelerator(self) -> None:
        """accelerate's view of this process: one of N when started by `accelerate launch`/torchrun."""
        from accelerate import Accelerator

        from pipelines.base_models import default_device

        cfg = self.cfg
        wanted = torch.device(cfg.device) if cfg.device else default_device()
        if cfg.mixed_precision == "fp16" and wanted.type != "cuda":
            raise ConfigError("mixed_precision: fp16 needs a CUDA GPU; use 'bf16' or 'no' on this device")
        if cfg.optimizer == "adamw8bit" and wanted.type != "cuda":
            raise ConfigError("optimizer: adamw8bit (bitsandbytes) needs a CUDA GPU; use 'adamw' here")
        if "WORLD_SIZE" not in os.environ:
            # one process (CLI, UI, tests): each run may choose its own mixed precision, but accelerate
            # keeps one state per process; start it afresh for this run
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=1,
                                       cpu=wanted.type == "cpu")
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        # several processes: each takes the device accelerate assigned to it (cuda:<local rank>, or cpu)
        self.device = self.accelerator.device if self.world > 1 else wanted
        if cfg.quantize_base:
            from pipelines.quantize import check_available

            check_available(cfg.quantize_base, self.device)

    def _build_optimizer(self) -> None:
        from diffusers.optimization import get_scheduler

        cfg, pipe = self.cfg, self.base.pipe
        groups = [{"params": lora_mod.trainable_params(pipe.unet), "lr": cfg.lr_unet}] if self.components else []
        for comp in self.components[1:]:
            groups.append({"params": lora_mod.trainable_params(getattr(pipe, comp)), "lr": cfg.lr_text})
        if self.pivotal is not None:
            groups.append({"params": self.pivotal.params, "lr": cfg.lr_ti})
        from .optimizers import build

        self.optimizer = build(cfg.optimizer, groups, cfg.lr_unet, cfg.weight_decay, cfg.optimizer_args)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                          num_training_steps=cfg.max_steps)
        self.params = [p for g in groups for p in g["params"]]

    # state -----------------------------------------------------------------
    def live_alphas(self) -> dict[str, float] | None:
        """LoHa / LoKr: the attached layers' own alphas, saved with the file and checked on continuing (a LoKr
        of two full factors trains at its rank, see lora.full_lokr_scale); None for LoRA, whose come from cfg."""
        if self.cfg.network == "lora":
            return None
        return lora_mod.module_alphas(self.base.pipe, self.components)

    def _restore(self) -> int:
        cfg = self.cfg
        if cfg.init_adapter and cfg.textual_inversion:  # an embedding file to train on
            self._continue_inversion(Path(cfg.init_adapter))
        elif cfg.init_adapter:
            from pipelines.weights_io import load_safetensors

            from pipelines.embeddings import split_bundled

            sd, meta = load_safetensors(cfg.init_adapter, check_finite=True)
            sd, words = split_bundled(sd, str(cfg.init_adapter))
            self._continue_embedding(words, cfg.init_adapter)
            sd, alphas = lora_mod.adapter_as_peft(self.base.pipe, sd, meta, cfg.init_adapter, network=cfg.network,
                                                  components=self.components, family=self.base.family)
            lora_mod.load_lora_state_dict(self.base.pipe, sd, self.components, cfg.init_adapter)
            lora_mod.check_alphas(sd, alphas, cfg.lora_alpha, cfg.lora_conv_alpha, cfg.init_adapter,
                                  live=self.live_alphas())
        if not cfg.resume:
            return 0
        ckpt = find_checkpoint(self.run_dir, cfg.resume)
        if ckpt is None:
            raise TrainingError(f"resume: no checkpoint found for '{cfg.resume}' in {self.run_dir / 'checkpoints'}")
        adapter, state = read_checkpoint(ckpt, cfg)
        if self.pivotal is not None:
            self._continue_embedding(state.get("embeddings", {}), str(ckpt))
        if cfg.network != "lora":  # LyCORIS names: onto this run's layers
            adapter, _ = lora_mod.lycoris_as_peft(self.base.pipe, self.components, adapter, self.base.family,
                                                  str(ckpt))
        lora_mod.load_lora_state_dict(self.base.pipe, adapter, self.components, str(ckpt))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        _emit(self.on_progress, Progress(int(state["step"]), cfg.max_steps, message=f"resumed from {ckpt}"))
        return int(state["step"])

    def _continue_inversion(self, path: Path) -> None:
        """--init-adapter with textual inversion: an embedding file (A1111's, kohya's, ComfyUI's, this app's) whose
        vectors train on."""
        from pipelines.embeddings import read_embedding

        self.pivotal.load(read_embedding(path), str(path))

    def embeddings(self) -> dict[str, dict[str, torch.Tensor]]:
        """The run's trained embedding ({trigger: vectors}) for the adapter file; {} without pivotal tuning."""
        return {self.cfg.trigger: self.pivotal.vectors()} if self.pivotal is not None else {}

    def _continue_embedding(self, words: dict, source) -> None:
        """A file to continue from: its bundled embedding of the trigger goes on training with pivotal tuning;
        one without pivotal tuning would be lost from the result, so it is refused."""
        cfg = self.cfg
        if words and self.pivotal is None:
            raise ConfigError(f"init_adapter: {source} carries a trained embedding ({', '.join(words)}): continue it "
                              "with pivotal = true, or its word would lose its meaning")
        if self.pivotal is None:
            return
        key = next((w for w in words if w.casefold() == cfg.trigger.casefold()), None)
        if key is not None:
            self.pivotal.load(words[key], str(source))
        elif words:
            raise ConfigError(f"trigger: {source} carries an embedding of '{next(iter(words))}', not of "
                              f"'{cfg.trigger}': continue it with that trigger word")

    def _checkpoint(self, step: int) -> Path | None:
        if not self.is_main:  # all processes hold the same weights: the main one writes them
            return None
        sd = lora_mod.lora_state_dict(self.base.pipe, self.components)
        path = write_checkpoint(self.run_dir, step, sd, self.optimizer.state_dict(),
                                self.lr_scheduler.state_dict(), self.cfg, self.base.family,
                                unet_layout(self.base.pipe.unet), live_alphas=self.live_alphas(),
                                embeddings=self.embeddings())
        prune_checkpoints(self.run_dir, self.cfg.checkpoints_keep)
        return path

    # step ------------------------------------------------------------------
    def _micro_batch(self, k: int) -> tuple[list[Example], list[Example]]:
        """The global micro-batch k (batch_size x processes instance examples, as many priors)."""
        inst = [self.examples[i] for i in self.schedule(k)]
        if not self.prior_schedules:
            return inst, []
        size = inst[0].size
        return inst, [self.priors_by_size[size][i] for i in self.prior_schedules[size](k)]

    def _row_caption(self, caption: str, k: int, row: int) -> str:
        """Instance row `row` (of the global micro-batch k)'s caption: tags shuffled / dropped as configured,
        the same for (seed, k, row) whatever the number of processes, and after a resume."""
        cfg = self.cfg
        if not (cfg.shuffle_tags or cfg.caption_dropout):
            return caption
        rng = random.Random(f"{cfg.seed}:{k}:{row}")
        return vary_caption(caption, rng, cfg.shuffle_tags, cfg.keep_tokens, cfg.caption_dropout)

    def _shard(self, inst: list[Example], prior: list[Example], gen: torch.Generator):
        """This process's slice of a global micro-batch, and its slice of noise and timesteps.

        Noise is drawn for the whole global batch, so N processes with batch b see exactly the
        samples, noise and timesteps of one process with batch N*b.
        """
        shape = (len(inst) + len(prior), *inst[0].latent.shape)
        drawn = draw_noise(shape, gen, self.cfg, self.noise_scheduler.config.num_train_timesteps)
        b, r = self.cfg.batch_size, self.rank
        rows = list(range(r * b, (r + 1) * b))
        if prior:
            rows += [len(inst) + i for i in range(r * b, (r + 1) * b)]
        return inst[r * b:(r + 1) * b], prior[r * b:(r + 1) * b], tuple(x[rows] for x in drawn)

    def _preservation_rows(self, gen: torch.Generator, size: tuple[int, int]):
        """This process's base-preservation rows: (examples, indices into the trigger-free prompts,
        (noise, timesteps)).

        Drawn from `gen` after the instance batch, for the whole global batch like `_shard`, so the
        rows of step k depend only on (seed, k).
        """
        if not self.preserve:
            return None
        gb, b, r = self.cfg.batch_size * self.world, self.cfg.batch_size, self.rank
        idx = torch.randint(len(self.preserve_inputs), (gb,), generator=gen).tolist()
        pidx = torch.randint(len(self.preserve), (gb,), generator=gen).tolist()
        # latents of the instance batch's bucket (the rows are stacked into one batch); the instance
        # examples are among the inputs, so every bucket has some
        same = self.preserve_by_size[size]
        idx = [same[i % len(same)] for i in idx]
        shape = (gb, *self.preserve_inputs[idx[0]].latent.shape)
        drawn = draw_noise(shape, gen, self.cfg, self.noise_scheduler.config.num_train_timesteps)
        rows = slice(r * b, (r + 1) * b)
        return [self.preserve_inputs[i] for i in idx[rows]], pidx[rows], tuple(x[rows] for x in drawn)

    @torch.no_grad()
    def _base_prediction(self, latents: torch.Tensor, noise_t, pres, tids) -> torch.Tensor:
        """The base model's prediction (every LoRA layer bypassed) on the preservation rows."""
        n = len(pres[0])
        rows = tuple(x[-n:] for x in noise_t)
        t = rows[1].to(latents.device)
        noisy = noisy_input(self.noise_scheduler, latents[-n:], rows)
        pe, pooled = self.preserve_cond
        cond = pe[pres[1]].to(latents.device)
        kwargs = {}
        if pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled[pres[1]], "time_ids": tids[-n:]}
        with self.adapters_off:
            pred = self.unet(noisy.to(self.unet_dtype), t, cond.to(self.unet_dtype), **kwargs).sample
        return pred.float()

    def _sync_gradients(self, loss: float) -> float:
        """Average the LoRA gradients (and the loss) over processes, with accelerate's all-reduce."""
        if self.world == 1:
            return loss
        params = [p for p in self.params if p.requires_grad]  # pivotal vectors done: not given a gradient again
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss], device=grads[0].device)])
        flat = self.accelerator.reduce(flat, reduction="mean")
        i = 0
        for p in params:
            n = p.numel()
            p.grad = flat[i:i + n].view_as(p).to(p.dtype)
            i += n
        return float(flat[-1])

    @staticmethod
    def _loss_mask(inst: list[Example], rows: int, latents: torch.Tensor) -> torch.Tensor | None:
        """(rows, 1, h, w) loss weights: the instance rows' masks, 1 elsewhere; None when no row has a mask."""
        if all(ex.mask is None for ex in inst):
            return None
        mask = torch.ones((rows, 1, *latents.shape[2:]), device=latents.device)
        for i, ex in enumerate(inst):
            if ex.mask is not None:
                mask[i] = ex.mask.to(latents.device)
        return mask

    def _stop_requested(self) -> bool:
        """The stop flag; with several processes, any one's request stops all at the same step."""
        want = self.stop is not None and self.stop.is_set()
        if self.world == 1:
            return want
        flag = torch.tensor([1.0 if want else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def train_step(self, step: int) -> float:
        cfg, base = self.cfg, self.base
        device = base.device
        torch.manual_seed(cfg.seed * 7919 + step)  # LoRA dropout
        if self.pivotal is not None and step >= self.ti_steps and not self.pivotal.frozen:
            self.pivotal.freeze()  # the trigger's vectors are done; the LoRA goes on (cached captions again)
            self.text.live = cfg.train_text_encoder
            self.text.cache.clear()
        total = 0.0
        for micro in range(cfg.grad_accum):
            k = step * cfg.grad_accum + micro
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
            inst, prior, noise_t = self._shard(*self._micro_batch(k), gen)
            pres = self._preservation_rows(gen, inst[0].size)
            exs = inst + prior + (pres[0] if pres else [])
            captions = ([self._row_caption(e.caption, k, self.rank * cfg.batch_size + i) for i, e in enumerate(inst)]
                        + [e.caption for e in prior] + ([self.preserve[i] for i in pres[1]] if pres else []))
            if pres:
                noise_t = tuple(torch.cat([a, b]) for a, b in zip(noise_t, pres[2]))
            latents = torch.stack([e.latent for e in exs]).to(device)  # (B, 4, h, w)
            with self.accelerator.autocast():
                cond, pooled = self.text(captions)
                tids = sdxl_time_ids(exs, device) if pooled is not None else None
                tail = self._base_prediction(latents, noise_t, pres, tids) if pres else None
                per = diffusion_loss(base, self.noise_scheduler, latents, cond, pooled, tids, None, cfg,
                                     self.unet_dtype, noise_t, tail_target=tail, unet=self.unet,
                                     mask=self._loss_mask(inst, len(exs), latents))
            n, m = len(inst), len(prior)
            loss = per[:n].mean()
            if prior:
                loss = loss + cfg.prior_loss_weight * per[n:n + m].mean()
            if pres:
                loss = loss + cfg.preserve_weight * per[n + m:].mean()
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at step {step + 1}: training stopped, nothing non-finite was saved. "
                    "Lower the learning rate (lr_unet/lr_text), or turn off mixed precision."
                )
            self.accelerator.backward(loss / cfg.grad_accum)
            total += loss.item() / cfg.grad_accum
        total = self._sync_gradients(total)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.optimizer.step()
        if cfg.scale_weight_norms:
            scaled, mean, top = lora_mod.cap_update_norms([getattr(base.pipe, c) for c in self.components],
                                                          cfg.scale_weight_norms)
            self.norms = (self.norms[0] + scaled, mean, top)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def _reg(self) -> list:
        """The dataset config's class-image subsets (is_reg), if any."""
        return self.kohya.reg if self.kohya is not None else []

    def _wants_priors(self) -> bool:
        cfg = self.cfg
        return bool(cfg.class_images or cfg.class_prompt or self._reg()) and cfg.num_class_images > 0

    def _class_scan(self, folder: str | Path | None = None) -> ScanResult:
        """The class images with their captions: a caption file's or a kohya folder's, else the class prompt;
        an image with none of these and no class prompt is an error that names it."""
        cfg = self.cfg
        if folder is None and self._reg():
            cscan = scan_subsets(self._reg(), cfg.trigger, "{trigger}", prefix_trigger=False,
                                 caption_ext=cfg.caption_ext, name=f"{cfg.dataset_config} (is_reg subsets)")
        else:
            cscan = scan_folder(folder or cfg.class_images, cfg.trigger, "{trigger}", prefix_trigger=False,
                                caption_ext=cfg.caption_ext)
        for it in cscan.items:
            if it.source == "template":
                if not cfg.class_prompt:
                    raise ConfigError(
                        f"class_prompt: the class image {it.path} has no caption (no {cfg.caption_ext} file beside "
                        "it, not in a kohya '<repeats>_<class>' folder): give the class prompt, e.g. "
                        "--class-prompt 'a photo of a dog'")
                it.caption = cfg.class_prompt
        return cscan

    def _report_masks(self) -> None:
        """Masked loss: how many images have a mask, and how much of the picture counts (said at the start)."""
        cfg = self.cfg
        masks = [ex.mask for ex in self.examples if ex.mask is not None]
        n = len(masks) * len(self.scan.items) // len(self.examples)  # every image gives as many examples
        mean = float(torch.stack([m.mean() for m in masks]).mean())
        _emit(self.on_progress, Progress(0, cfg.max_steps, message=(
            f"masked loss: {n} of {len(self.scan.items)} images have a mask (on average {100 * mean:.0f}% of the "
            "picture counts)" + ("" if n == len(self.scan.items) else "; the others count whole"))))

    # samples ----------------------------------------------------------------
    def sample_prompts(self) -> list[str]:
        return self.cfg.all_sample_prompts() or [self.cfg.instance_template.format(trigger=self.cfg.trigger)]

    def make_samples(self, step: int) -> list[Path]:
        from pipelines.generation import GenerationRequest, generate, save_png

        from .sample_prompts import parse_sample_prompt

        if not self.is_main:
            return []
        cfg, base = self.cfg, self.base
        out = []
        unet = base.pipe.unet
        was_training = unet.training
        unet.eval()
        for i, line in enumerate(self.sample_prompts()):
            sp = parse_sample_prompt(line)  # kohya's --n, --w, --h, --d, --s, --l, --ss over the run's settings
            req = GenerationRequest(prompt=sp.prompt, negative_prompt=sp.negative_prompt,
                                    steps=sp.steps or cfg.sample_steps,
                                    seed=cfg.sample_seed if sp.seed is None else sp.seed,
                                    width=sp.width or self.resolution, height=sp.height or self.resolution,
                                    guidance=7.0 if sp.guidance is None else sp.guidance,
                                    scheduler=sp.sampler or cfg.sample_sampler, clip_skip=cfg.clip_skip)
            img = generate(base, req, extra_parameters={"LoRA": cfg.name, "LoRA step": str(step)})[0]
            out.append(save_png(img, self.run_dir / "samples" / f"step-{step:06d}-{i}.png"))
        unet.train(was_training)
        self.samples += out
        return out

    # run --------------------------------------------------------------------
    def run(self) -> TrainResult:
        t_start = time.time()
        self.build()
        cfg = self.cfg
        start = self._restore()
        self.base.pipe.unet.train()
        if self.is_main:
            logf, logged = open_log(self.run_dir / "log.csv", start)
        else:
            logf, logged = open(os.devnull, "w"), 0.0
        writer = csv.writer(logf)
        loss = None
        ckpt = None
        stopped = False
        t0 = time.time()
        step = start
        try:
            for step in range(start, cfg.max_steps):
                if self._stop_requested():
                    stopped = True
                    break
                loss = self._guarded_step(step)
                done = step + 1
                lr = step_size(self.optimizer)  # Prodigy: its own step (d x lr), what the log should show
                elapsed = time.time() - t0
                writer.writerow([done, f"{loss:.6f}", f"{lr:.3e}", f"{logged + elapsed:.2f}"])
                logf.flush()  # a killed run keeps its log up to the last step
                samples: list[Path] = []
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                    ckpt = self._checkpoint(done)
                if cfg.sample_every and done % cfg.sample_every == 0 and done < cfg.max_steps:
                    samples = self.make_samples(done)
                eta = elapsed / (done - start) * (cfg.max_steps - done)
                _emit(self.on_progress, Progress(done, cfg.max_steps, loss, lr, elapsed, eta, samples))
            else:
                step = cfg.max_steps
        finally:
            logf.close()
        if stopped:
            if step > start:
                ckpt = self._checkpoint(step)
            _emit(self.on_progress, Progress(step, cfg.max_steps, loss, message=f"stopped; checkpoint {ckpt}"))
            return TrainResult(None, self.run_dir, step, loss, time.time() - t_start, self.samples, self.scan,
                               stopped=True, checkpoint=ckpt)
        if cfg.scale_weight_norms and step > start:
            n, mean, top = self.norms
            _emit(self.on_progress, Progress(cfg.max_steps, cfg.max_steps, message=(
                f"max norm {cfg.scale_weight_norms:g}: a layer's update was scaled down {n} time(s) over steps "
                f"{start + 1}-{cfg.max_steps}; the updates' norms now average {mean:.3g}, the largest {top:.3g}")))
        final = self.make_samples(cfg.max_steps)
        final_shown = False
        if cfg.weight_check and self.is_main and not cfg.textual_inversion:  # an embedding has no weight
            from .weight_check import check_weights

            # the last samples now, not after the check: the page shows them while it runs
            _emit(self.on_progress, Progress(cfg.max_steps, cfg.max_steps, samples=final, message=CHECKING))
            final_shown = True
            self.weight_check = check_weights(self)
            if self.weight_check is not None:
                wc = self.weight_check
                msg = (f"weight check: keeps the base intact up to {wc.safe_up_to:g}" if wc.safe_up_to
                       else "weight check: trigger-free pictures change already at 0.25" if wc.kept is not None
                       else f"weight check: pictures in {wc.sheet}")
                if (sc := wc.step_check) is not None and sc.look_kept is not None:
                    msg += (f"; acting from step {sc.suggested} of {sc.steps} keeps more of it" if sc.suggested
                            else "; best acting at every step")
                _emit(self.on_progress, Progress(cfg.max_steps, cfg.max_steps, message=msg))
        save = export_embedding if cfg.textual_inversion else export_adapter
        path = save(self, final[0] if final else None) if self.is_main else None
        self.accelerator.wait_for_everyone()
        _emit(self.on_progress, Progress(cfg.max_steps, cfg.max_steps, loss, elapsed_s=time.time() - t0,
                                         eta_s=0.0, samples=[] if final_shown else final, message=f"saved {path}"))
        return TrainResult(path, self.run_dir, cfg.max_steps, loss, time.time() - t_start, self.samples, self.scan,
                           checkpoint=ckpt)

    def _guarded_step(self, step: int) -> float:
        try:
            return self.train_step(step)
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"out of memory at step {step + 1}; the last checkpoint is intact. Try a smaller batch_size or "
                "resolution, gradient_checkpointing = true, or mixed_precision = 'bf16'/'fp16'."
            ) from None


CHECKING = ("checking the adapter: pictures with and without it at a few weights and start steps, for its model "
            "card (about half a minute on a CPU, seconds on a GPU)")


def train(cfg: TrainConfig, on_progress: ProgressFn | None = None, stop: StopFlag | None = None,
          base: BaseModel | None = None) -> TrainResult:
    """Train one LoRA adapter as described by `cfg`; see `Trainer`."""
    return Trainer(cfg, base=base, on_progress=on_progress, stop=stop).run()


__all__ = ["train", "Trainer", "Progress", "TrainResult", "DatasetError"]
