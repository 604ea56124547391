"""Train the embedded toy Stable Diffusion 1.x base model from scratch.

    python -m training.toy_base [--work .work/toy_base] [--out sample_data/toy-sd] [--device cuda]

The defaults are the recipe of the shipped weights (UNet stage: about 4 minutes on one H200 GPU, many
hours on a 2-core CPU). A CPU-sized run, about 100 minutes on 2 cores, that draws less well:
    python -m training.toy_base --device cpu --unet-batch 32 --unet-steps 4000 --unet-lr 1e-3 --n-latents 24000

Two stages, each resumable from its last checkpoint in the work folder:
  1. the VAE (AutoencoderKL, 3 blocks: 64x64 RGB <-> 4x16x16 latents) on all of the toy world;
  2. the UNet and the CLIP text encoder jointly, on cached latents of the base part of the world
     (solid circles, squares, triangles), with 10% empty captions for classifier-free guidance.
The result is a genuine diffusers `StableDiffusionPipeline` folder with safetensors weights.

Captions: the shipped weights were trained on one template ("a blue triangle on a yellow background"
and two shorter forms); the recipe now draws from toy_world.TEMPLATES with filler words, so every
token has a trained embedding. `--init-from FOLDER` fine-tunes an exported base instead of starting
from scratch (token embeddings carried over by token text, as the vocabulary grows):
    # the shipped base re-captioned (3 shapes): 600 steps of 128, 20 minutes on 2 CPU cores, keeps shape 1.00
    python -m training.toy_base --device cpu --vae-from sample_data/toy-sd --init-from sample_data/toy-sd \
        --unet-batch 128 --unet-lr 2e-4 --unet-steps 600 --n-latents 24000 --out .work/toy-sd-v11
World v2 (eight base shapes, `LORA_STUDIO_TOY_WORLD=v2`): `bash bench/gpu_toy_base_v2.sh` on a GPU.
World v2s (six: the star's parts only, `LORA_STUDIO_TOY_WORLD=v2s`) on a CPU: the command in
bench/checkpoints/toy-sd-v2s-wip/README.md (continue from there).
World v1r (the v1 shapes, also "striped" and "ringed", so the held-out outline is a recombination;
`LORA_STUDIO_TOY_WORLD=v1r`), from the shipped base on a CPU (continue from bench/checkpoints/toy-sd-v1r-wip):
    LORA_STUDIO_TOY_WORLD=v1r python -m training.toy_base --device cpu --work .work/v1r --out .work/toy-sd-v1r \
        --vae-from sample_data/toy-sd --init-from sample_data/toy-sd --unet-batch 256 --unet-lr 3e-4 \
        --unet-steps 450 --n-latents 48000 --eval-every 150 --ema-decay 0.99
World v1t (v1r and "framed": a thin line, the part an outline needs that v1r lacks; `LORA_STUDIO_TOY_WORLD=v1t`),
from a v1r base on a CPU (continue from bench/checkpoints/toy-sd-v1t-wip):
    LORA_STUDIO_TOY_WORLD=v1t python -m training.toy_base --device cpu --work .work/v1t --out .work/toy-sd-v1t \
        --vae-from sample_data/toy-sd --init-from bench/checkpoints/toy-sd-v1r-wip --unet-batch 256 --unet-lr 5e-4 \
        --unet-steps 600 --n-latents 48000 --eval-every 150 --ema-decay 0.99
    # the checkpoint's weights (1950 steps) came from two more runs of that command with --init-from the
    # previous output and --oversample style=framed:3 --oversample background=white:1.5 --oversample background=gray:1.5
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import toy_world
from .toy_tokenizer import build_vocab, write_tokenizer
from .toy_world import (BASE_SHAPES, BASE_STYLE, BASE_STYLES, SHAPES, STYLES, V1_SHAPES, draw, parse_caption,
                         sample_spec, varied_caption)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "sample_data" / "toy-sd"
DEFAULT_WORK = ROOT / ".work" / "toy_base"

VAE_STEPS, VAE_BATCH = 1000, 16
# The shipped model: 2000 steps of 384 (768k samples) on 96k drawings; on one H200 about 4 minutes.
# Batch size is what made the shapes: 4000 steps of 32 (128k samples, 99 minutes on 2 CPU cores)
# scored color 0.78 shape 0.40 in bench/quality.py base, this recipe 0.9+/0.9+.
UNET_STEPS, UNET_BATCH = 2000, 384
UNET_LR = 1.5e-3
PREDICTION_TYPE = "v_prediction"
EVAL_EVERY = 250
N_LATENTS = 96000
NOISE_OFFSET = 0.1
CKPT_EVERY = 50


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,  # 4+ channels per group: one channel per group would normalise colour away
        sample_size=64,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = build_vocab()
    cfg = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=128,
        hidden_act="quick_gelu",
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return CLIPTextModel(cfg)


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=PREDICTION_TYPE,
        steps_offset=1,
    )


def render_batch(rng: random.Random, n: int, shapes, styles) -> torch.Tensor:
    """(n, 3, 64, 64) in [-1, 1]."""
    arr = np.stack(
        [np.asarray(draw(sample_spec(rng, shapes=shapes, style=rng.choice(styles)))) for _ in range(n)]
    )
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(work: Path, steps: int = VAE_STEPS):
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    ck = work / "vae.pt"
    step = 0
    if ck.exists():
        st = torch.load(ck, weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        _log(f"vae: resumed at step {step}")
    rng = random.Random(1000 + step)
    torch.manual_seed(1000 + step)
    t0 = time.time()
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, 2e-3)
        x = render_batch(rng, VAE_BATCH, SHAPES, STYLES)  # (B, 3, 64, 64)
        post = vae.encode(x).latent_dist
        # Decode the posterior mean: sampled noise at this scale washes the shapes' colours out to
        # their average, and the pipeline only ever uses the mean (training) or decodes (inference).
        rec = vae.decode(post.mean).sample
        kl = post.kl().mean() / (64 * 64 * 3)
        # weight the shape's pixels up: they are a small share of the image but carry its colour
        bg = x[:, :, :1, :1]  # (B, 3, 1, 1) corner = background colour
        w = 1.0 + 8.0 * ((x - bg).abs().amax(dim=1, keepdim=True) > 0.1).float()  # (B, 1, 64, 64)
        pix = (w * ((rec - x).abs() + (rec - x) ** 2)).mean() / w.mean()
        low = F.l1_loss(F.avg_pool2d(rec, 8), F.avg_pool2d(x, 8))  # colour fidelity
        # latent channels 0-2 carry the 4x4-pooled colours, as SD's latents look like a small image:
        # colour then has a direct path through the bottleneck and the decoder learns it at once
        hint = F.mse_loss(post.mean[:, :3], F.avg_pool2d(x, 4))
        loss = pix + 2.0 * low + hint + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            _log(f"vae step {step}/{steps} loss {loss.item():.4f} ({(time.time() - t0) / 50:.2f}s/step)")
            t0 = time.time()
        if step % CKPT_EVERY == 0 or step == steps:
            _atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ck)
    vae.eval()
    with torch.no_grad():
        x = render_batch(random.Random(7), 128, SHAPES, STYLES)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        err = ((rec - x).abs() * 127.5).mean().item()
    _log(f"vae: mean abs reconstruction error {err:.2f}/255")
    return vae


def base_style(rng: random.Random) -> str:
    """Half solid, the rest the world's other base styles (world v1r); solid without an rng draw elsewhere."""
    if len(BASE_STYLES) == 1:
        return BASE_STYLE
    return BASE_STYLE if rng.random() < 0.5 else rng.choice(BASE_STYLES[1:])


def _draw_array(spec) -> np.ndarray:
    return np.asarray(draw(spec))


def cache_latents(vae, work: Path, n: int = N_LATENTS, device: str = "cpu") -> tuple[torch.Tensor, list]:
    """n encoded base-world drawings (posterior means) and their specs, cached in the work folder."""
    path = work / f"latents_{n}.pt"
    if path.exists():
        st = torch.load(path, weights_only=False)
        return st["latents"], st["specs"]
    rng = random.Random(2024)
    specs = [sample_spec(rng, shapes=BASE_SHAPES, style=base_style(rng)) for _ in range(n)]
    workers = min(16, os.cpu_count() or 1)
    if workers > 2:  # drawing is ~1.3 ms an image: spread it over the cores (same images, same order)
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            arrays = pool.map(_draw_array, specs, chunksize=256)
    else:
        arrays = [_draw_array(s) for s in specs]
    out = []
    vae = vae.to(device)
    with torch.no_grad():
        for i in range(0, n, 256):
            x = torch.from_numpy(np.stack(arrays[i : i + 256])).to(device).permute(0, 3, 1, 2).float()
            out.append(vae.encode(x / 127.5 - 1.0).latent_dist.mean.cpu())  # (b, 4, 16, 16)
    vae.to("cpu")
    lat = torch.cat(out)
    _atomic_save({"latents": lat, "specs": specs}, path)
    _log(f"cached {len(lat)} latents, std {lat.std().item():.3f}")
    return lat, specs


def caption_for(spec, r: random.Random) -> str:
    """10% empty (for classifier-free guidance), else one of the world's varied templates."""
    if r.random() < 0.10:
        return ""
    return varied_caption(spec, r)


def base_values(field: str) -> list[str]:
    """The values a caption field takes in the drawings the base is trained on (the current world's)."""
    return {"color": toy_world.FG_COLORS, "shape": toy_world.BASE_SHAPES, "background": toy_world.BG_COLORS,
            "style": toy_world.BASE_STYLES}[field]


def parse_oversample(rules: list[str]) -> dict[tuple[str, str], float]:
    """`--oversample FIELD=VALUE:FACTOR` rules, e.g. `style=framed:3`; an error names the bad rule."""
    names = ["color", "shape", "background", "style"]  # the ShapeSpec fields a caption names
    out: dict[tuple[str, str], float] = {}
    for rule in rules:
        field, _, rest = rule.partition("=")
        value, _, factor = rest.rpartition(":")
        if field not in names or not value:
            raise ValueError(f"--oversample {rule!r}: expected FIELD=VALUE:FACTOR with FIELD one of {names}")
        try:
            f = float(factor)
        except ValueError:
            raise ValueError(f"--oversample {rule!r}: FACTOR must be a number, got {factor!r}") from None
        if not f > 0:
            raise ValueError(f"--oversample {rule!r}: FACTOR must be above 0, got {factor}")
        known = base_values(field)
        if value not in known:  # a typo would otherwise oversample nothing, silently
            raise ValueError(f"--oversample {rule!r}: world {toy_world.WORLD}'s base drawings have no {field} "
                             f"{value!r} (they have {', '.join(known)})")
        out[(field, value)] = f
    return out


def sampling_weights(specs: list, oversample: dict[tuple[str, str], float]) -> list[float]:
    """Each cached drawing's chance to be drawn into a batch: the product of the factors of the rules it
    matches (1 when none), so `style=framed:3` makes framed drawings three times as frequent as before."""
    w = []
    for s in specs:
        x = 1.0
        for (field, value), f in oversample.items():
            if getattr(s, field) == value:
                x *= f
        w.append(x)
    return w


def init_from(folder: Path, unet, te) -> None:
    """Start from an exported toy pipeline's UNet and text encoder (a fine-tune, not from scratch).

    The tokenizer may have grown since (new words): each token's embedding row moves to the
    token's new id; tokens the old vocabulary lacked start from the mean of the old rows plus a
    little noise, as a new word in a fine-tuned CLIP does.
    """
    from safetensors.torch import load_file

    unet.load_state_dict(load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    old = load_file(folder / "text_encoder" / "model.safetensors")
    key = next((k for k in old if k.endswith("embeddings.token_embedding.weight")), None)
    if key is None:
        raise ValueError(f"{folder}: text encoder has no token embedding")
    old_emb = old.pop(key)
    old_vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    new_vocab, _ = build_vocab()
    g = torch.Generator().manual_seed(0)
    shape = te.get_input_embeddings().weight.shape  # (V_new, D)
    emb = old_emb.mean(0) + 0.02 * torch.randn(shape, generator=g)
    moved = 0
    for tokstr, i in new_vocab.items():
        j = old_vocab.get(tokstr)
        if j is not None:
            emb[i] = old_emb[j]
            moved += 1
    old[key] = emb
    own = te.state_dict()
    if key not in own:  # the file's names and this transformers version's differ by the prefix
        old = {("text_model." + k if "text_model." + k in own else k.removeprefix("text_model.")): v
               for k, v in old.items()}
    missing, unexpected = te.load_state_dict(old, strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise ValueError(f"{folder}: text encoder does not fit (missing {missing}, unexpected {unexpected})")
    _log(f"initialised from {folder}: {moved} of {len(new_vocab)} token embeddings carried over")


def draw_timesteps(batch: int, gen: torch.Generator, device: str = "cpu", high_noise: float = 0.0,
                   low_noise: float = 0.0) -> torch.Tensor:
    """One training batch's timesteps: uniform over 0-999, except the first `high_noise` share drawn from
    500-999 and the next `low_noise` share from 0-299 (with both 0, the same draws as a plain uniform batch)."""
    t = torch.randint(0, 1000, (batch,), generator=gen, device=device)
    n_high = int(round(high_noise * batch))
    if n_high:
        t[:n_high] = torch.randint(500, 1000, (n_high,), generator=gen, device=device)
    n_low = int(round(low_noise * batch))
    if n_low:
        t[n_high:n_high + n_low] = torch.randint(0, 300, (n_low,), generator=gen, device=device)
    return t


def train_unet(vae, work: Path, steps: int = UNET_STEPS, batch: int = UNET_BATCH, lr: float = UNET_LR,
               device: str = "cpu", n_latents: int = N_LATENTS, minutes: float | None = None,
               eval_every: int = EVAL_EVERY, ckpt_every: int = CKPT_EVERY, init: Path | None = None,
               high_noise: float = 0.0, ema_decay: float = 0.998,
               oversample: dict[tuple[str, str], float] | None = None, low_noise: float = 0.0):
    """Train the UNet and text encoder jointly; returns the EMA copies.

    With `minutes`, the number of steps is fixed once, after the warm-up, to what fits the budget
    at the measured speed (rounded down to 500) and stored in the checkpoint, so a resumed run
    keeps the same schedule; `--unet-steps N` with that N repeats the run.

    `high_noise`: the share of each batch whose timestep is drawn from the noisier half (500-999), where
    the prompt decides which shape is drawn; `low_noise`: the share drawn from the last steps (0-299), where
    fine lines are rendered (a thin line under one latent pixel is lost or recoloured there:
    `bench/sdedit_probe.py`); the rest stays uniform over all 1000. `ema_decay`: the EMA's
    longest horizon (0.998 averages the last ~500 steps; a short fine-tune wants a shorter one, or its EMA
    still holds the weights from before the fine-tune had settled). `oversample`: see `sampling_weights`
    (a fine-tune aimed at what the base draws worst, e.g. one style on light backgrounds).
    """
    from transformers import CLIPTokenizer

    tok_dir = work / "tokenizer"
    write_tokenizer(tok_dir)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    latents, specs = cache_latents(vae, work, n_latents, device)
    scale = 1.0 / latents.std().item()
    latents = (latents * scale).to(device)
    torch.manual_seed(0)
    unet, te = make_unet(), make_text_encoder()
    if init is not None:
        init_from(init, unet, te)
    ema_u, ema_t = make_unet(), make_text_encoder()
    ema_u.load_state_dict(unet.state_dict())
    ema_t.load_state_dict(te.state_dict())
    for m in (unet, te, ema_u, ema_t):
        m.to(device)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    sched = make_scheduler()
    ck = work / "unet.pt"
    step = 0
    if ck.exists():
        st = torch.load(ck, weights_only=False, map_location=device)
        unet.load_state_dict(st["unet"])
        te.load_state_dict(st["te"])
        ema_u.load_state_dict(st["ema_u"])
        ema_t.load_state_dict(st["ema_t"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
        steps = st.get("steps", steps) if minutes else steps
        _log(f"unet: resumed at step {step} of {steps}")
    rng = random.Random(5000 + step)
    gen = torch.Generator(device).manual_seed(5000 + step)
    ema_live = list(ema_u.parameters()) + list(ema_t.parameters())
    token_ids: dict[str, torch.Tensor] = {}  # the captions are few: tokenize each once
    cum = None
    if oversample:
        w = sampling_weights(specs, oversample)
        cum = list(itertools.accumulate(w))
        for (field, value) in oversample:
            share = sum(x for x, s in zip(w, specs) if getattr(s, field) == value) / cum[-1]
            _log(f"oversample: {field}={value} is {share:.1%} of the drawn batches")

    def ids_for(caps: list[str]) -> torch.Tensor:
        new = [c for c in dict.fromkeys(caps) if c not in token_ids]
        if new:
            rows = tok(new, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            token_ids.update(zip(new, rows))
        return torch.stack([token_ids[c] for c in caps]).to(device)

    budget_fixed = minutes is None or step > 0
    t_start = time.time()
    t0 = time.time()
    while step < steps:
        if not budget_fixed and step == 100:  # warm-up done: size the run to the time budget
            per_step = (time.time() - t_probe) / 80
            left = minutes * 60 - (time.time() - t_start)
            steps = max(500, int(left / per_step) // 500 * 500)
            budget_fixed = True
            _log(f"unet: {per_step * 1000:.0f} ms/step, {minutes} min budget -> {steps} steps")
        if step == 20:
            t_probe = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        if cum is None:
            idx = [rng.randrange(len(latents)) for _ in range(batch)]
        else:
            idx = rng.choices(range(len(latents)), cum_weights=cum, k=batch)
        x0 = latents[torch.tensor(idx, device=device)]  # (B, 4, 16, 16)
        ids = ids_for([caption_for(specs[i], rng) for i in idx])
        # offset noise: the scaled-linear schedule leaves ~7% of the signal at t=999, and for flat
        # colour images the model then reads the image's colours out of the sampler's starting noise
        # instead of the prompt; a per-channel offset teaches it to take colour from the text
        noise = torch.randn(x0.shape, generator=gen, device=device)
        noise = noise + NOISE_OFFSET * torch.randn((x0.shape[0], x0.shape[1], 1, 1), generator=gen, device=device)
        t = draw_timesteps(batch, gen, device, high_noise, low_noise)
        xt = sched.add_noise(x0, noise, t)
        cond = te(ids)[0]  # (B, 77, 128)
        pred = unet(xt, t, cond).sample
        # v-prediction, unweighted (as SD 2.x): near t=999 the v target is -x0, so the loss makes the
        # model say what the image is from the prompt alone. With epsilon targets the loss there is
        # nearly indifferent to the prompt (predicting eps ~ x_t is almost optimal), and the first
        # version of this model (epsilon, min-SNR) learned to take colours from the starting noise.
        target = sched.get_velocity(x0, noise, t) if PREDICTION_TYPE == "v_prediction" else noise
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_live, params, 1 - decay)
        if step % 50 == 0:
            _log(f"unet step {step}/{steps} loss {loss.item():.4f} ({(time.time() - t0) / 50:.3f}s/step)")
            t0 = time.time()
        if step % ckpt_every == 0 or step == steps:
            _atomic_save(
                {
                    "unet": unet.state_dict(),
                    "te": te.state_dict(),
                    "ema_u": ema_u.state_dict(),
                    "ema_t": ema_t.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "steps": steps,
                },
                ck,
            )
        if step % eval_every == 0 or step == steps:
            _log(f"unet step {step}: {quick_eval(vae, unet, te, tok, scale)} (raw weights), "
                 f"{quick_eval(vae, ema_u, ema_t, tok, scale)} (EMA)")
    return ema_u.cpu(), ema_t.cpu(), tok, scale


def quick_eval(vae, unet, te, tok, scale: float, n_prompts: int = 48) -> str:
    """Colour/shape/background match on n_prompts base prompts, one image each (DDIM, 15 steps)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from .evaluator import load_evaluator, score
    from .toy_world import all_base_prompts, styled_base_prompts

    prompts = random.Random(11).sample(all_base_prompts(), n_prompts)
    vae.register_to_config(scaling_factor=scale)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler.from_config(make_scheduler().config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def generate(ps: list[str]) -> list:  # one image a prompt, in eval mode, the modes restored afterwards
        was_training = unet.training, te.training
        unet.eval(), te.eval()
        pipe.to(unet.device)
        with torch.no_grad():
            ims = pipe(ps, num_inference_steps=15, guidance_scale=7.0, height=64, width=64,
                       generator=torch.Generator().manual_seed(0)).images
        vae.to("cpu")
        unet.train(was_training[0]), te.train(was_training[1])
        return ims

    evaluator = load_evaluator()
    r = score(evaluator, generate(prompts), prompts)
    out = " ".join(f"{k}={r[k]:.2f}" for k in ("color", "shape", "background"))
    if set(BASE_SHAPES) != set(V1_SHAPES):  # a grown world: the shapes it knew and the new ones apart
        asked = [parse_caption(p)["shape"] for p in prompts]
        for name, group in (("old", V1_SHAPES), ("new", [s for s in BASE_SHAPES if s not in V1_SHAPES])):
            hits = [pred["shape"] == want for pred, want in zip(r["predictions"], asked) if want in group]
            out += f" shape_{name}={sum(hits) / max(1, len(hits)):.2f}"
    if len(BASE_STYLES) > 1:  # a world with rendering styles: the share drawn in the style asked for
        out += f" style_solid={sum(p['style'] == BASE_STYLE for p in r['predictions']) / len(prompts):.2f}"
        for st, pool in styled_base_prompts().items():
            sp = random.Random(12).sample(pool, 8)
            got = score(evaluator, generate(sp), sp)["predictions"]
            out += f" style_{st}={sum(p['style'] == st for p in got) / len(sp):.2f}"
    return out


def load_checkpoints(work: Path, n_latents: int = N_LATENTS, vae_from: Path | None = None):
    """The VAE and the EMA UNet/text encoder from the work folder's latest checkpoints (the VAE from
    `vae_from`, an exported pipeline folder, when the run took it from there)."""
    from transformers import CLIPTokenizer

    if vae_from is not None:
        vae = load_vae(vae_from)
    else:
        vae = make_vae()
        vae.load_state_dict(torch.load(work / "vae.pt", weights_only=False)["model"])
        vae.eval()
    st = torch.load(work / "unet.pt", weights_only=False)
    unet, te = make_unet(), make_text_encoder()
    unet.load_state_dict(st["ema_u"])
    te.load_state_dict(st["ema_t"])
    latents, _ = cache_latents(vae, work, n_latents)
    _log(f"exporting from the checkpoint at UNet step {st['step']}")
    return vae, unet, te, CLIPTokenizer.from_pretrained(work / "tokenizer"), 1.0 / latents.std().item()


def export(vae, unet, te, tok, scale: float, out: Path) -> None:
    """Write a standard diffusers SD 1.x pipeline folder (atomically: temp folder, then rename)."""
    import shutil

    from diffusers import StableDiffusionPipeline

    vae.register_to_config(scaling_factor=round(scale, 5))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    write_tokenizer(tmp / "tokenizer")  # transformers 5 saves only tokenizer.json: keep vocab.json + merges.txt
    (tmp / "README.md").write_text(
        "# toy-sd\n\nLoRA Studio's embedded toy Stable Diffusion 1.x base model, trained from scratch "
        "by `python -m training.toy_base` on procedurally drawn 64x64 images captioned like "
        "'a blue triangle on a yellow background'.\n"
    )
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def load_vae(folder: Path):
    """The VAE of an exported toy pipeline folder (to retrain only the UNet on the same latents)."""
    from safetensors.torch import load_file

    vae = make_vae()
    vae.load_state_dict(load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    return vae.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    ap.add_argument("--vae-from", type=Path, default=None,
                    help="take the VAE from this exported pipeline folder instead of training one")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="fine-tune the UNet and text encoder of this exported toy pipeline folder "
                         "(its vocabulary may be smaller) instead of training them from scratch")
    ap.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    ap.add_argument("--unet-batch", type=int, default=UNET_BATCH)
    ap.add_argument("--unet-lr", type=float, default=UNET_LR)
    ap.add_argument("--n-latents", type=int, default=N_LATENTS, help="training images drawn and encoded")
    ap.add_argument("--minutes", type=float, default=None,
                    help="size the UNet stage to this time budget (its step count is logged and kept)")
    ap.add_argument("--high-noise", type=float, default=0.0,
                    help="share of each batch trained at timesteps 500-999, where the prompt picks the shape")
    ap.add_argument("--low-noise", type=float, default=0.0,
                    help="share of each batch trained at timesteps 0-299, where fine lines are rendered")
    ap.add_argument("--ema-decay", type=float, default=0.998)
    ap.add_argument("--oversample", action="append", default=[], metavar="FIELD=VALUE:FACTOR",
                    help="draw the training images that match FIELD=VALUE (color, shape, background or style) "
                         "FACTOR times as often, e.g. style=framed:3; repeatable, factors multiply")
    ap.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    ap.add_argument("--ckpt-every", type=int, default=CKPT_EVERY)
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when there is one)")
    ap.add_argument("--export-only", action="store_true",
                    help="write the pipeline folder from the latest checkpoints without training further")
    args = ap.parse_args(argv)
    try:
        oversample = parse_oversample(args.oversample)
    except ValueError as e:
        ap.error(str(e))
    for name in ("high_noise", "low_noise"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            ap.error(f"--{name.replace('_', '-')}: a share of the batch, 0 to 1; got {getattr(args, name)}")
    if args.high_noise + args.low_noise > 1.0:
        ap.error(f"--high-noise {args.high_noise} and --low-noise {args.low_noise}: together over the whole batch")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, os.cpu_count() or 1))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.export_only:
        vae, unet, te, tok, scale = load_checkpoints(args.work, args.n_latents, args.vae_from)
    else:
        vae = load_vae(args.vae_from) if args.vae_from else train_vae(args.work, args.vae_steps)
        unet, te, tok, scale = train_unet(
            vae, args.work, args.unet_steps, args.unet_batch, args.unet_lr, device, args.n_latents,
            args.minutes, args.eval_every, args.ckpt_every, args.init_from, args.high_noise, args.ema_decay,
            oversample, args.low_noise,
        )
    export(vae, unet, te, tok, scale, args.out)
    mb = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file()) / 1e6
    _log(f"done in {(time.time() - t0) / 60:.1f} min (this invocation); {args.out} is {mb:.1f} MB")
    (args.work / "summary.json").write_text(json.dumps({"minutes": (time.time() - t0) / 60, "mb": mb}))


if __name__ == "__main__":
    main()
