"""The procedural world of the embedded toy base model.

Images are flat-coloured shapes on a plain background, drawn deterministically from a `ShapeSpec`.
The toy base model is trained on the "base" part of this world (solid circles, squares and
triangles); the shipped LoRA training sets use the parts the base never saw (a star shape, an
outline rendering style). The evaluator in `training/evaluator.py` is trained on all of it, so it
can score whether a generated image shows what its prompt asked for.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

RESOLUTION = 64

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "blue": (30, 70, 220),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
FG_COLORS = ["red", "orange", "yellow", "green", "blue", "purple"]
BG_COLORS = ["white", "black", "gray", "yellow", "blue"]
BASE_SHAPES = ["circle", "square", "triangle"]
CONCEPT_SHAPE = "star"  # never in the base model's training data
SHAPES = BASE_SHAPES + [CONCEPT_SHAPE]
BASE_STYLE = "solid"
STYLE_STYLE = "outline"  # never in the base model's training data
STYLES = [BASE_STYLE, STYLE_STYLE]


@dataclass(frozen=True)
class ShapeSpec:
    color: str
    shape: str
    background: str
    size: int  # half-extent in pixels at 64 px
    cx: int
    cy: int
    style: str = BASE_STYLE
    jitter: tuple[int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0)

    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def sample_spec(
    rng: random.Random,
    shapes: list[str] | None = None,
    colors: list[str] | None = None,
    backgrounds: list[str] | None = None,
    style: str = BASE_STYLE,
) -> ShapeSpec:
    """Draw a random spec; foreground and background colours always differ."""
    shape = rng.choice(shapes or BASE_SHAPES)
    color = rng.choice(colors or FG_COLORS)
    bgs = [b for b in (backgrounds or BG_COLORS) if b != color]
    background = rng.choice(bgs)
    size = rng.randint(10, 22)
    lo, hi = size + 2, RESOLUTION - 3 - size
    cx, cy = rng.randint(lo, hi), rng.randint(lo, hi)
    jitter = tuple(rng.randint(-8, 8) for _ in range(6))
    return ShapeSpec(color, shape, background, size, cx, cy, style, jitter)  # type: ignore[arg-type]


def _rgb(name: str, jit: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + j)) for c, j in zip(COLORS[name], jit))  # type: ignore[return-value]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    return None  # circle


def draw(spec: ShapeSpec, resolution: int = RESOLUTION) -> Image.Image:
    """Render a spec as an RGB image (drawn at 4x and downsampled for clean edges)."""
    ss = 4
    n = resolution * ss
    k = n / RESOLUTION
    fg, bg = _rgb(spec.color, spec.jitter[:3]), _rgb(spec.background, spec.jitter[3:])
    img = Image.new("RGB", (n, n), bg)
    d = ImageDraw.Draw(img)
    cx, cy, r = spec.cx * k, spec.cy * k, spec.size * k
    poly = _polygon(spec.shape, cx, cy, r)
    width = int(round(3.5 * k))
    if spec.style == STYLE_STYLE:
        if poly is None:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=width)
        else:
            d.line(poly + [poly[0], poly[1]], fill=fg, width=width, joint="curve")
    else:
        if poly is None:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
        else:
            d.polygon(poly, fill=fg)
    return img.resize((resolution, resolution), Image.LANCZOS)


def all_base_prompts() -> list[str]:
    """Every colour/shape/background combination the base model was trained on."""
    return [
        f"a {c} {s} on a {b} background"
        for s in BASE_SHAPES
        for c in FG_COLORS
        for b in BG_COLORS
        if b != c
    ]


def parse_caption(prompt: str) -> dict[str, str | None]:
    """Read colour, shape and background words out of a prompt (None where absent)."""
    words = prompt.lower().replace(",", " ").split()
    out: dict[str, str | None] = {"color": None, "shape": None, "background": None}
    for i, w in enumerate(words):
        if w in SHAPES and out["shape"] is None:
            out["shape"] = w
            if i > 0 and words[i - 1] in FG_COLORS:
                out["color"] = words[i - 1]
        if w == "background" and i > 0 and words[i - 1] in COLORS:
            out["background"] = words[i - 1]
    return out
