"""The weight range that keeps the base intact: a quick check at the end of training, for the model card.

A few prompts without the trigger (the sample prompts that lack it, else the captions with the trigger
taken out) are drawn with the base (weight 0) and with the new adapter at each of WEIGHTS, same seeds.

- On the toy base, the toy world's evaluator reads colour, shape and background of every picture: a
  weight keeps the base intact when at least KEEP of the pictures show what the base's own picture shows.
- On other bases there is no evaluator: the card gives the mean pixel change from the base's picture at
  each weight, and the check's images (base and each weight, one row per prompt) are saved beside the run
  for the user to judge; the range is left to them.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .trainer import Trainer

WEIGHTS = (0.25, 0.5, 0.75, 1.0)
KEEP = 0.9  # share of trigger-free pictures that must keep what the base draws
MAX_PROMPTS = 4


@dataclass
class WeightCheck:
    prompts: list[str]
    weights: tuple[float, ...]
    change: dict[float, float]  # mean absolute pixel change (0..1) from the base's picture
    kept: dict[float, float] | None = None  # toy world: share of pictures keeping colour, shape and background
    safe_up_to: float | None = None  # the largest weight (of WEIGHTS) up to which every weight keeps KEEP
    sheet: Path | None = None
    notes: list[str] = field(default_factory=list)

    def card_text(self) -> str:
        rows = []
        for w in self.weights:
            kept = f", {self.kept[w]:.0%} keep what the base draws" if self.kept is not None else ""
            rows.append(f"| {w:g} | {self.change[w]:.3f}{kept} |")
        if self.kept is not None:
            verdict = (f"**Keeps the base intact up to weight {self.safe_up_to:g}**" if self.safe_up_to
                       else f"**Changes trigger-free pictures already at weight {self.weights[0]:g}**")
            how = (f"(at least {KEEP:.0%} of the trigger-free pictures keep the colour, shape and background the "
                   "base draws, read by the toy world's evaluator).")
        else:
            verdict = "Weight check: judge the range from the pictures"
            how = (f"in `{self.sheet.name if self.sheet else 'weight-check.png'}` beside the run (a row per prompt: "
                   "the base, then each weight); the mean pixel change from the base's picture is below.")
        prompts = ", ".join(f"`{p}`" for p in self.prompts)
        return (f"## Weight range\n\n{verdict} {how} Checked at the end of training on {prompts}.\n\n"
                f"| weight | change from the base |\n|---|---|\n" + "\n".join(rows) + "\n")


def check_prompts(tr: "Trainer") -> list[str]:
    from .trainer import _trigger_word_re, preservation_prompts

    word = _trigger_word_re(tr.cfg.trigger)
    own = [p for p in tr.cfg.sample_prompts if not word.search(p)]
    derived = [p for p in preservation_prompts(tr.cfg.replace(preserve_prompts=[]),
                                               [it.caption for it in tr.scan.items]) if p]
    return list(dict.fromkeys([*own, *derived]))[:MAX_PROMPTS]


def _lora_layers(tr: "Trainer") -> list:
    from peft.tuners.lora import LoraLayer

    return [m for c in tr.components for m in getattr(tr.base.pipe, c).modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def check_weights(tr: "Trainer") -> WeightCheck | None:
    """Run the check on the trainer's model (its LoRA attached at weight 1), leaving it as it was."""
    from pipelines.generation import GenerationRequest, generate

    from .config import preset_family
    from .trainer import AdaptersOff

    prompts = check_prompts(tr)
    if not prompts:
        return None
    cfg, base = tr.cfg, tr.base
    layers = _lora_layers(tr)
    unet = base.pipe.unet
    was_training = unet.training
    unet.eval()
    images: dict[float, list] = {}
    try:
        for w in (0.0, *WEIGHTS):
            if w:
                for layer in layers:
                    layer.scale_layer(w)
            try:
                ctx = AdaptersOff([getattr(base.pipe, c) for c in tr.components]) if w == 0 else nullcontext()
                with ctx:
                    images[w] = [generate(base, GenerationRequest(prompt=p, steps=cfg.sample_steps,
                                                                  seed=cfg.sample_seed + i, width=tr.resolution,
                                                                  height=tr.resolution))[0].image
                                 for i, p in enumerate(prompts)]
            finally:
                for layer in layers:
                    layer.unscale_layer()
    finally:
        unet.train(was_training)
    arr = {w: [np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in ims] for w, ims in images.items()}
    change = {w: float(np.mean([np.abs(a - b).mean() for a, b in zip(arr[w], arr[0.0])])) for w in WEIGHTS}
    res = WeightCheck(prompts, WEIGHTS, change)
    if preset_family(cfg.base) == "toy" and tr.resolution == 64:
        try:
            from .evaluator import classify, load_evaluator

            ev = load_evaluator()
        except Exception as e:  # noqa: BLE001 - no evaluator: the pictures are the check
            res.notes.append(f"no evaluator ({e})")
        else:
            keys = ("color", "shape", "background")
            ref = classify(ev, images[0.0])
            res.kept = {}
            for w in WEIGHTS:
                got = classify(ev, images[w])
                res.kept[w] = sum(all(g[k] == r[k] for k in keys) for g, r in zip(got, ref)) / len(ref)
            safe = None
            for w in WEIGHTS:
                if res.kept[w] < KEEP:
                    break
                safe = w
            res.safe_up_to = safe
    res.sheet = _sheet(images, prompts, tr.run_dir / "weight-check.png")
    return res


def _sheet(images: dict[float, list], prompts: list[str], path: Path) -> Path:
    from PIL import Image, ImageDraw

    from pipelines.weights_io import atomic_write

    cols = list(images)
    w, h = images[cols[0]][0].size
    cell = max(w, 96)
    sheet = Image.new("RGB", (cell * len(cols), 16 + cell * len(prompts)), "white")
    d = ImageDraw.Draw(sheet)
    for c, wt in enumerate(cols):
        d.text((c * cell + 4, 2), "base" if wt == 0 else f"weight {wt:g}", fill="black")
        for r, im in enumerate(images[wt]):
            sheet.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (c * cell, 16 + r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path
