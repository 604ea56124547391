"""Draw the shipped LoRA training sets into sample_data/ (deterministic).

    python -m training.sample_sets

- `sample_data/concept-star/`: a shape the toy base model has never seen (a five-pointed star),
  trigger word `sks`, captions like "a red sks on a white background".
- `sample_data/style-outline/`: a rendering the base has never seen (shapes drawn as outlines),
  trigger word `ohwx`, captions like "a blue circle on a gray background in ohwx style".
"""

from __future__ import annotations

import random
from pathlib import Path

from .toy_world import CONCEPT_SHAPE, STYLE_STYLE, V1_SHAPES, draw, plain_caption, sample_spec

ROOT = Path(__file__).resolve().parent.parent
SETS = {
    "concept-star": {"trigger": "sks", "n": 12, "seed": 101},
    "style-outline": {"trigger": "ohwx", "n": 12, "seed": 202},
}


def concept_caption(spec, trigger: str) -> str:
    return plain_caption(spec.color, trigger, spec.background)


def style_caption(spec, trigger: str) -> str:
    return f"{spec.caption()} in {trigger} style"


def write_set(name: str, out_root: Path = ROOT / "sample_data") -> Path:
    info = SETS[name]
    folder = out_root / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(info["seed"])
    for i in range(info["n"]):
        if name == "concept-star":
            spec = sample_spec(rng, shapes=[CONCEPT_SHAPE])
            cap = concept_caption(spec, info["trigger"])
        else:
            spec = sample_spec(rng, shapes=V1_SHAPES, style=STYLE_STYLE)
            cap = style_caption(spec, info["trigger"])
        draw(spec).save(folder / f"{i:02d}.png", optimize=True)
        (folder / f"{i:02d}.txt").write_text(cap + "\n")
    return folder


def main() -> None:
    for name in SETS:
        print("wrote", write_set(name))


if __name__ == "__main__":
    main()
