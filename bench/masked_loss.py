"""Does masked loss keep what the masks leave out of the adapter? Measured on the toy world.

    python bench/masked_loss.py --frame              # 12 framed triangles as `sks`, all on yellow, ~15 min
    python bench/masked_loss.py --shape square --background gray --prompts 24 --images-per-prompt 1

Draws a concept set whose every picture has the same background, with captions that do not name it
("a red sks": what a hobbyist's captions often look like), and a mask of the shape beside each image
(`NN-masklabel.png`: the shape, two pixels wider). With `--frame` the pictures also carry a frame along
their edge (the toy world's framed style) that neither the captions nor the masks include. Then trains the
concept preset three times on it, the same seed: masked loss off, on (kohya's mean over the whole
picture), and on with the mean over the mask (`bench/quality.py concept --images … [--set
masked_loss=true] [--set mask_mean=mask]`). It prints side by side: fidelity (the trigger draws the
shape), the background the trigger prompts ask for ("a green sks on a blue background"), how many
generated pictures have a frame (trigger prompts / prompts without the trigger), and the preservation
drop. The shape is one the base draws, so what is measured is what the adapter takes along besides it.
The last line: each run's fidelity and framed share.
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

from PIL import Image, ImageFilter  # noqa: E402

import bench.quality as quality  # noqa: E402
from training import toy_world as tw  # noqa: E402

OUT = ROOT / "bench" / "out" / "masked_loss"


def write_set(folder: Path, shape: str, background: str, n: int, seed: int, style: str = tw.BASE_STYLE) -> Path:
    """n pictures of `shape` in varied colours, all on `background`, captioned "a <colour> sks"; each with its
    mask (white: the shape) as <name>-masklabel.png. `style` "framed" adds a frame along the picture's edge
    that the captions do not mention and the masks leave out."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        spec = tw.sample_spec(rng, shapes=[shape], colors=[c for c in tw.FG_COLORS if c != background],
                              backgrounds=[background], style=style)
        tw.draw(spec).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a {spec.color} sks\n")
        plain = replace(spec, color="white", background="black", jitter=(0,) * 6, style=tw.BASE_STYLE)
        mask = tw.draw(plain).convert("L").point(lambda v: 255 if v > 127 else 0).filter(ImageFilter.MaxFilter(5))
        mask.save(folder / f"{i:02d}-masklabel.png")
    return folder


def has_frame(img) -> bool:
    """A frame along the picture's edge: the outermost 2 pixels' median colour far from that of the band 5-7
    pixels in (the background there; the shape covers too little of either band to move a median)."""
    import numpy as np

    a = np.asarray(img.convert("RGB").resize((64, 64)), dtype=np.float32)
    ring = np.ones((64, 64), bool)
    ring[2:-2, 2:-2] = False
    band = np.zeros((64, 64), bool)
    band[5:-5, 5:-5] = True
    band[8:-8, 8:-8] = False
    return float(np.abs(np.median(a[ring], axis=0) - np.median(a[band], axis=0)).sum()) > 90


def slug(label: str) -> str:
    """A run's folder name and short label: "masked, mean over the mask" -> masked-by-mask."""
    return label.split(",")[0] + ("-by-mask" if "," in label else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="triangle", choices=tw.BASE_SHAPES)
    ap.add_argument("--background", default="yellow", choices=tw.BG_COLORS)
    ap.add_argument("--n", type=int, default=12, help="training images")
    ap.add_argument("--frame", action="store_true",
                    help="the training pictures also have a frame along their edge (the toy world's framed style) "
                         "that neither the captions nor the masks include; also prints how many generated "
                         "pictures have a frame")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a training option for both runs (bench/quality.py's --set)")
    args = ap.parse_args(argv)
    style = "framed" if args.frame else tw.BASE_STYLE
    folder = write_set(OUT / f"set-{args.shape}-on-{args.background}{'-framed' if args.frame else ''}", args.shape,
                       args.background, args.n, args.seed, style)
    print(f"set: {args.n} {args.shape}s as sks, all on {args.background}" + (", framed" if args.frame else "")
          + f", captions without the background: {folder}")
    if args.frame:
        train = [Image.open(p) for p in sorted(folder.glob("[0-9][0-9].png"))]
        print(f"frame detector: {sum(map(has_frame, train))} of {len(train)} training pictures framed")
    rows = {}
    runs = (("unmasked", []), ("masked", ["--set", "masked_loss=true"]),
            ("masked, mean over the mask", ["--set", "masked_loss=true", "--set", "mask_mean=mask"]))
    for label, extra in runs:
        print(f"\n=== {label} ===", flush=True)
        qargs = quality.parse_args(["concept", "--images", str(folder), "--trigger", "sks", "--target", args.shape,
                                    "--prompts", str(args.prompts), "--images-per-prompt", str(args.images_per_prompt),
                                    "--out-dir", str(OUT / slug(label)),
                                    *extra,
                                    *[a for kv in args.set for a in ("--set", kv)]])
        rows[label] = quality.run_lora("concept", qargs)
    def share(v) -> str:
        return "–" if v is None else f"{v:.2f}"

    def framed(imgs) -> str:
        return f"{sum(map(has_frame, imgs)) / len(imgs):.2f}"

    print("\n| run | fidelity | trigger prompts: background | framed: trigger / base prompts "
          "| preservation drop | minutes |")
    print("|---|---|---|---|---|---|")
    print(f"| base, no adapter | – | – | – / {framed(rows['unmasked']['base_images_before'])} | – | – |")
    for label, r in rows.items():
        print(f"| {label} | {r['fidelity']:.2f} | {share(r['trigger_fields']['background'])} "
              f"| {framed(r['trigger_images'])} / {framed(r['base_images'])} "
              f"| {r['preservation_drop']:.2f} | {r['minutes']:.1f} |")
    print(f"contact sheets: {OUT}/*/quality_concept_fidelity.png")
    print(" ".join(f"{slug(label)}: fidelity={r['fidelity']:.2f} "
                   f"framed={framed(r['trigger_images'])}" for label, r in rows.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
