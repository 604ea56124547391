"""Does the model draw what the prompt asks for? Generate toy-world prompts, score with the evaluator.

    python bench/quality.py base [--base PATH] [--images-per-prompt 2] [--steps 20] [--guidance 7]
                                 [--scheduler "DPM++ 2M Karras"] [--prompts 48]

Modes (one function each in MODES):
  base     the base model on prompts from the world it was trained on (solid circles, squares,
           triangles); reports the share of images whose colour, shape and background match.
           Last line: `color=0.xx shape=0.xx background=0.xx`.
  concept  trains a LoRA on sample_data/concept-star (a star, never seen by the base) with the
  style    default preset (style: sample_data/style-outline, outlined shapes; or any folder:
           --images DIR --trigger W --target VALUE), then reports
           fidelity (share of trigger-prompt images that show the star / the outline style),
           preservation_drop (largest drop of the base-prompt scores with the adapter loaded at
           weight 1.0, measured against the same base in the same run) and training minutes.
           Last line: `fidelity=0.xx preservation_drop=0.xx minutes=x.x`.
           `--full-unet LR` trains every UNet weight instead of a LoRA, on the same data, loss and
           steps: the ceiling of what any adapter on this base could reach in that many steps.
 A contact sheet of the
generated images, their prompts and what the evaluator saw is written to bench/out/.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from training import toy_world as tw  # noqa: E402
from training.config import ATTENTION_TARGETS  # noqa: E402
from training.evaluator import PROMPT_FIELDS, classify, load_evaluator, score  # noqa: E402

OUT_DIR = ROOT / "bench" / "out"
FIELDS = PROMPT_FIELDS  # color, shape, background


# ---------------------------------------------------------------- shared helpers


def pick_prompts(prompts: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """A deterministic, order-preserving sample of n prompts (all of them if n >= len)."""
    if n >= len(prompts):
        return list(prompts)
    keep = sorted(random.Random(seed).sample(range(len(prompts)), n))
    return [prompts[i] for i in keep]


def generate_for_prompts(
    base,
    prompts: Sequence[str],
    args: argparse.Namespace,
    cross_attention_kwargs: dict | None = None,
    stack=None,
    loras: Sequence = (),
) -> tuple[list[Image.Image], list[str]]:
    """args.images_per_prompt images per prompt; returns (images, the prompt of each image).

    With `stack`: through the app's `AdapterStack.generate` with `loras` (step ranges and all)."""
    from pipelines.generation import GenerationRequest, generate

    images: list[Image.Image] = []
    image_prompts: list[str] = []
    t0 = time.time()
    for i, prompt in enumerate(prompts):
        req = GenerationRequest(
            prompt=prompt,
            negative_prompt="",
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed + 1000 * i,  # image j of prompt i uses seed + 1000 i + j
            num_images=args.images_per_prompt,
            scheduler=args.scheduler,
        )
        kwargs = {"cross_attention_kwargs": cross_attention_kwargs} if cross_attention_kwargs else {}
        outs = stack.generate(req, loras) if stack is not None else generate(base, req, **kwargs)
        for out in outs:
            images.append(getattr(out, "image", out))  # GeneratedImage or a bare PIL image
            image_prompts.append(prompt)
        print(f"\r  generated {i + 1}/{len(prompts)} prompts ({time.time() - t0:.0f}s)",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr, flush=True)
    return images, image_prompts


def breakdown(result: dict, prompts: Sequence[str], by: str) -> dict[str, float]:
    """Share of images that match every asked field, grouped by the asked value of `by`."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for pred, prompt in zip(result["predictions"], prompts):
        want = tw.parse_caption(prompt)
        key = want[by] or "-"
        ok = all(want[k] is None or pred[k] == want[k] for k in FIELDS)
        hits[key][0] += ok
        hits[key][1] += 1
    return {k: h / n for k, (h, n) in sorted(hits.items())}


def contact_sheet(
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    predictions: Sequence[dict],
    path: Path,
    title: str = "",
    cell: int = 128,
    columns: int = 4,
) -> Path:
    """One tile per prompt: the prompt, its images (enlarged), and what the evaluator saw in each.

    A prediction is green when every field the prompt names matches, red otherwise.
    """
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    try:
        font = ImageFont.load_default(size=12)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType: the bitmap font
        font = ImageFont.load_default()
    per_tile = max(len(v) for v in groups.values()) if groups else 1
    pad, line = 6, 15
    tile_w = max(per_tile * (cell + pad) + pad, 300)
    tile_h = line + cell + 2 * line + 2 * pad
    rows = (len(groups) + columns - 1) // columns
    head = 2 * line if title else 0
    sheet = Image.new("RGB", (columns * tile_w, head + rows * tile_h), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    if title:
        d.text((pad, pad), title, fill=(0, 0, 0), font=font)
    for t, (prompt, idx) in enumerate(groups.items()):
        x0, y0 = (t % columns) * tile_w, head + (t // columns) * tile_h
        d.rectangle([x0, y0, x0 + tile_w - 1, y0 + tile_h - 1], outline=(200, 200, 200))
        d.text((x0 + pad, y0 + 2), prompt, fill=(0, 0, 0), font=font)
        want = tw.parse_caption(prompt)
        for j, i in enumerate(idx):
            x = x0 + pad + j * (cell + pad)
            sheet.paste(images[i].convert("RGB").resize((cell, cell), Image.NEAREST), (x, y0 + line))
            pred = predictions[i]
            ok = all(want[k] is None or pred[k] == want[k] for k in FIELDS)
            colour = (0, 140, 0) if ok else (200, 0, 0)
            d.text((x, y0 + line + cell + 2), f"{pred['color']} {pred['shape']}", fill=colour, font=font)
            d.text((x, y0 + 2 * line + cell + 2), f"on {pred['background']} ({pred['style']})",
                   fill=colour, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _quiet_loading() -> None:
    """No 'Loading pipeline components' / 'Loading weights' bars between our own lines."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


def summary_line(result: dict) -> str:
    """A `score` result's share for each field its prompts named (a field no prompt named is left out)."""
    return " ".join(f"{k}={result[k]:.2f}" for k in FIELDS if result[k] is not None)


def report(result: dict, prompts: Sequence[str], elapsed: float, sheet: Path) -> None:
    """Print the details, then the summary as the very last line."""
    print(f"images: {result['n']} ({len(set(prompts))} prompts), generated in {elapsed:.0f}s")
    print(f"all fields match: {result['all']:.2f}")
    for by in ("shape", "color", "background"):
        parts = " ".join(f"{k}={v:.2f}" for k, v in breakdown(result, prompts, by).items())
        print(f"all-match by asked {by}: {parts}")
    print(f"contact sheet: {sheet}")
    print(summary_line(result), flush=True)


# ---------------------------------------------------------------- modes


def run_base(args: argparse.Namespace) -> dict:
    """The base model on prompts from the world it was trained on."""
    from pipelines.base_models import DEFAULT_BASE, load_base

    prompts = pick_prompts(tw.all_base_prompts(), args.prompts, seed=args.seed)
    base_path = args.base or DEFAULT_BASE
    print(f"base: {base_path}; {len(prompts)} prompts x {args.images_per_prompt} images, "
          f"{args.steps} steps, {args.scheduler}, CFG {args.guidance}", flush=True)
    _quiet_loading()
    base = load_base(base_path)
    evaluator = load_evaluator()
    t0 = time.time()
    images, image_prompts = generate_for_prompts(base, prompts, args)
    elapsed = time.time() - t0
    result = score(evaluator, images, image_prompts)
    title = (f"base {base_path} | {args.steps} steps {args.scheduler} CFG {args.guidance} | "
             + summary_line(result))
    sheet = contact_sheet(images, image_prompts, result["predictions"], args.out_dir / "quality_base.png", title)
    if len(tw.BASE_STYLES) > 1:  # a world with rendering styles (v1r): each drawn in the style asked for
        shares = {tw.BASE_STYLE: sum(p["style"] == tw.BASE_STYLE for p in result["predictions"]) / len(images)}
        colours = {tw.BASE_STYLE: result["color"]}
        for st, pool in tw.styled_base_prompts().items():
            sp = pick_prompts(pool, max(8, args.prompts // 3), seed=args.seed)
            ims, ip = generate_for_prompts(base, sp, args)
            styled = score(evaluator, ims, ip)
            preds = styled["predictions"]
            shares[st] = sum(p["style"] == st for p in preds) / len(ims)
            colours[st] = styled["color"]
            contact_sheet(ims, ip, preds, args.out_dir / f"quality_base_{st}.png", f"base {base_path} | {st}")
        result["styles"], result["style_colors"] = shares, colours
        print("drawn in the style asked for: " + " ".join(f"{k}={v:.2f}" for k, v in shares.items()))
        # a thin line (framed) has to carry its colour in few pixels: how often each style's colour reads right
        print("colour right, by style asked: " + " ".join(f"{k}={v:.2f}" for k, v in colours.items()))
    report(result, image_prompts, elapsed, sheet)
    return result


LORA_SETS = {
    # mode: (training set folder, trigger, preset, prompt for colour c / shape s / background b, field, value)
    "concept": ("concept-star", "sks", "concept", "a {c} sks on a {b} background", "shape", tw.CONCEPT_SHAPE),
    "style": ("style-outline", "ohwx", "style", "a {c} {s} on a {b} background in ohwx style", "style",
              tw.STYLE_STYLE),
}


def lora_set(mode: str, args: argparse.Namespace) -> tuple[Path, str, str, str, str, str]:
    """(training folder, trigger, preset, trigger-prompt template, field, value) of a run: a shipped set, or
    `--images DIR --trigger W --target VALUE` (any folder of toy-world pictures, scored the same way; the
    preset is the mode's unless --set preset=... says otherwise)."""
    folder, trigger, preset, template, field, value = LORA_SETS[mode]
    if args.images is None:
        return ROOT / "sample_data" / folder, trigger, preset, template, field, value
    images = Path(args.images).expanduser()
    if not images.is_dir():
        raise SystemExit(f"bench/quality.py: --images {images}: no such folder")
    trig = (args.trigger or "").strip()
    if not trig or len(trig.split()) != 1:
        raise SystemExit("bench/quality.py: --images needs --trigger WORD (one word, the set's trigger)")
    known = tw.SHAPES if field == "shape" else tw.STYLES
    if args.target not in known:
        raise SystemExit(f"bench/quality.py: --target must name the {field} the set shows, one of "
                         f"{', '.join(known)}; got {args.target!r}")
    return images, trig, preset, template.replace(trigger, trig), field, args.target


def trigger_prompts(template: str, n: int, seed: int) -> list[str]:
    """n distinct prompts with the trigger, over colours, base shapes and backgrounds."""
    combos = [template.format(c=c, s=s, b=b) for c in tw.FG_COLORS for s in tw.BASE_SHAPES for b in tw.BG_COLORS
              if b != c]
    return pick_prompts(list(dict.fromkeys(combos)), n, seed=seed)


def train_full_unet(cfg, base, lr: float) -> None:
    """The ceiling of any adapter: fine-tune every UNet weight on the same examples, captions, noise
    draws and loss (min-SNR weighting) as the LoRA trainer, with AdamW at `lr` and the preset's steps."""
    import torch
    from diffusers import DDPMScheduler

    from training import trainer as tr
    from training.dataset import scan_folder

    if base.family == "sdxl":
        raise SystemExit("--full-unet: SD 1.x/2.x bases only (SDXL needs its extra conditioning)")
    scan = scan_folder(cfg.images, cfg.trigger, cfg.instance_template, cfg.caption_prefix_trigger)
    examples = tr.build_examples(cfg, base, scan, cfg.resolution or base.native_resolution)
    text = tr.TextCache(base, live=False)
    scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
    unet = base.pipe.unet
    unet.requires_grad_(True).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    schedule = tr.BatchSchedule(examples, cfg.batch_size, cfg.seed, cfg.repeats)
    for step in range(cfg.max_steps):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        batch = [examples[i] for i in schedule(step)]
        latents = torch.stack([e.latent for e in batch])  # (B, 4, h, w)
        noise_t = tr.draw_noise(tuple(latents.shape), gen, cfg, scheduler.config.num_train_timesteps)
        cond, _ = text([e.caption for e in batch])
        loss = tr.diffusion_loss(base, scheduler, latents, cond, None, None, None, cfg, noise_t=noise_t).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            print(f"  step {step + 1}/{cfg.max_steps} loss {loss.item():.4f}", file=sys.stderr, flush=True)
    unet.requires_grad_(False).eval()


def run_lora(mode: str, args: argparse.Namespace) -> dict:
    """Train on a shipped set with the default preset, then score fidelity and preservation."""
    from pipelines.base_models import DEFAULT_BASE, load_base
    from training.config import TrainConfig
    from training.trainer import train

    folder, trigger, preset, template, field, value = lora_set(mode, args)
    _quiet_loading()
    base = load_base(args.base or DEFAULT_BASE)
    evaluator = load_evaluator()
    prompts = pick_prompts(tw.all_base_prompts(), args.prompts, seed=args.seed)
    print(f"{mode}: base prompts without the adapter ({len(prompts)} x {args.images_per_prompt})", flush=True)
    imgs, ip = generate_for_prompts(base, prompts, args)
    before = score(evaluator, imgs, ip)
    with tempfile.TemporaryDirectory() as lib:
        cfg = TrainConfig.from_dict({"images": str(folder), "trigger": trigger,
                                     "preset": preset, "name": f"bench-{mode}", "output_dir": lib,
                                     "embeddings_dir": lib,  # a textual-inversion run's file: not the user's
                                     "base": str(args.base or DEFAULT_BASE), "quantize_base": args.quantize_base,
                                     **dict(args.set)})
        print(f"training: preset {preset}, {cfg.max_steps} steps, rank {cfg.rank}, batch {cfg.batch_size}"
              + (f", on a {args.quantize_base} base" if args.quantize_base else ""), flush=True)
        t0 = time.time()
        if args.full_unet:
            print(f"  ceiling: every UNet weight trained (not a LoRA), lr {args.full_unet}", flush=True)
            train_full_unet(cfg, base, args.full_unet)
        else:
            res = train(cfg, base=base)  # the LoRA stays attached to `base` at weight 1.0 afterwards
        minutes = (time.time() - t0) / 60
        if args.quantize_base and not args.full_unet:  # trained on a quantized copy: load it on the full base
            base.pipe.load_lora_weights(str(res.adapter_path))
        if (args.sweep or args.peer) and not args.full_unet:
            sweep = tradeoff(mode, args, lib, cfg.name, prompts, before, template, field, value, evaluator)
        resized = []
        if args.resize and not args.full_unet:
            resized = score_resized(res.adapter_path, args, prompts, before, template, field, value, evaluator)
    peers = []
    if args.peer:
        for prior in (False, True):
            peers.append(run_peer(mode, args, Path(folder), trigger, prompts, before, template, field, value,
                                  evaluator, prior))
        peers.append(run_kohya_style(mode, args, Path(folder), trigger, prompts, before, template, field, value,
                                     evaluator))
    base.pipe.unet.eval()
    print("with the adapter: trigger prompts (fidelity)", flush=True)
    tprompts = trigger_prompts(template, 16, args.seed)
    timgs, tip = generate_for_prompts(base, tprompts, args)
    trig = score(evaluator, timgs, tip)  # also: do the trigger images keep the colour etc. their prompt asks?
    preds = trig["predictions"]
    fidelity = sum(p[field] == value for p in preds) / len(preds)
    print("with the adapter: base prompts (preservation)", flush=True)
    imgs2, ip2 = generate_for_prompts(base, prompts, args)
    after = score(evaluator, imgs2, ip2)
    drops = {k: before[k] - after[k] for k in FIELDS}
    drop = max(0.0, max(drops.values()))
    contact_sheet(timgs, tip, preds, args.out_dir / f"quality_{mode}_fidelity.png",
                  f"{mode} fidelity={fidelity:.2f}")
    contact_sheet(imgs2, ip2, after["predictions"], args.out_dir / f"quality_{mode}_preservation.png",
                  f"{mode}: base prompts with the adapter | " + summary_line(after))
    print(f"base without adapter: {summary_line(before)}")
    print(f"base with adapter:    {summary_line(after)}")
    print(f"drops: " + " ".join(f"{k}={v:+.2f}" for k, v in drops.items()))
    print(f"trigger images, the other fields their prompt asks: {summary_line(trig)}")
    print(f"fidelity ({field} = {value} on {len(preds)} trigger images): {fidelity:.2f}")
    if (args.sweep or args.peer) and not args.full_unet:
        print_tradeoff(sweep, args.out_dir / f"quality_{mode}_tradeoff.png", mode)
    if peers:
        print_peer_table([r for r in sweep if r["step"] is None], peers, mode)
    if resized:
        print(f"resized copies of this adapter (loras resize; weight 1, fidelity and drop as above; trained at rank "
              f"{cfg.rank}: fidelity {fidelity:.2f}, drop {drop:.2f}):")
        print("| rank | size | least ‖ΔW‖² kept | mean kept | fidelity | drop |\n|---|---|---|---|---|---|")
        for r in resized:
            print(f"| {r['rank']} | {r['size'] / 1024:.0f} KB | {100 * r['worst']:.1f}% | {100 * r['mean']:.1f}% "
                  f"| {r['fidelity']:.2f} | {r['drop']:.2f} |")
    print(f"fidelity={fidelity:.2f} preservation_drop={drop:.2f} minutes={minutes:.1f}", flush=True)
    return {"fidelity": fidelity, "preservation_drop": drop, "minutes": minutes,
            "trigger_fields": {k: trig[k] for k in FIELDS}, "drops": drops, "trigger_images": timgs,
            "base_images": imgs2, "base_images_before": imgs}


def tradeoff(mode: str, args: argparse.Namespace, lib: str, name: str, prompts: Sequence[str], before: dict,
             template: str, field: str, value: str, evaluator) -> list[dict]:
    """Fidelity and preservation drop of the finished adapter at each of `--weights`, and of each saved
    checkpoint at weight 1.0, on a fresh copy of the base (the library's files, as a user loads them)."""
    from pipelines.base_models import DEFAULT_BASE, load_base
    from pipelines.grid import run_checkpoints
    from pipelines.library import AdapterLibrary
    from pipelines.stack import AdapterStack

    stack = AdapterStack(load_base(args.base or DEFAULT_BASE), AdapterLibrary(lib))
    points = [(None, w, name, start) for w in args.weights for start in args.starts]
    for step, path in run_checkpoints(lib, name):
        stack.load(f"{name}@step-{step}", path)
        points.append((step, 1.0, f"{name}@step-{step}", 0))
    return score_points(stack, points, args, prompts, before, template, field, value, evaluator)


def score_points(stack, points, args, prompts, before, template, field, value, evaluator) -> list[dict]:
    """Fidelity and drops of each (step, weight, adapter key, start step) point of the stack's loaded adapters."""
    from pipelines.stack import StackEntry

    tprompts = trigger_prompts(template, 16, args.seed)
    out = []
    for step, w, key, start in points:
        print(f"trade-off: {'final' if step is None else f'step {step}'} at weight {w}"
              + (f", acting from sampler step {start}" if start else ""), flush=True)
        entry = StackEntry(key, w, start=start)
        stack.set_stack([entry])
        timgs, tip = generate_for_prompts(stack.model, tprompts, args, stack=stack, loras=[entry])
        tpreds = classify(evaluator, timgs)
        fid = sum(p[field] == value for p in tpreds) / len(timgs)
        imgs, ip = generate_for_prompts(stack.model, prompts, args, stack=stack, loras=[entry])
        after = score(evaluator, imgs, ip)
        drops = {k: before[k] - after[k] for k in FIELDS}
        if start:  # what a step range does is seen, not only scored
            stem = args.out_dir / f"quality_{field}_from_step_{start}"
            contact_sheet(timgs, tip, tpreds, Path(f"{stem}_fidelity.png"), f"from step {start}: fidelity={fid:.2f}")
            contact_sheet(imgs, ip, after["predictions"], Path(f"{stem}_preservation.png"),
                          f"from step {start}: base prompts with the adapter | " + summary_line(after))
        out.append({"step": step, "weight": w, "start": start, "fidelity": fid,
                    "drop": max(0.0, max(drops.values())), **drops})
    return out


# the diffusers example takes one prompt for every image: ours when a set has no caption files
PEER_PROMPT = {"concept": "a photo of {trigger}", "style": "in the style of {trigger}"}
PEER_CLASS_PROMPT = "a shape"  # its prior preservation: the class of the toy world's subjects


def run_peer(mode: str, args: argparse.Namespace, folder: Path, trigger: str, prompts: Sequence[str],
             before: dict, template: str, field: str, value: str, evaluator, prior: bool) -> list[dict]:
    """diffusers' DreamBooth LoRA example (examples/dreambooth/train_dreambooth_lora.py, through
    bench/peer_shim.py) trained on the same images and base with its documented defaults (README: lr 1e-4,
    500 steps, batch 1, constant schedule, no warm-up; its own rank 4 and seed 0), optionally with its prior
    preservation (class prompt PEER_CLASS_PROMPT, its default 100 class images, prior loss weight 1); then
    scored like ours, at each of --weights."""
    import shutil
    import subprocess

    from pipelines.base_models import DEFAULT_BASE, load_base

    base_path = str(args.base or DEFAULT_BASE)
    with tempfile.TemporaryDirectory(prefix="quality-peer-") as work:
        work = Path(work)
        (work / "images").mkdir()
        for png in sorted(folder.glob("*.png")):  # it reads every file of the folder as an image
            shutil.copy(png, work / "images" / png.name)
        base = load_base(base_path)
        res = base.native_resolution
        cmd = [sys.executable, str(ROOT / "bench" / "peer_shim.py"), str(args.peer),
               f"--pretrained_model_name_or_path={base_path}", f"--instance_data_dir={work / 'images'}",
               f"--instance_prompt={PEER_PROMPT[mode].format(trigger=trigger)}", f"--resolution={res}",
               "--train_batch_size=1", "--max_train_steps=500", "--learning_rate=1e-4", "--lr_scheduler=constant",
               "--lr_warmup_steps=0", "--seed=0", "--center_crop", "--checkpointing_steps=100000",
               "--mixed_precision=no", f"--output_dir={work / 'out'}"]
        if prior:
            cmd += ["--with_prior_preservation", f"--class_prompt={PEER_CLASS_PROMPT}",
                    f"--class_data_dir={work / 'class'}"]
        label = "diffusers example" + (" + prior preservation" if prior else "")
        print(f"{label}: training ({' '.join(cmd[3:])})", flush=True)
        t0 = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True)
        minutes = (time.time() - t0) / 60
        weights = work / "out" / "pytorch_lora_weights.safetensors"
        if out.returncode or not weights.is_file():
            print(out.stdout[-3000:], out.stderr[-3000:])
            raise SystemExit(f"bench/quality.py: the peer failed (exit {out.returncode})")
        print(f"{label}: trained in {minutes:.1f} min", flush=True)
        return score_file(base, weights, label, minutes, args, prompts, before, template, field, value, evaluator)


def score_file(base, weights: Path, label: str, minutes: float, args: argparse.Namespace, prompts: Sequence[str],
               before: dict, template: str, field: str, value: str, evaluator) -> list[dict]:
    """A comparison recipe's adapter file on a clean base, scored like ours at each of --weights; rows carry
    the recipe's label and training minutes."""
    from pipelines.library import AdapterLibrary
    from pipelines.stack import AdapterStack

    with tempfile.TemporaryDirectory() as lib:
        stack = AdapterStack(base, AdapterLibrary(lib))
        stack.load("peer", weights)
        rows = score_points(stack, [(None, w, "peer", 0) for w in args.weights], args, prompts, before,
                            template, field, value, evaluator)
    for r in rows:
        r["who"], r["minutes"] = label, minutes
    return rows


def score_resized(adapter: Path, args: argparse.Namespace, prompts: Sequence[str], before: dict, template: str,
                  field: str, value: str, evaluator) -> list[dict]:
    """The trained adapter resized (pipelines/resize.py) to each of --resize ranks, scored at weight 1 on a clean
    base: how much of the adapter's effect a smaller file keeps."""
    from pipelines.base_models import DEFAULT_BASE, load_base
    from pipelines.library import AdapterLibrary
    from pipelines.resize import resize_adapter
    from pipelines.stack import AdapterStack

    rows = []
    with tempfile.TemporaryDirectory(prefix="quality-resize-") as work:
        stack = AdapterStack(load_base(args.base or DEFAULT_BASE), AdapterLibrary(work))
        for rank in args.resize:
            rep = resize_adapter(adapter, Path(work) / f"r{rank}.safetensors", rank=rank)
            print(f"resized to rank {rank}: {rep.summary()}", flush=True)
            stack.load(f"r{rank}", rep.path)
            [row] = score_points(stack, [(None, 1.0, f"r{rank}", 0)], args, prompts, before, template, field, value,
                                 evaluator)
            rows.append({**row, "rank": rank, "size": rep.path.stat().st_size, "worst": rep.worst,
                         "mean": rep.mean})
    return rows


# kohya sd-scripts' LoRA as its docs/train_network.md describes it, in our flags: network_dim 16 with alpha
# "about half" of it, learning_rate/unet_lr 1e-4, text_encoder_lr 1e-5 (TE trained: kohya's default), constant
# schedule, max_grad_norm 1, no min-SNR, no prior images; LoRA-LierLa modules (every Linear and 1x1 conv of
# the UNet's transformer blocks; the text encoder's attention and MLP). 500 steps: the diffusers row's budget.
KOHYA_STYLE = {"preset": "custom", "rank": 16, "alpha": 8.0, "lr_unet": 1e-4, "lr_text": 1e-5,
               "train_text_encoder": True, "lr_scheduler": "constant", "warmup_steps": 0, "max_grad_norm": 1.0,
               "min_snr_gamma": 0, "max_steps": 500, "batch_size": 1, "preserve_weight": 0.0,
               "unet_targets": [*ATTENTION_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
               "text_targets": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}


def run_kohya_style(mode: str, args: argparse.Namespace, folder: Path, trigger: str, prompts: Sequence[str],
                    before: dict, template: str, field: str, value: str, evaluator) -> list[dict]:
    """A kohya-style recipe (KOHYA_STYLE) trained by our trainer on the same images and captions, scored like
    ours at each of --weights."""
    from pipelines.base_models import DEFAULT_BASE, load_base
    from training.config import TrainConfig
    from training.trainer import train

    label = "kohya-style recipe"
    base_path = str(args.base or DEFAULT_BASE)
    with tempfile.TemporaryDirectory(prefix="quality-kohya-") as lib:
        cfg = TrainConfig.from_dict({"images": str(folder), "trigger": trigger, "name": f"kohya-{mode}",
                                     "output_dir": lib, "base": base_path, **KOHYA_STYLE})
        print(f"{label}: training ({', '.join(f'{k}={v}' for k, v in KOHYA_STYLE.items())})", flush=True)
        t0 = time.time()
        res = train(cfg)
        minutes = (time.time() - t0) / 60
        print(f"{label}: trained in {minutes:.1f} min", flush=True)
        return score_file(load_base(base_path), res.adapter_path, label, minutes, args, prompts, before, template,
                          field, value, evaluator)


def print_peer_table(ours: list[dict], peers: list[list[dict]], mode: str) -> None:
    """Ours and each peer, side by side at every weight (same base, images, prompts, seeds, evaluator)."""
    print(f"\nside by side ({mode}): fidelity / preservation drop at each weight")
    who = ["LoRA Studio"] + [p[0]["who"] for p in peers if p]
    print("  " + f"{'weight':>6} " + " ".join(f"{w:>34}" for w in who))
    for i, r in enumerate(ours):
        cells = [f"{r['fidelity']:.2f} / {r['drop']:.2f}"] + [f"{p[i]['fidelity']:.2f} / {p[i]['drop']:.2f}"
                                                           for p in peers if p]
        print("  " + f"{r['weight']:>6.2f} " + " ".join(f"{c:>34}" for c in cells))
    for p in peers:
        if p:
            beats = all(o["fidelity"] >= q["fidelity"] and o["drop"] <= q["drop"] for o, q in zip(ours, p))
            print(f"  ours beats {p[0]['who']} on both at every weight: {'yes' if beats else 'no'} "
                  f"(its training: {p[0]['minutes']:.1f} min)")


def print_tradeoff(rows: list[dict], path: Path, mode: str) -> None:
    """The table, and a plot of fidelity (solid) and preservation drop (dashed) over weight and steps."""
    print(f"\ntrade-off ({mode}): fidelity and preservation drop")
    print(f"  {'adapter':>10} {'weight':>6} {'from step':>9} {'fidelity':>8} {'drop':>5} "
          + " ".join(f"{k:>10}" for k in FIELDS))
    for r in rows:
        label = "final" if r["step"] is None else f"step {r['step']}"
        print(f"  {label:>10} {r['weight']:>6.2f} {r.get('start', 0):>9d} {r['fidelity']:>8.2f} {r['drop']:>5.2f} "
              + " ".join(f"{r[k]:>+10.2f}" for k in FIELDS))
    w, h, pad = 640, 280, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    panels = [("final adapter over weight", [r for r in rows if r["step"] is None], "weight"),
              ("checkpoints at weight 1", [r for r in rows if r["step"] is not None], "step")]
    pw = (w - 3 * pad) // 2
    for i, (title, pts, xkey) in enumerate(panels):
        x0 = pad + i * (pw + pad)
        d.rectangle([x0, pad, x0 + pw, h - pad], outline=(160, 160, 160))
        d.text((x0, 8), title, fill="black")
        d.text((x0 - 30, pad - 6), "1.0", fill="gray")
        d.text((x0 - 30, h - pad - 6), "0.0", fill="gray")
        if not pts:
            continue
        xs = [p[xkey] for p in pts]
        lo, hi = min(xs), max(xs)

        def at(x, y):
            fx = 0.5 if hi == lo else (x - lo) / (hi - lo)
            return x0 + fx * pw, h - pad - y * (h - 2 * pad)

        for key, colour in (("fidelity", (22, 101, 52)), ("drop", (185, 28, 28))):
            line = [at(p[xkey], p[key]) for p in pts]
            if len(line) > 1:
                d.line(line, fill=colour, width=2)
            for x, y in line:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        d.text((x0, h - pad + 4), f"{lo:g}", fill="gray")
        d.text((x0 + pw - 30, h - pad + 4), f"{hi:g} ({xkey})", fill="gray")
    d.text((pad, h - 16), "green: fidelity   red: preservation drop", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    print(f"trade-off plot: {path}")


MODES: dict[str, Callable[[argparse.Namespace], dict]] = {
    "base": run_base,
    "concept": lambda args: run_lora("concept", args),
    "style": lambda args: run_lora("style", args),
}


# ---------------------------------------------------------------- CLI


def _setting(text: str) -> tuple[str, object]:
    """'key=value' with a TOML value (bare words are strings): ('max_steps', 400)."""
    import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/quality.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("mode", choices=list(MODES))
    p.add_argument("--base", default=None, help="base model folder, file or hub id (default: the toy model)")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--scheduler", default="DPM++ 2M Karras")
    p.add_argument("--prompts", type=int, default=48, help="how many prompts (a seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    p.add_argument("--quantize-base", choices=["int8", "nf4"], default=None,
                   help="concept/style: train on a quantized base (QLoRA), score on the full-precision one")
    p.add_argument("--full-unet", type=float, default=None, metavar="LR",
                   help="concept/style: fine-tune every UNet weight at this learning rate instead of training a "
                        "LoRA (same data, loss and steps): the ceiling of what any adapter could reach")
    p.add_argument("--images", default=None, metavar="DIR",
                   help="concept/style: train on this folder instead of the shipped set (needs --trigger, --target)")
    p.add_argument("--trigger", default=None, help="with --images: the set's trigger word")
    p.add_argument("--target", default=None,
                   help=f"with --images: the shape (concept: {', '.join(tw.SHAPES)}) or style (style: "
                        f"{', '.join(tw.STYLES)}) the set shows; fidelity is the share of trigger images showing it")
    p.add_argument("--sweep", action="store_true",
                   help="concept/style: also score the adapter at each of --weights and every saved checkpoint "
                        "at weight 1 (a table and bench/out/quality_MODE_tradeoff.png)")
    p.add_argument("--starts", default=[0], type=lambda t: [int(x) for x in t.split(",") if x.strip()],
                   help="with --sweep: also score the final adapter acting only from these sampler steps on "
                        "(the app's start= step range; 0: every step), e.g. 0,6,10")
    p.add_argument("--weights", default="0.25,0.5,0.75,1", type=lambda t: [float(x) for x in t.split(",") if x],
                   help="weights for --sweep (default 0.25,0.5,0.75,1)")
    p.add_argument("--peer", type=Path, default=None, metavar="PATH",
                   help="concept/style: also train diffusers' DreamBooth LoRA example (PATH: its "
                        "train_dreambooth_lora.py) on the same set with its documented defaults, without and with "
                        "its prior preservation, and a kohya-style recipe (KOHYA_STYLE, our trainer), and print "
                        "their fidelity/drop beside ours at each of --weights")
    p.add_argument("--resize", default=[], type=lambda t: [int(x) for x in t.split(",") if x.strip()],
                   metavar="R1,R2,…", help="concept/style: also score the trained adapter resized to these ranks "
                                           "(loras resize), at weight 1")
    p.add_argument("--set", action="append", default=[], type=_setting, metavar="KEY=VALUE",
                   help="concept/style: override a training setting of the preset (TOML value), e.g. "
                        "--set max_steps=400 --set min_snr_gamma=0; repeatable")
    args = p.parse_args(argv)
    if args.peer is not None and not args.peer.is_file():
        p.error(f"--peer {args.peer}: no such file (diffusers' examples/dreambooth/train_dreambooth_lora.py)")
    if args.prompts < 1 or args.images_per_prompt < 1:
        p.error("--prompts and --images-per-prompt must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from pipelines.errors import LoraStudioError

    args = parse_args(argv)
    try:
        MODES[args.mode](args)
    except LoraStudioError as e:
        raise SystemExit(f"bench/quality.py {args.mode}: {e}") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
