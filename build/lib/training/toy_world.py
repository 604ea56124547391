"""The procedural world of the embedded toy base model.

Images are flat-coloured shapes on a plain background, drawn deterministically from a `ShapeSpec`.
The toy base model is trained on the "base" part of this world (solid shapes, captioned with varied
templates and filler words); the shipped LoRA training sets use the parts the base never
saw (a star shape, an outline rendering style). The evaluator in `training/evaluator.py` is trained
on all of it, so it can score whether a generated image shows what its prompt asked for.

World v2 (`LORA_STUDIO_TOY_WORLD=v2`) differs from v1 in what makes a new concept learnable without
damage, as in a real SD model: the base knows eight shapes, so a star (five points, concave sides) is a
recombination of pentagons, diamonds and crosses it has drawn, not a skill from nothing; and
captions come from many templates with filler words that do not change the picture (including the
usual trigger words), so every token of the vocabulary has a trained, meaning-light embedding, as
every token of CLIP has.

World v1r (`LORA_STUDIO_TOY_WORLD=v1r`) does the same for the held-out style: the base also draws "striped"
and "ringed" shapes (named in their captions; solid stays the unnamed default), so an outline is a recombination
of parts it knows rather than a way of drawing it has never seen. World v1t (`LORA_STUDIO_TOY_WORLD=v1t`) adds
the part v1r lacks: a thin line. Its "framed" shapes are solid with a thin frame of their colour around the
picture, a line as thin as the outline's (under one latent pixel), drawn nowhere near the shape's edge.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw

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
V1_SHAPES = ["circle", "square", "triangle"]  # the first toy world's shapes (the style set draws these)
# World v2's added base shapes (every shape is left-right symmetric: the evaluator's augmentation flips
# images). The shipped base knows V1_SHAPES; a base trained with LORA_STUDIO_TOY_WORLD=v2 (the GPU recipe
# in training/toy_base.py) knows these too, and its evaluator must be trained under the same setting.
V2_NEW_SHAPES = ["pentagon", "hexagon", "diamond", "cross", "heart"]
# World v2s: the CPU-sized step from v1 to v2, only the star's parts added (five-fold symmetry, points,
# concave corners), without the hexagon (at 16x16 latents it is nearly a circle) and the heart.
V2S_NEW_SHAPES = ["pentagon", "diamond", "cross"]
# World v1r: the v1 shapes, and two rendering styles besides solid that each hold part of an outline, so that
# the held-out outline is a recombination of what the base draws, as a style LoRA is on a real model:
# "striped" (bands of the background across the shape: background inside a shape, no edge) and "ringed" (a
# small background-coloured copy in the middle: a thick band of colour along the edge, mostly filled).
# A "pale" style (the inside half-way to the background) was tried first: the shipped VAE cannot keep colours
# between its palette's (round trip: style read 0.23, colour 0.54), so the world keeps to the palette.
V1R_NEW_STYLES = ["striped", "ringed"]
# World v1t: v1r and a thin line. A style LoRA on v1r draws outlines as broken strokes (bench/quality.py style:
# fidelity 0.50, drop 0.26) where the same recipe on a style v1r's base draws (ringed, as "ohwx") costs 0.07:
# the outline's 3.5 px line is under one latent pixel, thinner than anything v1r draws (stripes are 6 px).
# "framed": the solid shape, and a frame of its colour as thin as the outline's line along the picture's edge
# (the shape drawn over it), so that thin lines are a part the base knows, away from any shape's contour.
V1T_NEW_STYLES = [*V1R_NEW_STYLES, "framed"]
NAMED_STYLES = V1T_NEW_STYLES  # every base style a caption names (solid is the unnamed default)
WORLDS = {"v1": [], "v2": V2_NEW_SHAPES, "v2s": V2S_NEW_SHAPES, "v1r": [], "v1t": []}
WORLD_STYLES = {"v1r": V1R_NEW_STYLES, "v1t": V1T_NEW_STYLES}
WORLD = os.environ.get("LORA_STUDIO_TOY_WORLD", "v1")
if WORLD not in WORLDS:
    raise ValueError(f"LORA_STUDIO_TOY_WORLD: must be one of {', '.join(WORLDS)}, got {WORLD!r}")
BASE_SHAPES = V1_SHAPES + WORLDS[WORLD]
CONCEPT_SHAPE = "star"  # never in the base model's training data
SHAPES = BASE_SHAPES + [CONCEPT_SHAPE]
DRAWABLE_SHAPES = V1_SHAPES + V2_NEW_SHAPES + [CONCEPT_SHAPE]
BASE_STYLE = "solid"  # never named in a caption: what the base draws when no style is asked for
STYLE_STYLE = "outline"  # never in the base model's training data
BASE_STYLES = [BASE_STYLE] + WORLD_STYLES.get(WORLD, [])
STYLES = BASE_STYLES + [STYLE_STYLE]
DRAWABLE_STYLES = [BASE_STYLE] + NAMED_STYLES + [STYLE_STYLE]
STRIPE_PERIOD = 12  # pixels at 64 px: three latent pixels a period at the VAE's factor 4
RING_HOLE = 0.4  # ringed: the background-coloured copy's size, relative to the shape
LINE_WIDTH = 3.5  # pixels at 64 px: the outline's line and the framed style's frame


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
        return plain_caption(self.color, self.shape, self.background, self.style)


def style_word(style: str) -> str:
    """The base world's name for a rendering style in captions, with its space ("" for solid and outline)."""
    return f"{style} " if style in NAMED_STYLES else ""


def plain_caption(color: str, shape: str, background: str, style: str = BASE_STYLE) -> str:
    """The plain caption template: "a [style ]<colour> <shape> on a <background> background"."""
    return f"a {style_word(style)}{color} {shape} on a {background} background"


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
    if shape in ("pentagon", "hexagon"):
        n = 5 if shape == "pentagon" else 6
        a0 = -math.pi / 2 if n == 5 else 0.0
        return [(cx + r * math.cos(a0 + 2 * math.pi * i / n), cy + r * math.sin(a0 + 2 * math.pi * i / n))
                for i in range(n)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.72, cy), (cx, cy + r), (cx - r * 0.72, cy)]
    if shape == "cross":
        a, b = r * 0.34, r * 0.95
        return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a), (cx + b, cy + a),
                (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b), (cx - a, cy + a), (cx - b, cy + a),
                (cx - b, cy - a), (cx - a, cy - a)]
    if shape == "heart":
        pts = []
        for i in range(40):
            t = 2 * math.pi * i / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 17.0, cy - r * (y + 2.5) / 15.5))
        return pts
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    return None  # circle


def _fill(d: ImageDraw.ImageDraw, poly: list[tuple[float, float]] | None, cx: float, cy: float, r: float,
          fill) -> None:
    """Fill a shape: its polygon, or the circle of radius r where it has none."""
    if poly is None:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon(poly, fill=fill)


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
    width = int(round(LINE_WIDTH * k))
    if spec.style == "framed":  # solid, over a thin frame of the shape's colour along the picture's edge
        d.rectangle([0, 0, n - 1, n - 1], outline=fg, width=width)
    if spec.style == "striped":  # the shape, through horizontal bands starting at its top
        mask = Image.new("L", (n, n), 0)
        _fill(ImageDraw.Draw(mask), poly, cx, cy, r, 255)
        bands = Image.new("L", (n, n), 0)
        bd = ImageDraw.Draw(bands)
        period, y = STRIPE_PERIOD * k, cy - r
        while y < n:
            bd.rectangle([0, y, n, y + period / 2 - 1], fill=255)
            y += period
        img.paste(fg, (0, 0, n, n), ImageChops.darker(mask, bands))  # both masks 0/255: darker is "and"
    elif spec.style == "ringed":
        _fill(d, poly, cx, cy, r, fg)
        h = r * RING_HOLE
        _fill(d, _polygon(spec.shape, cx, cy, h), cx, cy, h, bg)
    elif spec.style == STYLE_STYLE:
        if poly is None:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=width)
        else:
            d.line(poly + [poly[0], poly[1]], fill=fg, width=width, joint="curve")
    else:
        _fill(d, poly, cx, cy, r, fg)
    return img.resize((resolution, resolution), Image.LANCZOS)


# Caption templates of the base world. Each keeps "<colour> <shape>" and "<colour> background"
# adjacent, as parse_caption reads them. FILLER words never change the picture: they give every
# token of the vocabulary a trained embedding (the trigger words "sks" and "ohwx" among them, as
# real CLIP knows them as rare, meaning-light tokens).
TEMPLATES = [
    "a {c} {s} on a {b} background",
    "a {f} {c} {s} on a {b} background",
    "a picture of a {c} {s} on a {b} background",
    "a drawing of a {c} {s} on a {b} background",
    "a photo of a {c} {s}, {b} background",
    "{c} {s} on {b} background",
    "{c} {s}, {b} background, {f}",
    "an image of a {f} {c} {s} on a {b} background",
    "a {c} {s} centered on a {b} background, {f} {f}",
    "{f}, a {c} {s} with a {b} background",
    "the {c} {s} on the {b} background",
    "a {c} {s} shape on a {b} background, {f} art",
    "a {c} {s}",
    "a {f} {c} {s}",
    "a {s} on a {b} background",
    "{c} {s}",
]
FILLER = [
    "simple", "clean", "flat", "plain", "nice", "cute", "minimal", "digital", "illustration", "icon",
    "render", "sharp", "high", "quality", "detailed", "beautiful", "colorful", "bright", "new", "old",
    "tiny", "small", "large", "big", "toy", "art", "painting", "graphic", "vector", "sketch", "sks",
    "ohwx", "thing", "object", "style", "by", "artist", "masterpiece", "best", "trending", "hd", "4k",
]


def varied_caption(spec: ShapeSpec, rng: random.Random) -> str:
    """One of the base world's caption templates for a spec, filler words drawn from FILLER."""
    t = rng.choice(TEMPLATES)
    while "{f}" in t:
        t = t.replace("{f}", rng.choice(FILLER), 1)
    style = style_word(spec.style).strip()
    if style and "{c}" in t:
        return t.format(c=f"{style} {spec.color}", s=spec.shape, b=spec.background)
    return t.format(c=spec.color, s=f"{style} {spec.shape}".strip(), b=spec.background)


def all_base_prompts(style: str = BASE_STYLE) -> list[str]:
    """Every colour/shape/background combination the base model was trained on (in one of its styles)."""
    return [
        plain_caption(c, s, b, style)
        for s in BASE_SHAPES
        for c in FG_COLORS
        for b in BG_COLORS
        if b != c
    ]


def styled_base_prompts() -> dict[str, list[str]]:
    """For a world with rendering styles besides solid (v1r): each such style's prompts, as the base learned them."""
    return {st: all_base_prompts(st) for st in BASE_STYLES[1:]}


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
