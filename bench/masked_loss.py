"""Does masked loss keep the training images' background out of the adapter? Measured on the toy world.

    python bench/masked_loss.py                      # 12 triangles as `sks`, all on yellow, ~10 min on 2 cores
    python bench/masked_loss.py --shape square --background gray --prompts 24 --images-per-prompt 1

Draws a concept set whose every picture has the same background, with captions that do not name it
("a red sks": what a hobbyist's captions often look like), and a mask of the shape beside each image
(`NN-masklabel.png`: the shape, two pixels wider). Then trains the concept preset twice on it, the same
seed, with masked loss off and on (`bench/quality.py concept --images … [--set masked_loss=true]`), and
prints side by side: fidelity (the trigger draws the shape), the background and colour the trigger prompts
ask for ("a green sks on a blue background"), and the preservation drop on prompts without the trigger.
The shape is one the base draws, so the adapter's learning is not what is measured, only what it takes
along. The last line: `background unmasked=0.xx masked=0.xx`.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import ImageFilter  # noqa: E402

import bench.quality as quality  # noqa: E402
from training import toy_world as tw  # noqa: E402

OUT = ROOT / "bench" / "out" / "masked_loss"


def write_set(folder: Path, shape: str, background: str, n: int, seed: int) -> Path:
    """n pictures of `shape` in varied colours, all on `background`, captioned "a <colour> sks"; each with its
    mask (white: the shape) as <name>-masklabel.png."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        spec = tw.sample_spec(rng, shapes=[shape], colors=[c for c in tw.FG_COLORS if c != background],
                              backgrounds=[background])
        tw.draw(spec).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a {spec.color} sks\n")
        plain = replace(spec, color="white", background="black", jitter=(0,) * 6, style=tw.BASE_STYLE)
        mask = tw.draw(plain).convert("L").point(lambda v: 255 if v > 127 else 0).filter(ImageFilter.MaxFilter(5))
        mask.save(folder / f"{i:02d}-masklabel.png")
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="triangle", choices=tw.BASE_SHAPES)
    ap.add_argument("--background", default="yellow", choices=tw.BG_COLORS)
    ap.add_argument("--n", type=int, default=12, help="training images")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a training option for both runs (bench/quality.py's --set)")
    args = ap.parse_args(argv)
    folder = write_set(OUT / f"set-{args.shape}-on-{args.background}", args.shape, args.background, args.n,
                       args.seed)
    print(f"set: {args.n} {args.shape}s as sks, all on {args.background}, captions without the background: {folder}")
    rows = {}
    for label, extra in (("unmasked", []), ("masked", ["--set", "masked_loss=true"])):
        print(f"\n=== {label} ===", flush=True)
        qargs = quality.parse_args(["concept", "--images", str(folder), "--trigger", "sks", "--target", args.shape,
                                    "--prompts", str(args.prompts), "--images-per-prompt", str(args.images_per_prompt),
                                    "--out-dir", str(OUT / label), *extra,
                                    *[a for kv in args.set for a in ("--set", kv)]])
        rows[label] = quality.run_lora("concept", qargs)
    print("\n| run | fidelity | trigger prompts: background | colour | preservation drop | minutes |")
    print("|---|---|---|---|---|---|")
    for label, r in rows.items():
        t = r["trigger_fields"]
        print(f"| {label} | {r['fidelity']:.2f} | {t['background']:.2f} | {t['color']:.2f} "
              f"| {r['preservation_drop']:.2f} | {r['minutes']:.1f} |")
    print(f"contact sheets: {OUT}/*/quality_concept_fidelity.png")
    print(f"background unmasked={rows['unmasked']['trigger_fields']['background']:.2f} "
          f"masked={rows['masked']['trigger_fields']['background']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
