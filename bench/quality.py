"""Does the model draw what the prompt asks for? Generate toy-world prompts, score with the evaluator.

    python bench/quality.py base [--base PATH] [--images-per-prompt 2] [--steps 20] [--guidance 7]
                                 [--scheduler "DPM++ 2M Karras"] [--prompts 48]

Modes (one function each in MODES; `concept` and `style` are still to be written):
  base     the base model on prompts from the world it was trained on (solid circles, squares,
           triangles); reports the share of images whose colour, shape and background match.

The last line printed is always `color=0.xx shape=0.xx background=0.xx`. A contact sheet of the
generated images, their prompts and what the evaluator saw is written to bench/out/.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
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
from training.evaluator import PROMPT_FIELDS, load_evaluator, score  # noqa: E402

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
) -> tuple[list[Image.Image], list[str]]:
    """args.images_per_prompt images per prompt; returns (images, the prompt of each image)."""
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
        for out in generate(base, req, **kwargs):
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
    return " ".join(f"{k}={result[k]:.2f}" for k in FIELDS)


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
    report(result, image_prompts, elapsed, sheet)
    return result


def not_implemented(name: str) -> Callable[[argparse.Namespace], dict]:
    def run(args: argparse.Namespace) -> dict:
        raise SystemExit(f"bench/quality.py {name}: not implemented yet (only 'base' is available)")

    return run


MODES: dict[str, Callable[[argparse.Namespace], dict]] = {
    "base": run_base,
    "concept": not_implemented("concept"),
    "style": not_implemented("style"),
}


# ---------------------------------------------------------------- CLI


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
    args = p.parse_args(argv)
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
