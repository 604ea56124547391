"""Weighted, stacked LoRA adapters on a loaded base model: load once, re-weight freely, fuse, bake.

Each adapter file is loaded once by diffusers under its own adapter name (cached by path, mtime and
size); choosing adapters and weights afterwards only calls diffusers' `set_adapters`, so it never
re-reads a file nor reloads the base. With no adapter active the LoRA layers are bypassed and the
output is bit-for-bit the base model's.

Prompts may carry AUTOMATIC1111 tags, `<lora:name:w>` or `<lora:name:te_w:unet_w>` (A1111 order:
the text-encoder multiplier first, then the UNet one; also `te=`/`unet=`); images record
`Lora hashes: "name: hash12, ..."` in their `parameters` text, as A1111 does.

An entry may act on part of the sampler's steps only: `start=N` (the UNet part of the adapter switches on
at step N, counting from 0) and `stop=N` (off from step N), as in the LoRA Block Weight extension's tags
(`<lora:name:0.8:start=10>`). The text encoders run once, before the first step, at the entry's weight.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from .adapters import (
    COMPONENTS,
    DIFFUSERS_METADATA_KEY,
    TEXT_ENCODERS,
    FORMAT_PEFT,
    AdapterInfo,
    _canon_module,
    _strip_text_model,
    canonical_peft_keys,
    describe,
    as_lora,
    detect_format,
    fold_dora,
    diffusers_adapter_config,
    lora_metadata,
    save_embedding,
    save_kohya,
    text_encoder_to_peft,
    to_peft,
)
from .base_models import BaseModel
from .dora import ChannelScale, channel_state, clear_channels, combine, scaled_weight, set_channels
from .embeddings import add_vectors, bundled, split_bundled, token_stem, vector_count
from .errors import ConfigError, IncompatibleAdapterError, LoraStudioError
from .generation import GeneratedImage, GenerationRequest, format_parameters, generate as _generate
from .single_file import unet_block_prefixes, unet_layout, unet_module_to_ldm
from .weights_io import PICKLE_SUFFIXES, addnet_hash, load_safetensors

# the weights an adapter may be given: wider than the app's sliders (-2..2), because prompts copied from
# AUTOMATIC1111 (which takes any weight) use 3 or -5 with "slider" LoRAs; ComfyUI's loader allows ±100
WEIGHT_MIN, WEIGHT_MAX = -10.0, 10.0
# <lyco:…>: the LyCORIS extension's tag (civitai prompts of LyCORIS files), which AUTOMATIC1111 reads too
_TAG = re.compile(r"<(?:lora|lyco):([^<>]*)>", re.IGNORECASE)


# --------------------------------------------------------------------------------------------------
# LoRA Block Weight (the AUTOMATIC1111 extension): `<lora:name:1:lbw=INALL>` or 17 numbers, one per block
#
# A ratio per UNet block of the original (LDM) layout, and BASE for the text encoders. Lists of 17 (SD 1.x
# LoRA) or 26 (every block, LoCon) values; 12 or 20 for SDXL. A block a shorter list leaves out gets 0; a layer
# outside every block (time embedding, conv_out) keeps its weight. These are the extension's block lists and
# its default presets (its lbwpresets.txt), so prompts copied from civitai draw what they drew there.
LBW_26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
LBW_LISTS = {
    17: ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12))),
    26: LBW_26,
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))),
    20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))),
}
LBW_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
_LDM_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)")


def block_ratios(spec: str, what: str = "lbw") -> tuple[float, ...]:
    """A block-weight spec (a preset name or 12/17/20/26 numbers) as 26 ratios in LBW_26's order."""
    text = LBW_PRESETS.get(spec.strip().upper(), spec)
    parts = [t.strip() for t in text.split(",")]
    if len(parts) not in LBW_LISTS:
        raise ConfigError(f"{what}: give a preset ({', '.join(LBW_PRESETS)}) or 17 or 26 numbers (SD 1.x), 12 or 20 "
                          f"(SDXL), one per block ({','.join(LBW_LISTS[17])}); got {spec!r}")
    out = [0.0] * 26
    for block, part in zip(LBW_LISTS[len(parts)], parts):
        out[LBW_26.index(block)] = _num(part, what)
    return tuple(out)


def layer_block(component: str, module: str, prefixes: dict) -> int | None:
    """The LBW_26 index of a LoRA layer: 0 (BASE) for the text encoders, the LDM input/middle/output block of a
    UNet module; None for a UNet layer outside the blocks (its weight is kept)."""
    if component != "unet":
        return 0
    m = _LDM_BLOCK.match(unet_module_to_ldm(module, prefixes) or "")
    if m is None:
        return None
    if m.group(1) == "middle_block":
        return 13
    n = int(m.group(2))
    return None if n >= 12 else (1 if m.group(1) == "input_blocks" else 14) + n


# --------------------------------------------------------------------------------------------------
# what to stack


@dataclass(frozen=True)
class StackEntry:
    """One adapter in a stack: UNet weight and text-encoder weight (ComfyUI's strength_model / _clip)."""

    name: str
    weight: float = 1.0
    te_weight: float | None = None  # None: same as weight
    # the UNet part acts from this sampler step (0-based) up to, not including, `stop` (None: to the last step);
    # a value between 0 and 1 is a share of the steps (LoRA Block Weight's `stop=0.4`), made a step by `resolved`
    start: int | float = 0
    stop: int | float | None = None
    lbw: str | None = None  # block weights: a LoRA Block Weight preset or list (see block_ratios)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError("lora: an adapter name is required")
        for fname in ("start", "stop"):
            v = getattr(self, fname)
            if v is None:
                continue
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            share = isinstance(v, float) and math.isfinite(v) and 0 < v < 1
            if isinstance(v, bool) or not (isinstance(v, int) or share) or v < 0:
                raise ConfigError(f"lora {self.name!r} {fname}: must be a whole number of sampler steps, 0 or more, "
                                  f"or a share of the steps between 0 and 1, got {v!r}")
            object.__setattr__(self, fname, v)
        if self.lbw is not None:
            object.__setattr__(self, "lbw", str(self.lbw).strip() or None)
            if self.lbw is not None:
                block_ratios(self.lbw, f"lora {self.name!r} lbw")
        same_kind = isinstance(self.start, float) == isinstance(self.stop, float) or self.start == 0
        if self.stop is not None and same_kind and self.stop <= self.start:
            raise ConfigError(f"lora {self.name!r} stop: must be after start ({self.start}), got {self.stop}; "
                              "the adapter would act at no step")
        for fname in ("weight", "te_weight"):
            v = getattr(self, fname)
            if v is None:
                continue
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not WEIGHT_MIN <= v <= WEIGHT_MAX:
                raise ConfigError(f"lora {self.name!r} {fname}: must be a number between {WEIGHT_MIN:g} and "
                                  f"{WEIGHT_MAX:g}, got {v!r}")
            object.__setattr__(self, fname, float(v))

    @property
    def text_weight(self) -> float:
        return self.weight if self.te_weight is None else self.te_weight

    @functools.cached_property
    def ratios(self) -> tuple[float, ...] | None:
        """The 26 block ratios (LBW_26 order), or None without block weights (read once per entry)."""
        return block_ratios(self.lbw) if self.lbw is not None else None

    def ratio(self, block: int | None) -> float:
        """This entry's factor for a layer in `block` (layer_block): 1 without block weights."""
        r = self.ratios
        return 1.0 if r is None or block is None else r[block]

    def resolved(self, steps: int) -> "StackEntry":
        """This entry with a share of the steps made a step of a `steps`-step sampling, as LoRA Block Weight does
        (`max(1, round(share · steps))`: stop=0.4 of 20 steps is step 8)."""
        def step(v):
            return max(1, round(v * steps)) if isinstance(v, float) else v

        if not isinstance(self.start, float) and not isinstance(self.stop, float):
            return self
        start, stop = step(self.start), step(self.stop) if self.stop is not None else None
        if stop is not None and stop <= start:
            raise ConfigError(f"lora {self.name!r}: start={self.start} and stop={self.stop} of {steps} steps leave no "
                              "step for the adapter to act in")
        return replace(self, start=start, stop=stop)

    @property
    def fractional(self) -> bool:
        """A step range given as shares of the steps (start=0.4)."""
        return isinstance(self.start, float) or isinstance(self.stop, float)

    def active_at(self, step: int) -> bool:
        """Does the UNet part act at sampler step `step` (0-based)? (Of an entry `resolved` for the sampling.)"""
        return step >= self.start and (self.stop is None or step < self.stop)

    def scheduled(self, steps: int) -> bool:
        """Is the UNet part off for some of a `steps`-step sampling?"""
        e = self.resolved(steps)
        return e.start > 0 or (e.stop is not None and e.stop < steps)

    def tag(self) -> str:
        """The A1111 prompt tag for this entry (te multiplier first when they differ; then start=/stop=)."""
        if self.te_weight is None or self.te_weight == self.weight:
            body = f"{self.name}:{self.weight:g}"
        else:
            body = f"{self.name}:{self.te_weight:g}:{self.weight:g}"
        body += f":start={self.start}" if self.start else ""
        body += f":stop={self.stop}" if self.stop is not None else ""
        body += f":lbw={self.lbw}" if self.lbw is not None else ""
        return f"<lora:{body}>"


def _num(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"lora {what}: '{text}' is not a number") from None


def _step(text: str, what: str) -> int | float:
    """A sampler step, or a share of the steps between 0 and 1 (LoRA Block Weight's `stop=0.4`)."""
    try:
        return int(text.strip())
    except ValueError:
        pass
    try:
        v = float(text.strip())
    except ValueError:
        v = None
    if v is None or not 0 < v < 1:
        raise ConfigError(f"lora {what}: '{text}' is not a whole number of sampler steps (nor a share of the steps "
                          "between 0 and 1)") from None
    return v


def parse_lora_tags(prompt: str) -> tuple[str, list[StackEntry]]:
    """Strip A1111 `<lora:...>` tags from a prompt; return (clean prompt, entries in order).

    `<lora:name>` weight 1; `<lora:name:w>` both weights w; `<lora:name:te:unet>` as A1111 (text
    encoder first); named `te=`/`unet=` also accepted; `start=N` / `stop=N` the sampler steps the UNet
    part acts in (as the LoRA Block Weight extension reads them). Other named parts (`lbw=`, ...) are ignored.
    """
    entries: list[StackEntry] = []
    for m in _TAG.finditer(prompt):
        parts = [p.strip() for p in m.group(1).split(":")]
        name, rest = parts[0], parts[1:]
        named = dict(p.split("=", 1) for p in rest if "=" in p)
        named = {k.strip(): v.strip() for k, v in named.items()}
        # the extension's older form puts the block weights in place of a number: <lora:name:1:INALL>
        positional = []
        for p in (p for p in rest if "=" not in p):
            if "lbw" not in named and (p.upper() in LBW_PRESETS or "," in p):
                named["lbw"] = p
            else:
                positional.append(p)
        te = _num(positional[0], f"{name!r} weight") if positional else 1.0
        te = _num(named["te"], f"{name!r} te") if "te" in named else te
        unet = _num(positional[1], f"{name!r} unet weight") if len(positional) > 1 else te
        unet = _num(named["unet"], f"{name!r} unet") if "unet" in named else unet
        start = _step(named["start"], f"{name!r} start") if "start" in named else 0
        stop = _step(named["stop"], f"{name!r} stop") if "stop" in named else None
        entries.append(StackEntry(name, unet, te, start, stop, named.get("lbw")))
    clean = re.sub(r"[ \t]{2,}", " ", _TAG.sub("", prompt)).strip()
    clean = re.sub(r"\s+,", ",", clean).strip(" ,")
    return clean, entries


def parse_lora_arg(text: str) -> StackEntry:
    """CLI form NAME[:W[:TE_W]][:start=N][:stop=N][:lbw=SPEC] (UNet weight, then text-encoder weight; sampler
    steps; block weights)."""
    parts = text.split(":")
    steps: dict[str, object] = {}
    while len(parts) > 1 and re.fullmatch(r"\s*(start|stop|lbw)\s*=.*", parts[-1]):
        key, value = parts.pop().split("=", 1)
        key = key.strip()
        steps[key] = value.strip() if key == "lbw" else _step(value, f"{':'.join(parts)!r} {key}")
    nums: list[float] = []
    while len(parts) > 1 and len(nums) < 2 and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", parts[-1]):
        nums.insert(0, float(parts.pop()))
    name = ":".join(parts)
    weights = nums[:2] + [None] * (2 - len(nums[:2]))
    return StackEntry(name, 1.0 if weights[0] is None else weights[0], weights[1], **steps)


def range_warnings(entries: Iterable[StackEntry], steps: int) -> list[str]:
    """Entries whose step range starts at or after the last of `steps` sampler steps: their UNet part acts at
    no step (the image is the base's, with only the text-encoder part at work). Allowed (a grid may sweep
    past the end), but said."""
    return [f"{e.name}: start={e.start} is past the last of the {steps} sampler steps (0 to {steps - 1}), so its "
            f"UNet part acts at no step; lower start= or raise the steps" for e in entries
            if e.resolved(steps).start >= steps]


def clip_skip_warnings(stack: "AdapterStack", clip_skip: int) -> list[str]:
    """Adapters in the stack trained with another Clip skip than the one generating: said (A1111 leaves the
    setting to the user, who often does not know it), not changed."""
    out = []
    if stack.model.family == "sdxl":  # SDXL takes its own layer: an SDXL LoRA's ss_clip_skip means nothing here
        return out
    for e in stack.stack:
        info = stack.loaded.get(e.name)
        if info is not None and e.weight and info.clip_skip != clip_skip:
            out.append(f"{e.name} was trained with Clip skip {info.clip_skip}; this image uses {clip_skip}: set "
                       f"Clip skip to {info.clip_skip} for the look it learned")
    return out


def parse_lora_hashes(value: str) -> dict[str, str]:
    """A1111's `Lora hashes` value ('a: 0123456789ab, b: ...') -> {name: hash}."""
    out = {}
    for item in value.split(","):
        if ":" in item:
            k, v = item.rsplit(":", 1)
            out[k.strip()] = v.strip()
    return out


def _no_step_ranges(entries: Sequence[StackEntry]) -> None:
    for e in entries:
        if e.start or e.stop is not None:
            raise ConfigError(f"lora {e.name!r}: a step range (start=/stop=) acts during sampling and cannot be "
                              "baked into weights; bake it without the range")


def _coerce(entries: Iterable[StackEntry | tuple | str]) -> list[StackEntry]:
    out: list[StackEntry] = []
    for e in entries:
        if isinstance(e, StackEntry):
            out.append(e)
        elif isinstance(e, str):
            out.append(parse_lora_arg(e))
        else:
            out.append(StackEntry(*e))
    seen = set()
    for e in out:
        if e.name.casefold() in seen:
            raise ConfigError(f"lora: '{e.name}' is in the stack twice")
        seen.add(e.name.casefold())
    return out


# --------------------------------------------------------------------------------------------------
# interference report


@dataclass
class PairInterference:
    a: str
    b: str
    layers: dict[str, float]  # module -> cosine similarity of the two weighted ΔW
    threshold: float
    share_threshold: float

    @property
    def shared(self) -> int:
        return len(self.layers)

    @property
    def mean_cos(self) -> float:
        return sum(self.layers.values()) / len(self.layers) if self.layers else 0.0

    @property
    def share_aligned(self) -> float:
        return sum(c > self.threshold for c in self.layers.values()) / max(1, len(self.layers))

    @property
    def share_opposed(self) -> float:
        return sum(c < -self.threshold for c in self.layers.values()) / max(1, len(self.layers))

    @property
    def warning(self) -> str | None:
        if not self.layers or self.share_aligned + self.share_opposed < self.share_threshold:
            return None
        if self.share_opposed >= self.share_aligned:
            return (f"'{self.a}' and '{self.b}' fight: their weight updates point in opposite directions "
                    f"(cos < -{self.threshold:g}) on {self.share_opposed:.0%} of {self.shared} shared layers "
                    f"(mean cos {self.mean_cos:+.2f}); they partly cancel — lower one weight or drop one")
        return (f"'{self.a}' and '{self.b}' overlap strongly: cos > {self.threshold:g} on {self.share_aligned:.0%} "
                f"of {self.shared} shared layers (mean cos {self.mean_cos:+.2f}); their effects add up — "
                "consider lowering their weights")


@dataclass
class InterferenceReport:
    pairs: list[PairInterference] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [w for p in self.pairs if (w := p.warning)]

    def summary(self) -> str:
        lines = [f"{p.a} × {p.b}: {p.shared} shared layers, mean cos {p.mean_cos:+.2f}, "
                 f"aligned {p.share_aligned:.0%}, opposed {p.share_opposed:.0%}" for p in self.pairs]
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def _gram_inner(a1, b1, a2, b2) -> float:
    """<B1 A1, B2 A2>_F without forming either product: sum((B1ᵀ B2) ⊙ (A1 A2ᵀ))."""
    return float(((b1.T @ b2) * (a1 @ a2.T)).sum())


# --------------------------------------------------------------------------------------------------
# the stack


@dataclass
class _Loaded:
    name: str
    adapter: str  # diffusers/peft adapter name
    path: Path
    key: tuple[str, int, int]  # resolved path, mtime_ns, size
    info: AdapterInfo
    components: list[str]
    words: dict = field(default_factory=dict)  # its bundled embeddings: word -> {tokenizer attribute: tokens}
    vectors: dict = field(default_factory=dict)  # and their vectors: word -> {'' or clip_l / clip_g: (n, D)}


def _lora_layers(model) -> Iterable[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            yield name, mod


# The per-layer adapter slot that holds a whole weighted stack: ΔW = Σ sᵢ Bᵢ Aᵢ = [s₁B₁ … sₙBₙ] @ [A₁; …; Aₙ].
# peft runs every active adapter of a layer as its own cast/dropout/A/B/scale/add sequence; with n adapters
# that is n times the small-op overhead per layer (and per GPU kernel launch). One concatenated slot costs
# the same FLOPs but a single pair of matmuls, whatever n is.
COMBINED_ADAPTER = "lora_studio_stack"
_COMBINED_KEY = "_lora_studio_combined"  # attribute on a layer: the adapters its slot currently holds


def _combinable(layer, adapters: Sequence[str]) -> bool:
    """Plain peft LoRA Linear layers only: no DoRA / other variants, no LoRA bias, no transposed weights."""
    from peft.tuners.lora.layer import Linear

    return (type(layer) is Linear and not getattr(layer, "fan_in_fan_out", False)
            and all(a not in layer.lora_variant and not layer.lora_bias.get(a, False) for a in adapters))


def _combine_layer(layer, adapters: Sequence[str], activate: bool = True) -> None:
    """Fill the layer's combined slot from its adapters at their current scaling (and make it the only active one).

    The slot is created once by peft (`update_layer`, scaling alpha / r = 1); a stack of another total rank
    resizes its two Linear weights in place. Only B is re-copied when the slot already holds these adapters
    (a change of weights).
    """
    key = tuple(adapters)
    rank = sum(int(layer.r[a]) for a in adapters)
    if COMBINED_ADAPTER not in layer.lora_A:
        from peft import LoraConfig

        cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights=False, inference_mode=True)
        layer.update_layer(COMBINED_ADAPTER, rank, rank, cfg)
        setattr(layer, _COMBINED_KEY, None)
    rebuild = getattr(layer, _COMBINED_KEY, None) != key
    lin_a, lin_b = layer.lora_A[COMBINED_ADAPTER], layer.lora_B[COMBINED_ADAPTER]
    with torch.no_grad():
        # (out, Σr): the weights live here, so a change of weights is this one copy
        b_cat = torch.cat([layer.lora_B[a].weight * layer.scaling[a] for a in adapters], 1)
        if rebuild:
            a_cat = torch.cat([layer.lora_A[a].weight for a in adapters], 0)  # (Σr, in)
            if lin_a.weight.shape != a_cat.shape:  # another total rank: new tensors in the same modules
                lin_a.weight = torch.nn.Parameter(a_cat, requires_grad=False)
                lin_b.weight = torch.nn.Parameter(b_cat, requires_grad=False)
                lin_a.out_features = lin_b.in_features = rank
                layer.r[COMBINED_ADAPTER] = layer.lora_alpha[COMBINED_ADAPTER] = rank  # scaling stays 1
            else:
                lin_a.weight.copy_(a_cat)
                lin_b.weight.copy_(b_cat)
            setattr(layer, _COMBINED_KEY, key)
        else:
            lin_b.weight.copy_(b_cat)
    if activate:
        layer.set_adapter([COMBINED_ADAPTER], inference_mode=True)


def _fast_forward(layer, x, *args, **kwargs):
    """Inference forward of a plain LoRA Linear with one active slot: base(x) + B(A(x))·s in a few ops.

    peft's own forward is general (dropout, mixed adapter batches, variants, dtype juggling per adapter)
    and on small layers its Python work costs more than the matmuls. This takes its place only where
    it computes the same thing: no gradients, adapters on, not merged, exactly one active plain slot;
    everything else goes to peft's forward.
    """
    if args or kwargs or layer._disable_adapters or layer.merged_adapters or torch.is_grad_enabled():
        return type(layer).forward(layer, x, *args, **kwargs)
    active = layer._active_adapter
    a = active[0] if isinstance(active, (list, tuple)) and len(active) == 1 else active
    lin_a = layer.lora_A[a] if isinstance(a, str) and a in layer.lora_A else None
    if lin_a is None or a in layer.lora_variant or (layer.training and
                                                     not isinstance(layer.lora_dropout[a], torch.nn.Identity)):
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x)
    w_a = lin_a.weight
    delta = F.linear(F.linear(x.to(w_a.dtype), w_a), layer.lora_B[a].weight)
    return result + (delta * layer.scaling[a]).to(result.dtype)  # peft's order of operations: same bits


def _add_to_lora_layers(model, prefix: str, state_dict: dict, network_alphas: dict | None, metadata: dict | None,
                        adapter: str) -> bool:
    """Add `adapter` to a model whose target modules all carry peft LoRA layers already (from adapters
    loaded before): the same LoraConfig as diffusers builds, the same per-module rank and alpha as peft's
    injection gives, the same weights; without peft walking the whole model for every module, which is
    most of a load's time. False (nothing changed) for anything else: the caller then loads the general way.
    """
    from diffusers.utils.peft_utils import _create_lora_config
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from peft.tuners.lora import Conv2d as LoraConv2d
    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils.other import get_pattern_key

    if not getattr(model, "peft_config", None) or adapter in model.peft_config:
        return False
    sd = {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    if not sd:
        return False
    if prefix == "unet":
        if "lora_A" not in next(iter(sd)):
            sd = convert_unet_state_dict_to_peft(sd)
        rank = {f"^{k}": v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
    else:
        if hasattr(model, "text_model"):
            return False  # older transformers layout: leave its key handling to diffusers
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        rank = {k: v.shape[1] for k, v in sd.items() if k.endswith(".lora_B.weight")
                and k.split(".lora_B.")[0].endswith((".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2"))}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        mod, sep, rest = k.rpartition(".lora_")
        if not sep or rest not in ("A.weight", "B.weight"):
            return False  # biases, DoRA magnitudes, ...
        pairs.setdefault(mod, {})[rest[0]] = v
    if not rank or any(len(ab) != 2 for ab in pairs.values()):
        return False
    alphas = None
    if network_alphas:
        alphas = {k[len(prefix) + 1:]: v for k, v in network_alphas.items() if k.startswith(prefix + ".")}
    meta = None
    if metadata is not None:
        meta = {k[len(prefix) + 1:]: v for k, v in metadata.items() if k.startswith(prefix + ".")}
    config = _create_lora_config(sd, alphas, meta, rank, is_unet=prefix == "unet")
    if config.use_dora or config.lora_bias or config.use_rslora:
        return False
    plan = []
    for mod, ab in pairs.items():
        try:
            layer = model.get_submodule(mod)
        except AttributeError:
            return False
        if type(layer) not in (LoraLinear, LoraConv2d) or adapter in layer.lora_A:
            return False
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), mod), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), mod), config.lora_alpha)
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            return False
        plan.append((mod, layer, r, alpha, ab))
    for mod, layer, r, alpha, ab in plan:
        layer.update_layer(adapter, r, lora_alpha=alpha, target_name=mod, config=config)
        with torch.no_grad():
            for part, src in (("A", ab["A"]), ("B", ab["B"])):
                w = getattr(layer, f"lora_{part}")[adapter].weight
                if w.shape != src.shape:
                    raise IncompatibleAdapterError(f"{mod}: LoRA {part} has shape {tuple(src.shape)}, "
                                                   f"the layer needs {tuple(w.shape)}")
                w.copy_(src)
    model.peft_config[adapter] = config
    return True


def _install_fast_forward(model) -> None:
    for _, layer in _lora_layers(model):
        if "forward" not in layer.__dict__ and _combinable(layer, ()):
            layer.forward = functools.partial(_fast_forward, layer)


_DORA_KEY = "_lora_studio_dora"  # attribute on a LoRA layer: {adapter: dora.ChannelScale}


def _channels(layer, present: Sequence[str], scale_of: Callable[[str], float] | None) -> None:
    """Set the base layer's DoRA channel scales for the adapters active in it at their weights in this layer."""
    terms = layer.__dict__.get(_DORA_KEY)
    base = layer.get_base_layer()
    if not terms:
        if channel_state(base) is not None:
            clear_channels(base)
        return
    set_channels(base, *combine([(terms[a], scale_of(a)) for a in present if a in terms]))


def _set_enabled(layer, on: bool) -> None:
    """peft's `enable_adapters(on)` for inference: the switch alone, without touching requires_grad."""
    if hasattr(layer, "_disable_adapters"):
        layer._disable_adapters = not on
    else:
        layer.enable_adapters(on)


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the names they have without LoRA wrappers.

    For each peft-wrapped module, `X.base_layer.weight` becomes `X.weight` (whatever is in the base
    layer now: the base weights, or base + ΔW while fused) and its LoRA factors are dropped.
    Tensors are the model's own, not copies.
    """
    wrapped = {name for name, _ in _lora_layers(model)}
    sd = model.state_dict()
    if not wrapped:
        return sd
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        cut = next((i for i in range(1, len(parts)) if ".".join(parts[:i]) in wrapped), None)
        if cut is None:
            out[key] = value
        elif parts[cut] == "base_layer":
            out[".".join(parts[:cut] + parts[cut + 1:])] = value
        # else: lora_A / lora_B / magnitude tensors of the wrapper: not part of the base model
    return out


class AdapterStack:
    """Adapters loaded into one base model, and the weighted selection currently applied.

    Thread safety: every method takes `self.lock`; `generate` holds it across applying its stack and
    running the pipeline, so concurrent requests with different stacks never see each other's weights.
    """

    def __init__(self, model: BaseModel, library=None, *, allow_pickle: bool = False) -> None:
        self.model = model
        self.library = library
        self.allow_pickle = allow_pickle
        self.lock = threading.RLock()
        self._loaded: dict[str, _Loaded] = {}
        self._stack: tuple[StackEntry, ...] = ()
        self._fused: tuple[StackEntry, ...] | None = None
        self._snapshot: dict[int, torch.Tensor] = {}
        # what the model's LoRA layers are set to: None unknown (after a load/unload), () all bypassed, else the
        # adapter names activated in that order; with the layers they adapt: (layer, component, names, combined)
        self._applied: tuple[str, ...] | None = None
        # (layer, component, adapters in it, combined into one slot, LBW block)
        self._layer_cache: list[tuple[torch.nn.Module, str, list[str], bool, int | None]] = []
        self._entry_of: dict[str, StackEntry] = {}  # adapter -> its entry of the applied stack (block weights)
        self._prefixes: dict | None = None  # the UNet's LDM block prefixes (for block weights)
        self._detached: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []  # while fused: (parent, name, wrapper)
        self._counter = 0
        self.reads = 0  # adapter files read so far (a cache check for tests and benchmarks)

    # ------------------------------------------------------------------------------ loading
    @property
    def pipe(self):
        return self.model.pipe

    @property
    def loaded(self) -> dict[str, AdapterInfo]:
        return {n: l.info for n, l in self._loaded.items()}

    @property
    def stack(self) -> tuple[StackEntry, ...]:
        return self._stack

    @property
    def fused(self) -> bool:
        return self._fused is not None

    def _resolve(self, name: str, path: str | os.PathLike | None) -> Path:
        if path is not None:
            return Path(path).expanduser()
        if self.library is None:
            raise ConfigError(f"lora: no adapter library to find '{name}' in")
        return self.library.path_for(name)

    def _key_of(self, name: str) -> str | None:
        folded = name.casefold()
        return next((k for k in self._loaded if k.casefold() == folded), None)

    def load(self, name: str, path: str | os.PathLike | None = None) -> AdapterInfo:
        """Load adapter `name` (from the library, or from `path`) unless the same file is already loaded.

        The file is checked before anything touches the model (format, family, matching keys, finite
        values); on any error the model is left exactly as it was.
        """
        with self.lock:
            p = self._resolve(name, path)
            st = p.stat()
            key = (str(p.resolve()), st.st_mtime_ns, st.st_size)
            known = self._key_of(name)
            if known is not None and self._loaded[known].key == key:
                return self._loaded[known].info
            sd, meta = load_safetensors(p, allow_pickle=self.allow_pickle, check_finite=True)
            self.reads += 1
            sd, vectors = split_bundled(sd, p.name)  # A1111's bundled embeddings: words while it is in use
            sd, lyco = as_lora(sd, self.model, where=p, dora=True)  # LoHa / LoKr: exact LoRA factors; DoRA below
            shapes = {k: tuple(v.shape) for k, v in sd.items()}
            alphas = {k: float(v.float().reshape(-1)[0]) for k, v in sd.items() if k.endswith(".alpha") and v.numel()}
            fhash = addnet_hash(p) if p.suffix.lower() not in PICKLE_SUFFIXES else ""
            info, layers, report = describe(shapes, meta, alphas, path=p, name=name, base=self.model, file_hash=fhash,
                                            lycoris=lyco, embeddings={w: vector_count(v) for w, v in vectors.items()})
            words = {}
            for word, vec in vectors.items():
                try:
                    words[word] = add_vectors(self.model, word, vec, token_stem(name))
                except LoraStudioError as e:
                    raise IncompatibleAdapterError(f"{p.name}: its bundled embedding '{word}' does not fit the base "
                                                   f"model: {e}") from None
            for module in report.missing:  # partly matching file: load only what fits (no peft warnings)
                layer = layers[module]
                for k in (layer.a_key, layer.b_key, layer.a_key.split(".")[0] + ".alpha"):
                    sd.pop(k, None)
            if self._fused is not None:
                self.unfuse()
            terms: dict[str, ChannelScale] = {}
            if lyco is not None and lyco.magnitudes:  # DoRA: fold against the base weights (not fused: unfused above)
                sd, terms = fold_dora(sd, lyco, layers, self.pipe, where=p)
            if known is not None:
                self._delete(self._loaded.pop(known))
            self._counter += 1
            adapter = f"lora{self._counter}_" + re.sub(r"\W", "_", name)[:40]
            try:
                self._load_into_pipe(sd, meta, adapter, report.matched_components, p)
                self._attach_dora(adapter, terms)
                self._loaded[name] = _Loaded(name, adapter, p, key, info, report.matched_components, words,
                                             vectors)
            finally:  # re-apply the selection (without this adapter if its new version failed to load)
                self._apply(tuple(e for e in self._stack if self._key_of(e.name) is not None))
            return info

    def _load_into_pipe(self, sd, meta, adapter: str, components: list[str], path: Path) -> None:
        """What `pipe.load_lora_weights` does, from the tensors already read, for the matching components."""
        self._applied = None
        try:
            with warnings.catch_warnings():  # peft warns on every second adapter of a model: that is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self._load_components(sd, meta, adapter, components)
        except Exception as e:  # noqa: BLE001 - undo a half-done load whatever failed, then say which file
            self._delete_adapter(adapter)
            if isinstance(e, IncompatibleAdapterError):
                raise
            raise IncompatibleAdapterError(f"{path.name}: could not be loaded into the base model "
                                           f"({type(e).__name__}: {e})") from e

    def _attach_dora(self, adapter: str, terms: dict[str, ChannelScale]) -> None:
        """Give each LoRA layer its DoRA channel scales ({adapter: term}), keyed like `fold`'s module names."""
        if not terms:
            return
        for comp in COMPONENTS:
            model = getattr(self.pipe, comp, None)
            for mname, layer in _lora_layers(model) if model is not None else ():
                term = terms.get(_strip_text_model(f"{comp}.{mname}"))
                if term is not None and adapter in layer.lora_A:
                    layer.__dict__.setdefault(_DORA_KEY, {})[adapter] = term

    def is_dora(self, name: str) -> bool:
        """Whether a loaded adapter carries DoRA channel scales (False for one not loaded)."""
        key = self._key_of(name)
        if key is None:
            return False
        adapter = self._loaded[key].adapter
        return any(adapter in layer.__dict__.get(_DORA_KEY, {}) for comp in COMPONENTS
                   if getattr(self.pipe, comp, None) is not None for _, layer in _lora_layers(getattr(self.pipe, comp)))

    def _load_components(self, sd, meta, adapter: str, components: list[str]) -> None:
        pipe = self.pipe
        if detect_format(sd) == FORMAT_PEFT:
            state_dict, network_alphas = pipe.lora_state_dict(dict(sd), unet_config=pipe.unet.config)
            raw = meta.get(DIFFUSERS_METADATA_KEY)
            lora_meta = json.loads(raw) if raw and not network_alphas else None
            if lora_meta:  # a DoRA file's magnitudes are folded in (dora.py): its layers load as plain LoRA
                lora_meta = {k: (False if k.rsplit(".", 1)[-1] == "use_dora" else v) for k, v in lora_meta.items()}
        else:
            # kohya / older diffusers keys, mapped by diffusers' own conversion (kohya names, SDXL
            # input/middle/output_blocks, processor keys); rank and alpha go in as a LoraConfig per module,
            # because diffusers' `network_alphas` path applies only the most common alpha to every module
            lpb = pipe.unet.config.layers_per_block
            state_dict, alphas = to_peft(sd, meta, unet_layers_per_block=lpb[0] if isinstance(lpb, (list, tuple)) else lpb)
            network_alphas, lora_meta = None, diffusers_adapter_config(state_dict, alphas)

        def meta_for(comp: str):
            # diffusers passes {} for a component missing from the metadata, and LoraConfig() then fails
            return lora_meta if lora_meta and any(k.startswith(comp + ".") for k in lora_meta) else None

        state_dict = {k: v for k, v in state_dict.items() if k.split(".")[0] in components}
        for comp in TEXT_ENCODERS:
            part = {k[len(comp) + 1:]: v for k, v in state_dict.items() if k.split(".")[0] == comp}
            if part:
                state_dict = {k: v for k, v in state_dict.items() if k.split(".")[0] != comp}
                state_dict.update({f"{comp}.{k}": v for k, v in text_encoder_to_peft(part).items()})
        try:
            self._load_peft(pipe, state_dict, network_alphas, adapter, components, meta_for)
        finally:
            for comp in COMPONENTS:
                if getattr(pipe, comp, None) is not None:
                    _install_fast_forward(getattr(pipe, comp))

    @staticmethod
    def _load_peft(pipe, state_dict, network_alphas, adapter: str, components: list[str], meta_for) -> None:
        if "unet" in components and not _add_to_lora_layers(pipe.unet, "unet", state_dict, network_alphas,
                                                             meta_for("unet"), adapter):
            pipe.load_lora_into_unet(state_dict, network_alphas=network_alphas, unet=pipe.unet,
                                     adapter_name=adapter, metadata=meta_for("unet"), _pipeline=pipe)
        for comp in TEXT_ENCODERS:
            if comp in components and getattr(pipe, comp, None) is not None:
                if pipe.lora_scale == 1.0 and _add_to_lora_layers(getattr(pipe, comp), comp, state_dict,
                                                                  network_alphas, meta_for(comp), adapter):
                    continue
                pipe.load_lora_into_text_encoder(
                    state_dict, network_alphas=network_alphas, text_encoder=getattr(pipe, comp), prefix=comp,
                    lora_scale=pipe.lora_scale, adapter_name=adapter, _pipeline=pipe, metadata=meta_for(comp))

    def _delete_adapter(self, adapter: str) -> None:
        """Remove one diffusers/peft adapter from every component that has it."""
        from diffusers.utils.peft_utils import delete_adapter_layers

        self._applied = None
        for comp in COMPONENTS:
            model = getattr(self.pipe, comp, None)
            if model is None:
                continue
            for _, layer in _lora_layers(model):
                layer.__dict__.get(_DORA_KEY, {}).pop(adapter, None)
            cfg = getattr(model, "peft_config", None) or {}
            if adapter not in cfg and not any(adapter in m.lora_A for _, m in _lora_layers(model)):
                continue
            if comp == "unet":
                model.delete_adapters([adapter])
            else:  # the pipeline's delete_adapters leaves the text encoder's peft_config entry behind
                delete_adapter_layers(model, adapter)
                cfg.pop(adapter, None)

    def _delete(self, loaded: _Loaded) -> None:
        self._delete_adapter(loaded.adapter)

    def unload(self, names: Sequence[str] | None = None) -> None:
        """Remove adapters from the model (all when `names` is None: the base model is exactly restored)."""
        with self.lock:
            if self._fused is not None:
                self.unfuse()
            if names is None:
                self._clear_all_channels()
                if self._loaded:
                    self.pipe.unload_lora_weights()
                self._loaded.clear()
                self._stack = ()
                self._use_words(())
                self._applied, self._layer_cache = None, []
                return
            for n in names:
                k = self._key_of(n)
                if k is not None:
                    self._delete(self._loaded.pop(k))
            if not self._loaded:
                self._clear_all_channels()
                self.pipe.unload_lora_weights()  # drop the empty LoRA wrappers too
                self._applied, self._layer_cache = None, []
            self._apply(tuple(e for e in self._stack if self._key_of(e.name) is not None))

    # ------------------------------------------------------------------------------ weights
    def set_stack(self, entries: Iterable[StackEntry | tuple | str]) -> None:
        """Select adapters and weights: [(name, unet_weight[, te_weight]), ...] or StackEntry objects.

        Adapters not loaded yet are loaded (once); an empty list bypasses every LoRA layer.
        """
        entries = tuple(_coerce(entries))
        with self.lock:
            for e in entries:
                known = self._key_of(e.name)
                if known is None:
                    self.load(e.name)
                elif self._loaded[known].path.exists():  # re-read only a file changed since (mtime/size)
                    self.load(known, self._loaded[known].path)
            entries = tuple(replace(e, name=self._key_of(e.name)) for e in entries)
            if entries == self._stack and self._applied is not None:
                return  # already applied (and fused or not, as it was): nothing to do
            if self._fused is not None and set(entries) != set(self._fused):  # same stack reordered: stays fused
                self.unfuse()
            self._apply(entries)

    def clear(self) -> None:
        """No adapter active: the model computes exactly what the base model does."""
        self.set_stack(())

    def _apply(self, entries: tuple[StackEntry, ...]) -> None:
        pipe = self.pipe
        self._stack = entries
        self._use_words(entries)
        if not self._loaded:
            return
        if self._detached:  # fused (the same stack, reordered): applied for real when unfused
            self._applied = None
            return
        if not entries:
            if self._applied != ():
                # LoRA layers bypassed: base_layer(x) only, bit for bit the base model
                for comp in COMPONENTS:
                    model = getattr(pipe, comp, None)
                    for _, layer in _lora_layers(model) if model is not None else ():
                        _set_enabled(layer, False)
                        _channels(layer, (), None)
                self._applied = ()
            return
        names = tuple(self._loaded[e.name].adapter for e in entries)
        # per-component weights, for the components the adapter has
        weights = [{c: (e.weight if c == "unet" else e.text_weight) for c in self._loaded[e.name].components}
                   for e in entries]
        by_adapter = dict(zip(names, weights))
        self._entry_of = dict(zip(names, entries))  # adapter -> its entry of the applied stack (block weights)
        if names == self._applied:  # the same adapters in the same order: only their weights change
            self._rescale(by_adapter)
        else:
            self._activate(names, by_adapter)
            self._applied = names

    def _use_words(self, entries: tuple[StackEntry, ...]) -> None:
        """The bundled embeddings of the adapters in the stack are the prompt words in use (a later one's wins)."""
        words = bundled(self.model)
        words.clear()
        for e in entries:
            words.update(self._loaded[e.name].words)

    def _entry_scale(self, adapter: str, comp: str, block: int | None) -> float:
        """An adapter's weight in one layer of `comp`, from the applied stack's entry."""
        e = self._entry_of[adapter]
        return self._scale(adapter, e.weight if comp == "unet" else e.text_weight, block)

    def _clear_all_channels(self) -> None:
        for comp in COMPONENTS:
            model = getattr(self.pipe, comp, None)
            for _, layer in _lora_layers(model) if model is not None else ():
                clear_channels(layer.get_base_layer())

    def _scale(self, adapter: str, weight: float, block: int | None) -> float:
        """An adapter's weight in one layer: its component weight times its block weight there (LBW)."""
        return weight * self._entry_of[adapter].ratio(block)

    def _blocks(self, comp: str, model) -> Iterable[tuple[torch.nn.Module, int | None]]:
        """(LoRA layer, its LBW block) of a component."""
        prefixes = self._prefixes_of()
        for mname, layer in _lora_layers(model):
            yield layer, layer_block(comp, mname, prefixes)

    def _prefixes_of(self) -> dict:
        if self._prefixes is None:
            self._prefixes = unet_block_prefixes(unet_layout(self.pipe.unet))
        return self._prefixes

    def _activate(self, names: tuple[str, ...], weights: dict[str, dict[str, float]]) -> None:
        """Activate `names` at `weights` in every LoRA layer, in one pass.

        Per layer this is what diffusers' `set_adapters` does for plain float weights (peft's `set_scale`:
        weight · alpha / r, and `set_adapter`), without gradients; and where two or more of `names` adapt
        a layer they run as one concatenated adapter (same sum, fewer ops). Layers that cannot be combined
        keep peft's own per-adapter path. Records which layers hold which adapters, for `_rescale`.
        """
        self._layer_cache = []
        for comp in COMPONENTS:
            model = getattr(self.pipe, comp, None)
            if model is None:
                continue
            for layer, block in self._blocks(comp, model):
                if layer.disable_adapters:  # after `clear`
                    _set_enabled(layer, True)
                present = [a for a in names if a in layer.lora_A]
                for a in present:
                    layer.set_scale(a, self._scale(a, weights[a][comp], block))
                _channels(layer, present, lambda a: self._scale(a, weights[a][comp], block))
                combined = len(present) >= 2 and _combinable(layer, present)
                if combined:
                    _combine_layer(layer, present)
                else:
                    layer.set_adapter(list(names), inference_mode=True)
                if present:
                    self._layer_cache.append((layer, comp, present, combined, block))

    def _rescale(self, weights: dict[str, dict[str, float]]) -> None:
        """New weights for the adapters already active: what `set_adapters` would set, without walking the models."""
        for layer, comp, present, combined, block in self._layer_cache:
            for a in present:  # peft: scaling = weight · alpha / r (rsLoRA aware)
                layer.set_scale(a, self._scale(a, weights[a][comp], block))
            _channels(layer, present, lambda a: self._scale(a, weights[a][comp], block))
            if combined:
                _combine_layer(layer, present, activate=False)

    # ------------------------------------------------------------------------------ fuse
    def fuse(self) -> None:
        """Merge the current weighted stack into the base weights (fastest generation).

        The base weights are kept (on the CPU) so that `unfuse` restores them exactly.
        """
        with self.lock:
            if self._fused is not None or not self._stack:
                return
            active = [self._loaded[e.name].adapter for e in self._stack]
            self._snapshot = {}
            for comp in COMPONENTS:
                model = getattr(self.pipe, comp, None)
                if model is None:
                    continue
                for _, layer in _lora_layers(model):
                    if any(a in layer.lora_A for a in active):
                        base = layer.get_base_layer()
                        w = base.weight
                        self._snapshot[id(w)] = w.detach().to("cpu", copy=True)
                        state = channel_state(base)
                        if state is not None:  # DoRA: W·diag(u_in) + diag(u_out − 1)·W, then peft adds Σ sᵢ ΔWᵢ
                            with torch.no_grad():
                                w.copy_(scaled_weight(w, *state))
                            clear_channels(base)
            comps = [c for c in COMPONENTS if getattr(self.pipe, c, None) is not None
                     and any(True for _ in _lora_layers(getattr(self.pipe, c)))]
            self.pipe.fuse_lora(components=comps, lora_scale=1.0, adapter_names=active)
            self._fused = self._stack
            self._detach_wrappers()

    def _detach_wrappers(self) -> None:
        """While fused, put each (merged) base layer back in place of its LoRA wrapper: the model then runs
        exactly the base model's modules, with none of peft's per-layer forward overhead."""
        for comp in COMPONENTS:
            model = getattr(self.pipe, comp, None)
            if model is None:
                continue
            for name, layer in list(_lora_layers(model)):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, layer.get_base_layer())
                self._detached.append((parent, child, layer))

    def _attach_wrappers(self) -> None:
        for parent, child, layer in reversed(self._detached):
            setattr(parent, child, layer)
        self._detached = []

    @contextlib.contextmanager
    def _wrappers_attached(self):
        """The LoRA wrappers in place for reading their factors, even while fused."""
        detached = bool(self._detached)
        if detached:
            self._attach_wrappers()
        try:
            yield
        finally:
            if detached:
                self._detach_wrappers()

    def unfuse(self) -> None:
        """Undo `fuse`: the base weights come back bit for bit; the stack stays selected (unfused)."""
        with self.lock:
            if self._fused is None:
                return
            self._attach_wrappers()
            comps = [c for c in COMPONENTS if getattr(self.pipe, c, None) is not None
                     and any(True for _ in _lora_layers(getattr(self.pipe, c)))]
            self.pipe.unfuse_lora(components=comps)
            for comp in comps:
                for _, layer in _lora_layers(getattr(self.pipe, comp)):
                    w = layer.get_base_layer().weight
                    saved = self._snapshot.get(id(w))
                    if saved is not None:
                        with torch.no_grad():
                            w.copy_(saved.to(w.device))
            self._snapshot = {}
            self._fused = None
            if self._applied is None:  # the stack was reordered while fused
                self._apply(self._stack)
            else:  # DoRA channel scales were merged into the weights: set them on the layers again
                for layer, comp, present, _, block in self._layer_cache:
                    _channels(layer, present, lambda a: self._entry_scale(a, comp, block))

    # ------------------------------------------------------------------------------ bake
    def _factors(self, entries: Sequence[StackEntry]) -> dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, float]]]:
        """{our module key: {entry index: (A, B, scale incl. the entry's weight)}}, read from the loaded model."""
        out: dict[str, dict[int, tuple]] = {}
        with self._wrappers_attached():
            for comp in COMPONENTS:
                model = getattr(self.pipe, comp, None)
                if model is None:
                    continue
                for mname, layer in _lora_layers(model):
                    block = layer_block(comp, mname, self._prefixes_of())
                    for idx, e in enumerate(entries):
                        a = self._loaded[e.name].adapter
                        if a not in layer.lora_A:
                            continue
                        if layer.use_dora.get(a):
                            raise IncompatibleAdapterError(f"{e.name}: DoRA layers are not supported here")
                        w = (e.weight if comp == "unet" else e.text_weight) * e.ratio(block)
                        r = math.sqrt(layer.r[a]) if layer.use_rslora.get(a) else layer.r[a]
                        out.setdefault(f"{comp}.{mname}", {})[idx] = (
                            layer.lora_A[a].weight.detach(), layer.lora_B[a].weight.detach(),
                            w * layer.lora_alpha[a] / r)
        return out

    def bake(self, path: str | os.PathLike, metadata: dict[str, str] | None = None,
             entries: Iterable[StackEntry | tuple | str] | None = None) -> Path:
        """Write the weighted stack as ONE adapter file (our format) that reproduces it exactly.

        Per module, the factors are concatenated with the weights folded into B:
        ΔW = Σ sᵢ Bᵢ Aᵢ = [s₁B₁ … sₙBₙ] @ [A₁; …; Aₙ]; rank = Σ rᵢ and alpha = rank (scale 1).
        """
        with self.lock:
            ents = tuple(_coerce(entries)) if entries is not None else self._stack
            if not ents:
                raise ConfigError("lora: the stack is empty; nothing to bake")
            _no_step_ranges(ents)
            for e in ents:
                if self._key_of(e.name) is None:
                    self.load(e.name)
            ents = tuple(replace(e, name=self._key_of(e.name)) for e in ents)
            dora = next((e.name for e in ents if self.is_dora(e.name)), None)
            if dora is not None:
                raise ConfigError(f"lora: '{dora}' is a DoRA adapter: its magnitudes rescale the base weights, which "
                                  "one LoRA file cannot hold; bake the stack into a checkpoint instead")
            sd: dict[str, torch.Tensor] = {}
            alphas: dict[str, float] = {}
            for module, per_entry in self._factors(ents).items():
                parts = [p for _, p in sorted(per_entry.items()) if p[2] != 0.0]
                if not parts:
                    continue
                a = torch.cat([p[0].float() for p in parts], dim=0)  # (Σr, in[, k, k])
                b = torch.cat([p[1].float() * p[2] for p in parts], dim=1)  # (out, Σr[, 1, 1])
                sd[f"{module}.lora_A.weight"] = a
                sd[f"{module}.lora_B.weight"] = b
                alphas[_canon_module(module)] = float(a.shape[0])
            if not sd:
                raise ConfigError("lora: every weight in the stack is 0; nothing to bake")
            sd = canonical_peft_keys(sd)
            infos = [self._loaded[e.name].info for e in ents]
            ranks = sorted({int(v.shape[0]) for k, v in sd.items() if ".lora_A." in k})
            triggers = ", ".join(i.trigger_word for i in infos if i.trigger_word)
            meta = lora_metadata(
                family=self.model.family, rank=ranks[-1], alpha=ranks[-1], name=Path(path).stem,
                base_model=self.model.name, trigger_word=triggers,
                modules=sorted({m for i in infos for m in i.modules}),
                components=[c for c in COMPONENTS if any(k.startswith(c + ".") for k in sd)],
                comment="baked from " + " ".join(e.tag() for e in ents),
                extra={"lora_studio.baked_from": json.dumps(
                    [{"name": e.name, "weight": e.weight, "te_weight": e.text_weight, "hash": i.short_hash}
                     for e, i in zip(ents, infos)])},
            )
            meta.update(metadata or {})
            return save_kohya(sd, path, meta, family=self.model.family, alphas=alphas,
                              layout=unet_layout(self.model.pipe.unet), embeddings=self._bundled_of(ents))

    def _bundled_of(self, ents: Sequence[StackEntry]) -> dict[str, dict[str, torch.Tensor]]:
        """The bundled embeddings of a stack's adapters, for what is baked from it; two different ones of the same
        word are refused (either would change what the other adapter's word means)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        owner: dict[str, str] = {}
        for e in ents:
            for word, vec in self._loaded[e.name].vectors.items():
                key = next((w for w in out if w.casefold() == word.casefold()), None)
                if key is not None and not all(torch.equal(out[key][k], vec.get(k, torch.empty(0))) for k in out[key]):
                    raise ConfigError(f"lora: '{owner[key]}' and '{e.name}' both carry an embedding of the word "
                                      f"'{word}', different ones; bake them separately")
                out.setdefault(key or word, vec)
                owner.setdefault(key or word, e.name)
        return out

    def bake_checkpoint(self, path: str | os.PathLike, metadata: dict[str, str] | None = None,
                        entries: Iterable[StackEntry | tuple | str] | None = None) -> Path:
        """Write the base model with the weighted stack merged in as ONE single-file checkpoint.

        The bundled embeddings of its adapters (pivotal tuning's trigger words), which no checkpoint holds, are
        written beside it as `<word>.safetensors`, the files an embeddings folder takes (A1111, ComfyUI, this app).

        The file uses the original (LDM) names that AUTOMATIC1111 and ComfyUI load, and loads back
        with `load_base`. The stack is fused for the write and unfused after (unless it was fused
        already), so the live model computes exactly what it did before.
        """
        from .single_file import save_single_file

        with self.lock:
            before, was_fused = self._stack, self._fused is not None
            ents = tuple(_coerce(entries)) if entries is not None else before
            if not ents:
                raise ConfigError("lora: the stack is empty; nothing to bake (export the base model instead)")
            _no_step_ranges(ents)
            changed = entries is not None and set(ents) != set(before)
            try:
                if changed:
                    self.set_stack(ents)
                ents = self._stack
                if self._fused is None:
                    self.fuse()  # base_layer weights now hold W + Σ wᵢ ΔWᵢ (peft's own merge)
                infos = [self._loaded[e.name].info for e in ents]
                meta = {
                    "modelspec.description": "base model with LoRA baked in: " + " ".join(e.tag() for e in ents),
                    "lora_studio.base_model": self.model.name,
                    "lora_studio.baked_from": json.dumps(
                        [{"name": e.name, "weight": e.weight, "te_weight": e.text_weight, "hash": i.short_hash}
                         for e, i in zip(ents, infos)]),
                }
                triggers = ", ".join(i.trigger_word for i in infos if i.trigger_word)
                if triggers:
                    meta["modelspec.trigger_phrase"] = triggers
                meta.update(metadata or {})
                sds = {c: plain_state_dict(getattr(self.pipe, c)) for c in COMPONENTS
                       if getattr(self.pipe, c, None) is not None}
                words = self._bundled_of(ents)
                beside = [Path(path).with_name(f"{w}.safetensors") for w in words]
                if beside:  # a checkpoint holds no embedding: each goes beside it, as an embeddings-folder file
                    meta["lora_studio.embeddings_beside"] = ", ".join(b.name for b in beside)
                out = save_single_file(self.pipe, path, meta, state_dicts=sds)
                for (word, vec), dst in zip(words.items(), beside):
                    save_embedding({word: vec}, dst)
                return out
            finally:
                if changed:
                    self.set_stack(before)  # unfuses (a different stack), then the old selection
                    if was_fused and before:
                        self.fuse()
                elif not was_fused:
                    self.unfuse()

    # ------------------------------------------------------------------------------ interference
    def interference(self, names: Sequence[str] | None = None, *, threshold: float = 0.5,
                     share: float = 0.25) -> InterferenceReport:
        """Per-layer cosine similarity of the weighted ΔW = s·B@A of every pair of adapters.

        Default: the adapters of the current stack (with their weights), else all loaded ones at weight 1.
        A pair gets a warning when |cos| > `threshold` on at least `share` of the layers both adapt:
        mostly negative means they fight (cancel), mostly positive that they pile up on the same thing.
        """
        with self.lock:
            if names is None:
                ents = list(self._stack) if len(self._stack) >= 2 else [StackEntry(n) for n in self._loaded]
            else:
                by_name = {e.name.casefold(): e for e in self._stack}
                ents = []
                for n in names:
                    k = self._key_of(n)
                    if k is None:
                        self.load(n)
                        k = self._key_of(n)
                    ents.append(by_name.get(k.casefold(), StackEntry(k)))
            factors = self._factors(ents)
            report = InterferenceReport()
            for i in range(len(ents)):
                for j in range(i + 1, len(ents)):
                    layers: dict[str, float] = {}
                    for module, have in factors.items():
                        if i not in have or j not in have:
                            continue
                        (a1, b1, s1), (a2, b2, s2) = have[i], have[j]
                        a1, b1, a2, b2 = (t.double().flatten(1) for t in (a1, b1, a2, b2))
                        n1 = math.sqrt(max(_gram_inner(a1, b1, a1, b1), 0.0)) * abs(s1)
                        n2 = math.sqrt(max(_gram_inner(a2, b2, a2, b2), 0.0)) * abs(s2)
                        if n1 == 0.0 or n2 == 0.0:
                            continue
                        layers[module] = _gram_inner(a1, b1, a2, b2) * s1 * s2 / (n1 * n2)
                    report.pairs.append(PairInterference(ents[i].name, ents[j].name, layers, threshold, share))
            return report

    # ------------------------------------------------------------------------------ generate
    @contextlib.contextmanager
    def _step_schedule(self, entries: Sequence[StackEntry], steps: int):
        """A `step_hook` that gives each entry's UNet part its weight at the steps it acts in and 0 at the
        others (text encoders untouched: they run before the first step); None when no entry is scheduled.

        Steps where no entry acts run with the UNet's LoRA layers bypassed (the base model's own compute).
        Fused weights cannot switch per step, so a scheduled stack is unfused first. Afterwards every entry
        has its full weight again.
        """
        if not any(e.scheduled(steps) for e in entries):
            yield None
            return
        if self._fused is not None:
            self.unfuse()
        entries = [e.resolved(steps) for e in entries]  # shares of the steps made steps of this sampling
        adapters = [(self._loaded[e.name].adapter, e) for e in entries]
        unet_layers = [(layer, present, combined, block)
                       for layer, comp, present, combined, block in self._layer_cache if comp == "unet"]
        state: dict[str, tuple] = {}

        def set_active(active: tuple[bool, ...]) -> None:
            if state.get("active") == active:
                return
            state["active"] = active
            weights = {a: (e.weight if on else 0.0) for (a, e), on in zip(adapters, active)}
            for layer, present, combined, block in unet_layers:
                _set_enabled(layer, any(active))
                for a in present:
                    layer.set_scale(a, self._scale(a, weights[a], block))
                _channels(layer, present, lambda a: self._scale(a, weights[a], block))
                if combined:
                    _combine_layer(layer, present, activate=False)

        def hook(step: int) -> None:
            set_active(tuple(e.active_at(step) for _, e in adapters))

        try:
            yield hook
        finally:
            set_active(tuple(True for _ in adapters))

    def lora_hashes(self, entries: Sequence[StackEntry]) -> str:
        """A1111's `Lora hashes` value: 'name: hash12, ...' (':' and ',' dropped from names)."""
        return ", ".join(f"{e.name.replace(':', '').replace(',', '')}: {self._loaded[self._key_of(e.name)].info.short_hash}"
                         for e in entries)

    def generate(
        self,
        req: GenerationRequest,
        loras: Iterable[StackEntry | tuple | str] = (),
        on_progress: Callable[[int, int], None] | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> list[GeneratedImage]:
        """Generate with `loras` plus any `<lora:...>` tags in the prompt applied (and nothing else);
        `interrupt` as pipelines.generation.generate takes it.

        The recorded `parameters` keep the prompt's tags (tags for `loras` given outside the prompt are
        appended, so the image can be reproduced from its PNG) and add `Lora hashes`.
        """
        clean, tagged = parse_lora_tags(req.prompt)
        explicit = _coerce(loras)
        entries = _coerce(tagged + list(explicit))  # the order of the recorded prompt: sums are order-exact
        with self.lock:
            self.set_stack(entries)
            applied = self._stack
            extra = {"Lora hashes": self.lora_hashes(applied)} if applied else None
            run_req = replace(req, prompt=clean)
            with self._step_schedule(applied, req.steps) as hook:
                images = _generate(self.model, run_req, on_progress=on_progress, extra_parameters=extra,
                                   step_hook=hook, interrupt=interrupt)
        recorded = " ".join([req.prompt] + [e.tag() for e in explicit]).strip() if explicit else req.prompt
        rec_req = replace(req, prompt=recorded)
        for img in images:
            w, h = img.size or img.image.size  # the first pass's size (a Hires fix enlarges the picture)
            img.parameters = format_parameters(rec_req, img.seed, w, h, self.model, extra, subseed=img.subseed)
            img.image.info["parameters"] = img.parameters
        return images


__all__ = [
    "AdapterStack", "StackEntry", "InterferenceReport", "plain_state_dict", "PairInterference", "parse_lora_tags", "parse_lora_arg",
    "parse_lora_hashes", "WEIGHT_MIN", "WEIGHT_MAX", "clip_skip_warnings",
]
