"""The weight range that keeps the base intact: a quick check at the end of training, for the model card.

A few prompts without the trigger (the sample prompts that lack it, else the captions with the trigger
taken out) are drawn with the base (weight 0) and with the new adapter at each of WEIGHTS, same seeds.

- On the toy base, the toy world's evaluator reads colour, shape and background of every picture: a
  weight keeps the base intact when at least KEEP of the pictures show what the base's own picture shows.
- On other bases there is no evaluator: the card gives the mean pixel change from the base's picture at
  each weight, and the check's images (base and each weight, one row per prompt) are saved beside the run
  for the user to judge; the range is left to them.

Then the step range (the app's `<lora:name:1:start=N>`: the adapter's UNet part acts from sampler step N
on, its text-encoder part throughout): at full weight, for each start of STARTS, the trigger-free prompts
again, and prompts with the trigger (the sample prompts that have it, else the captions), against the
adapter acting at every step. On the toy base a start is suggested when the share of trigger pictures
showing the trained look (what the evaluator reads in the training images on the fields their captions
leave unnamed: the style, or the concept's shape) is at least KEEP times the share at every step, and more
trigger-free pictures keep what the base draws than at step 0. Elsewhere the pictures go into
`step-check.png` with the mean pixel changes.
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
KEEP = 0.9  # share of trigger-free pictures that must keep what the base draws (and of the look a later start keeps)
MAX_PROMPTS = 4
STARTS = (0.25, 0.5)  # share of the sampler's steps before the adapter's UNet part starts to act


@dataclass
class StepCheck:
    """The adapter at full weight acting from each of `starts` (0: every step) of `steps` sampler steps."""

    steps: int
    starts: tuple[int, ...]
    trigger_prompts: list[str]
    free_change: dict[int, float]  # trigger-free pictures: mean absolute pixel change from the base's picture
    look_change: dict[int, float]  # trigger pictures: mean absolute pixel change from the every-step picture
    free_kept: dict[int, float] | None = None  # toy world: share keeping colour, shape and background of the base
    look_kept: dict[int, float] | None = None  # toy world: share of trigger pictures showing the trained look
    look: dict[str, str] | None = None  # toy world: the look the training images show ({"style": "outline"})
    suggested: int | None = None  # toy world: the start to use, when one keeps the look and more of the base
    sheet: Path | None = None
    name: str = "NAME"

    def card_text(self) -> str:
        toy = self.free_kept is not None and self.look_kept is not None
        look_words = " and ".join(f"{k} {v}" for k, v in (self.look or {}).items()) or "the trained look"
        rows = []
        for s in self.starts:
            free = f"{self.free_change[s]:.3f}" + (f", {self.free_kept[s]:.0%} keep what the base draws" if toy else "")
            look = ("(the reference)" if s == 0 else f"{self.look_change[s]:.3f}")
            if toy:
                look += f", {self.look_kept[s]:.0%} show {look_words}"
            rows.append(f"| {'every step' if s == 0 else f'from step {s}'} | {free} | {look} |")
        sheet = self.sheet.name if self.sheet else "step-check.png"
        if not toy:
            verdict = (f"Step range: judge from the pictures in `{sheet}` beside the run (a row per prompt: the base, "
                       "then the adapter at weight 1 acting at every step and from each later step; the prompts with "
                       "the trigger first). The mean pixel changes are below.")
        elif self.suggested:
            verdict = (f"**Acting from step {self.suggested} of {self.steps} keeps more of the base and the look**: "
                       f"add the adapter as `<lora:{self.name}:1:start={self.suggested}>` (or tick *steps* on its "
                       f"row). Pictures in `{sheet}`.")
        else:
            verdict = (f"**Act at every step**: no later start of those checked keeps {KEEP:.0%} of the look "
                       f"({look_words}) while keeping more of the base. Pictures in `{sheet}`.")
        trig = ", ".join(f"`{p}`" for p in self.trigger_prompts)
        return (f"## Step range\n\n{verdict} The adapter's UNet part acts from the step given, its text-encoder "
                f"part throughout; {self.steps} sampler steps, weight 1, trigger prompts {trig}.\n\n"
                "| adapter acts | trigger-free: change from the base | with the trigger: change from every step |\n"
                "|---|---|---|\n" + "\n".join(rows) + "\n")


@dataclass
class WeightCheck:
    prompts: list[str]
    weights: tuple[float, ...]
    change: dict[float, float]  # mean absolute pixel change (0..1) from the base's picture
    kept: dict[float, float] | None = None  # toy world: share of pictures keeping colour, shape and background
    safe_up_to: float | None = None  # the largest weight (of WEIGHTS) up to which every weight keeps KEEP
    sheet: Path | None = None
    notes: list[str] = field(default_factory=list)
    step_check: StepCheck | None = None

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
        text = (f"## Weight range\n\n{verdict} {how} Checked at the end of training on {prompts}.\n\n"
                f"| weight | change from the base |\n|---|---|\n" + "\n".join(rows) + "\n")
        return text + (f"\n{self.step_check.card_text()}" if self.step_check is not None else "")


def _sample_texts(tr: "Trainer") -> list[str]:
    """The sample prompts' texts, without kohya's options (--n, --w …) after them."""
    from .sample_prompts import parse_sample_prompt

    return [parse_sample_prompt(line).prompt for line in tr.cfg.all_sample_prompts()]


def check_prompts(tr: "Trainer") -> list[str]:
    from .trainer import _trigger_word_re, preservation_prompts

    word = _trigger_word_re(tr.cfg.trigger)
    own = [p for p in _sample_texts(tr) if not word.search(p)]
    derived = [p for p in preservation_prompts(tr.cfg.replace(preserve_prompts=[]),
                                               [it.caption for it in tr.scan.items], readable=True) if p]
    return list(dict.fromkeys([*own, *derived]))[:MAX_PROMPTS]


def trigger_prompts(tr: "Trainer") -> list[str]:
    """Prompts with the trigger: the sample prompts that have it, else the training captions."""
    from .trainer import _trigger_word_re

    word = _trigger_word_re(tr.cfg.trigger)
    own = [p for p in _sample_texts(tr) if word.search(p)]
    captions = [it.caption for it in tr.scan.items if word.search(it.caption or "")]
    return list(dict.fromkeys(own or captions))[:MAX_PROMPTS]


def check_starts(steps: int) -> tuple[int, ...]:
    """0 (every step) and the start steps STARTS of `steps` gives, each at least 1 and below `steps`."""
    return tuple(dict.fromkeys([0, *(s for f in STARTS if 0 < (s := round(f * steps)) < steps)]))


def _lora_layers(tr: "Trainer") -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    # LoRA, LoHa and LoKr layers alike: each scales its update by `scaling` (scale_layer / unscale_layer)
    return [m for c in tr.components for m in getattr(tr.base.pipe, c).modules()
            if isinstance(m, BaseTunerLayer) and hasattr(m, "scaling")]


@torch.no_grad()
def check_weights(tr: "Trainer") -> WeightCheck | None:
    """Run the check on the trainer's model (its LoRA attached at weight 1), leaving it as it was."""
    from pipelines.generation import GenerationRequest, generate
    from pipelines.stack import _set_enabled

    from .config import preset_family
    from .trainer import AdaptersOff

    prompts = check_prompts(tr)
    if not prompts:
        return None
    cfg, base = tr.cfg, tr.base
    layers = _lora_layers(tr)
    unet = base.pipe.unet
    in_unet = {id(m) for m in unet.modules()}
    unet_layers = [m for m in layers if id(m) in in_unet]
    was_training = unet.training

    def draw(ps: list[str], w: float, start: int = 0) -> list:
        """The pictures of `ps` (seed sample_seed + i) with the adapter at weight `w` (0: bypassed), its UNet
        part acting from sampler step `start` on."""
        if w:
            for layer in layers:
                layer.scale_layer(w)

        def hook(i: int) -> None:
            for layer in unet_layers:
                _set_enabled(layer, i >= start)

        try:
            ctx = AdaptersOff([getattr(base.pipe, c) for c in tr.components]) if w == 0 else nullcontext()
            with ctx:
                return [generate(base, GenerationRequest(prompt=p, steps=cfg.sample_steps, seed=cfg.sample_seed + i,
                                                         width=tr.resolution, height=tr.resolution,
                                                         clip_skip=cfg.clip_skip),
                                 step_hook=hook if start else None)[0].image
                        for i, p in enumerate(ps)]
        finally:
            if start:
                for layer in unet_layers:
                    _set_enabled(layer, True)
            if w:
                for layer in layers:
                    layer.unscale_layer()

    unet.eval()
    images: dict[float, list] = {}
    triggered = trigger_prompts(tr)
    starts = check_starts(cfg.sample_steps)
    free_at: dict[int, list] = {}
    look_at: dict[int, list] = {}
    try:
        for w in (0.0, *WEIGHTS):
            images[w] = draw(prompts, w)
        free_at[0] = images[1.0]
        if triggered and len(starts) > 1 and unet_layers:  # a text-encoder-only adapter has no steps to pick
            look_base = draw(triggered, 0.0)
            for s in starts:
                look_at[s] = draw(triggered, 1.0, s)
                free_at[s] = free_at.get(s) or draw(prompts, 1.0, s)
    finally:
        unet.train(was_training)
    change = {w: _change(images[w], images[0.0]) for w in WEIGHTS}
    res = WeightCheck(prompts, WEIGHTS, change)
    if look_at:
        res.step_check = StepCheck(cfg.sample_steps, starts, triggered,
                                   free_change={s: _change(free_at[s], images[0.0]) for s in starts},
                                   look_change={s: _change(look_at[s], look_at[0]) for s in starts}, name=cfg.name)
    if preset_family(cfg.base) == "toy" and tr.resolution == 64:
        try:
            from .evaluator import classify, load_evaluator

            ev = load_evaluator()
        except Exception as e:  # noqa: BLE001 - no evaluator: the pictures are the check
            res.notes.append(f"no evaluator ({e})")
        else:
            keys = ("color", "shape", "background")
            ref = classify(ev, images[0.0])

            def kept(ims: list, reference: list) -> float:
                got = classify(ev, ims)
                return sum(all(g[k] == r[k] for k in keys) for g, r in zip(got, reference)) / len(reference)

            res.kept = {w: kept(images[w], ref) for w in WEIGHTS}
            safe = None
            for w in WEIGHTS:
                if res.kept[w] < KEEP:
                    break
                safe = w
            res.safe_up_to = safe
            if (sc := res.step_check) is not None:
                # the look the adapter was trained for: what the evaluator reads in the training images on the
                # fields their captions leave unnamed (the outline style, the star shape), where most agree
                look = trained_look(ev, tr.scan.items)
                sc.look = look
                sc.free_kept = {s: kept(free_at[s], ref) for s in starts}
                sc.look_kept = {s: sum(all(g[k] == v for k, v in look.items()) for g in classify(ev, look_at[s]))
                                / len(look_at[s]) for s in starts}
                sc.suggested = suggest_start(starts, sc.look_kept, sc.free_kept)
    res.sheet = _sheet(images, prompts, tr.run_dir / "weight-check.png")
    if (sc := res.step_check) is not None:
        cols = {"base": look_base + images[0.0],
                **{("every step" if s == 0 else f"from step {s}"): look_at[s] + free_at[s] for s in starts}}
        sc.sheet = _sheet(cols, triggered + prompts, tr.run_dir / "step-check.png")
    return res


def suggest_start(starts: tuple[int, ...], look_kept: dict[int, float], free_kept: dict[int, float]) -> int | None:
    """The latest start after 0 whose trigger pictures show at least KEEP times the look they show at every
    step (which must show it at all) and whose trigger-free pictures keep more of the base; None if none."""
    good = [s for s in starts[1:] if look_kept[0] > 0 and look_kept[s] >= KEEP * look_kept[0]
            and free_kept[s] > free_kept[0]]
    return good[-1] if good else None


def trained_look(ev, items: list) -> dict[str, str]:
    """{field: value} the training images show on the fields their captions do not name, where at least
    half of them agree: for a style set the style, for a concept set (captions without the shape) the shape."""
    from collections import Counter

    from PIL import Image

    from . import toy_world as tw
    from .evaluator import classify

    reads = classify(ev, [Image.open(it.path).convert("RGB").resize((64, 64), Image.BICUBIC) for it in items])
    votes: dict[str, Counter] = {}
    for it, r in zip(items, reads):
        named = tw.parse_caption(it.caption or "")
        for k, v in r.items():
            if named.get(k) is None:
                votes.setdefault(k, Counter())[v] += 1
    return {k: c.most_common(1)[0][0] for k, c in votes.items() if c.most_common(1)[0][1] * 2 >= len(items)}


def _change(images: list, reference: list) -> float:
    """Mean absolute pixel change (0..1) of each picture from its reference, averaged."""
    arr = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in images]
    ref = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255 for im in reference]
    return float(np.mean([np.abs(a - b).mean() for a, b in zip(arr, ref)]))


def _sheet(images: dict, prompts: list[str], path: Path) -> Path:
    """A row per prompt, a column per key of `images` (a weight, 0 = the base, or a label)."""
    from PIL import Image, ImageDraw

    from pipelines.weights_io import atomic_write

    cols = list(images)
    w, h = images[cols[0]][0].size
    cell = max(w, 96)
    sheet = Image.new("RGB", (cell * len(cols), 16 + cell * len(prompts)), "white")
    d = ImageDraw.Draw(sheet)
    for c, wt in enumerate(cols):
        label = wt if isinstance(wt, str) else "base" if wt == 0 else f"weight {wt:g}"
        d.text((c * cell + 4, 2), label, fill="black")
        for r, im in enumerate(images[wt]):
            sheet.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (c * cell, 16 + r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path
