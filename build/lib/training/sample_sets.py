"""Draw the shipped LoRA training sets into sample_data/ (deterministic).

    python -m training.sample_sets
    LORA_STUDIO_TOY_WORLD=v1r python -m training.sample_sets --style ringed --out .work/sets  # in another style

- `sample_data/concept-star/`: a shape the toy base model has never seen (a five-pointed star),
  trigger word `sks`, captions like "a red sks on a white background".
- `sample_data/style-outline/`: a rendering the base has never seen (shapes drawn as outlines),
  trigger word `ohwx`, captions like "a blue circle on a gray background in ohwx style".
"""

from __future__ import annotations

import random
from pathlib import Path

from .toy_world import CONCEPT_SHAPE, STYLE_STYLE, STYLES, V1_SHAPES, draw, plain_caption, sample_spec

ROOT = Path(__file__).resolve().parent.parent
SETS = {
    "concept-star": {"trigger": "sks", "n": 12, "seed": 101},
    "style-outline": {"trigger": "ohwx", "n": 12, "seed": 202},
}


def concept_caption(spec, trigger: str) -> str:
    return plain_caption(spec.color, trigger, spec.background)


def style_caption(spec, trigger: str) -> str:
    """What the picture shows, without its style's name: the style is the trigger's to carry."""
    return f"{plain_caption(spec.color, spec.shape, spec.background)} in {trigger} style"


def write_set(name: str, out_root: Path = ROOT / "sample_data", style: str = STYLE_STYLE) -> Path:
    """Draw a shipped set into out_root/name. `style` redraws the style set in another of the world's
    styles (same shapes, colours, captions and trigger), into out_root/style-<style>: a style set the base can
    already draw, to tell what the recipe costs from what the held-out outline costs (bench/quality.py
    --images)."""
    info = SETS[name]
    if style not in STYLES:
        raise ValueError(f"style: must be one of {', '.join(STYLES)}, got {style!r}")
    if name != "style-outline" and style != STYLE_STYLE:
        raise ValueError(f"style: only the style set can be drawn in another style, not {name}")
    folder = out_root / (name if style == STYLE_STYLE else f"style-{style}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(info["seed"])
    for i in range(info["n"]):
        if name == "concept-star":
            spec = sample_spec(rng, shapes=[CONCEPT_SHAPE])
            cap = concept_caption(spec, info["trigger"])
        else:
            spec = sample_spec(rng, shapes=V1_SHAPES, style=style)
            cap = style_caption(spec, info["trigger"])
        draw(spec).save(folder / f"{i:02d}.png", optimize=True)
        (folder / f"{i:02d}.txt").write_text(cap + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.sample_sets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--style", default=None, choices=STYLES,
                    help="only the style set, drawn in this style instead of the outline (into OUT/style-STYLE)")
    ap.add_argument("--out", type=Path, default=ROOT / "sample_data")
    args = ap.parse_args(argv)
    if args.style:
        print("wrote", write_set("style-outline", args.out, args.style))
        return
    for name in SETS:
        print("wrote", write_set(name, args.out))


if __name__ == "__main__":
    main()
