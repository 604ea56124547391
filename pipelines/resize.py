"""Smaller adapters by SVD: resize a LoRA to a lower rank, or extract one from a fine-tuned checkpoint.

Both write each layer's weight difference ΔW as its best approximation of a given rank (Eckart–Young: the
leading singular vectors), so a rank that keeps, say, 99% of ‖ΔW‖² in each layer loses what matters least.
This is what kohya_ss' "Resize LoRA" and "Extract LoRA" utilities do; the maths is textbook, the code is ours.

- `resize_adapter`: a 128-rank file from civitai (150 MB on SDXL) often holds its effect in rank 16-32.
  The SVD of ΔW = s·B @ A is taken through QR factors of B and Aᵀ (r × r), never the dense ΔW.
- `extract_lora`: ΔW = W_tuned − W_base for the layers a LoRA adapts (transformer blocks of the UNet,
  optionally its 3×3 convolutions; the text encoders when they changed), as LoRA factors.

Files come out in kohya's key layout, with alpha = rank (scale 1) and the singular values split evenly
between the two factors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .adapters import (
    COMPONENTS,
    OURS,
    TEXT_ENCODERS,
    _canon_module,
    _short_module,
    base_modules,
    export_adapter,
    lora_metadata,
    save_kohya,
)
from .errors import ConfigError, IncompatibleAdapterError
from .lycoris import as_dtype

if TYPE_CHECKING:
    from .base_models import BaseModel

# kohya's extract_lora_from_models default: a text encoder whose weights moved less than this everywhere is
# taken as unchanged (fine-tunes often leave it alone; its rounding noise is no LoRA)
TEXT_MIN_DIFF = 0.01
NUMERICAL_ZERO = 1e-5  # singular values under this share of the largest carry no change, only float rounding
_DROPPED_ON_CHANGE = ("sshs_model_hash", "sshs_legacy_hash", "ss_network_dim", "ss_network_alpha", "ss_network_args")


@dataclass
class LayerFit:
    module: str
    rank_before: int
    rank: int
    kept: float  # share of the layer's ‖ΔW‖² the new factors hold (1.0 = exact)


@dataclass
class FitReport:
    """What a resize or an extraction kept, layer by layer."""

    layers: list[LayerFit] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # layers left out (no change, or a text encoder unchanged)
    path: Path | None = None

    @property
    def ranks(self) -> tuple[int, int]:
        r = [f.rank for f in self.layers] or [0]
        return min(r), max(r)

    @property
    def worst(self) -> float:
        return min((f.kept for f in self.layers), default=1.0)

    @property
    def mean(self) -> float:
        return sum(f.kept for f in self.layers) / len(self.layers) if self.layers else 1.0

    def summary(self) -> str:
        lo, hi = self.ranks
        ranks = f"rank {hi}" if lo == hi else f"ranks {lo}-{hi}"
        worst = min(self.layers, key=lambda f: f.kept) if self.layers else None
        text = (f"{len(self.layers)} layers at {ranks}; each keeps at least {100 * self.worst:.1f}% of its ‖ΔW‖² "
                f"(mean {100 * self.mean:.1f}%")
        return text + (f"; least: {worst.module})" if worst and worst.kept < 0.9995 else ")")


def check_rank_keep(rank: int | None, keep: float | None) -> None:
    """A resize's or extraction's rank and share to keep, checked before any work (errors name the field)."""
    if rank is None and keep is None:
        raise ConfigError("rank: give a rank, a share to keep (keep), or both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank: must be a whole number of 1 or more, got {rank!r}")
    if keep is not None and (not isinstance(keep, (int, float)) or not 0 < keep <= 1):
        raise ConfigError(f"keep: must be a share of ‖ΔW‖² above 0 and at most 1 (e.g. 0.99), got {keep!r}")


def choose_rank(s: torch.Tensor, rank: int | None, keep: float | None) -> int:
    """The rank to keep from singular values `s` (descending): at most `rank`, and the fewest that hold `keep`
    of Σσ² (the squared Frobenius norm) when that is given. Directions below 1e-5 of the largest are rounding
    noise (a rank-2 change asked for at rank 8 stays rank 2)."""
    n = int(s.numel())
    if n:
        n = max(1, int((s > s[0] * NUMERICAL_ZERO).sum()))
    k = n if rank is None else min(rank, n)
    if keep is not None and n:
        energy = torch.cumsum(s.double() ** 2, 0)
        total = float(energy[-1])
        if total > 0:
            need = int(torch.searchsorted(energy, torch.tensor(keep * total, dtype=torch.float64) * (1 - 1e-12)))
            k = min(k, need + 1)
    return max(1, k)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B (out, k), A (k, n), share of Σσ² kept) with √σ in each factor."""
    root = s[:k].clamp_min(0).sqrt()
    total = float((s.double() ** 2).sum())
    kept = float((s[:k].double() ** 2).sum()) / total if total > 0 else 1.0
    return (u[:, :k] * root).contiguous(), (root[:, None] * vh[:k]).contiguous(), kept


def svd_of_pair(b: torch.Tensor, a: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ΔW = scale·B @ A (B (out, r), A (r, n)) through QR: U (out, m), S (m,), Vh (m, n), m ≤ r."""
    qb, rb = torch.linalg.qr(b.double())  # (out, m1), (m1, r)
    qa, ra = torch.linalg.qr(a.double().t())  # (n, m2), (m2, r)
    u, s, vh = torch.linalg.svd(scale * rb @ ra.t(), full_matrices=False)  # (m1, m), (m,), (m, m2)
    return (qb @ u).float(), s.float(), (vh @ qa.t()).float()


def _flat(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return b.reshape(b.shape[0], -1).float(), a.reshape(a.shape[0], -1).float()


def _shaped(b2: torch.Tensor, a2: torch.Tensor, like_a: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors back in their layer's shape: a convolution's A (k, in, kh, kw) and B (out, k, 1, 1)."""
    if len(like_a) == 4:
        return b2.reshape(*b2.shape, 1, 1), a2.reshape(a2.shape[0], *like_a[1:])
    return b2, a2


def resize_factors(sd: dict[str, torch.Tensor], alphas: dict[str, float], rank: int | None, keep: float | None,
                   report: FitReport) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Each layer of a peft state dict at the chosen rank (alpha = rank); fits go into `report`."""
    check_rank_keep(rank, keep)
    out: dict[str, torch.Tensor] = {}
    new_alphas: dict[str, float] = {}
    for key in sorted(k for k in sd if k.endswith(".lora_A.weight")):
        module = key[: -len(".lora_A.weight")]
        a, b = sd[key], sd[f"{module}.lora_B.weight"]
        r = int(a.shape[0])
        alpha = float(alphas.get(_canon_module(module), r))
        b2, a2 = _flat(a, b)
        u, s, vh = svd_of_pair(b2, a2, alpha / r)
        if not float(s.abs().max() if s.numel() else 0):
            report.skipped.append(module)  # ΔW = 0: nothing to keep
            continue
        k = choose_rank(s, rank, keep)
        nb, na, kept = _split(u, s, vh, k)
        nb, na = as_dtype(nb, na, a.dtype)  # an fp16 file stays fp16 (else "smaller" could be larger)
        nb, na = _shaped(nb, na, a.shape)
        out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = na, nb
        new_alphas[_canon_module(module)] = float(k)
        report.layers.append(LayerFit(module, r, k, kept))
    if not out:
        raise IncompatibleAdapterError("every layer of the adapter is zero; nothing to resize")
    return out, new_alphas


def _note_change(meta: dict[str, str], report: FitReport, what: str) -> None:
    for k in _DROPPED_ON_CHANGE:
        meta.pop(k, None)
    hi = report.ranks[1]
    meta[f"{OURS}rank"] = str(hi)
    meta[f"{OURS}alpha"] = str(hi)
    meta[f"{OURS}{what}"] = report.summary()


def resize_adapter(src: str | os.PathLike, dst: str | os.PathLike, *, rank: int | None = None,
                   keep: float | None = None, base: "BaseModel | None" = None, precision: str | None = None,
                   name: str | None = None, origin: str | None = None) -> FitReport:
    """Write adapter `src` at a lower rank to `dst` (kohya layout): at most `rank` per layer, and with `keep`
    the fewest that hold that share of each layer's ‖ΔW‖². `base` is needed only where an export needs it
    (an SDXL file without its layout, a LyCORIS file with flattened convolutions). `origin` names the source in
    the metadata (default: its file name)."""
    check_rank_keep(rank, keep)
    report = FitReport()

    def transform(sd, alphas, meta):
        sd, alphas = resize_factors(sd, alphas, rank, keep, report)
        before = sorted({f.rank_before for f in report.layers})
        _note_change(meta, report, "resized")
        meta[f"{OURS}resized_from"] = f"rank {before[-1]} ({origin or Path(src).name})"
        if name:
            for k in (f"{OURS}name", "ss_output_name", "modelspec.title"):
                meta[k] = name
        return sd, alphas

    report.path = export_adapter(src, dst, "kohya", base=base, precision=precision, transform=transform)
    return report


def resized_name(stem: str, rank: int | None, keep: float | None) -> str:
    """The library name a resized copy gets unless the user names it: NAME-rR, or NAME-keepS."""
    return f"{stem}-" + (f"r{rank}" if rank else f"keep{keep:g}")


def bake_resized(stack, dst: str | os.PathLike, entries, *, rank: int | None = None, keep: float | None = None,
                 name: str | None = None) -> FitReport:
    """A weighted stack baked (`AdapterStack.bake`: exact, the ranks add up) and written to `dst` at `rank` / `keep`
    (its best approximation). The full bake stays in a temporary folder beside `dst`; `dst` is written once,
    finished."""
    import tempfile

    check_rank_keep(rank, keep)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bake-", dir=dst.parent) as tmp:
        full = stack.bake(Path(tmp) / "full.safetensors", entries=entries)
        return resize_adapter(full, dst, rank=rank, keep=keep, name=name or dst.stem, origin="the baked stack")


# ------------------------------------------------------------------------------------------ extraction
def _extract_targets(comp: str, name: str, mod: torch.nn.Module, conv_rank: int | None) -> bool:
    """The layers kohya's LoRA networks adapt: the UNet's transformer blocks (Linear and 1×1 projections); with
    `conv_rank` also every layer of its ResNet blocks and down/upsamplers (kohya's LoCon: the 3×3 convolutions
    at the conv rank, their 1×1 shortcuts and time projections at the rank); every projection of the text
    encoders' layers."""
    if comp == "unet":
        if conv_rank and (".resnets." in name or "samplers." in name):
            return True
        return ".attentions." in name or "transformer_blocks" in name
    return isinstance(mod, torch.nn.Linear) and ".layers." in name


def extract_lora(base: "BaseModel", tuned: "BaseModel", *, rank: int | None = None, keep: float | None = None,
                 conv_rank: int | None = None, text_min_diff: float = TEXT_MIN_DIFF,
                 on_layer: Callable[[int, int], None] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, float], FitReport]:
    """LoRA factors (peft keys) of ΔW = W_tuned − W_base per adapted layer; `conv_rank` adds the ResNet blocks
    (3×3 convolutions at that rank). Both models must have the same architecture; a layer whose shape differs is
    named. Give models without adapters fused in (an AdapterStack's fuse leaves no trace on the layers; peft's
    own merge is refused)."""
    check_rank_keep(rank, keep)
    if conv_rank is not None and conv_rank < 1:
        raise ConfigError(f"conv_rank: must be 1 or more, got {conv_rank}")
    report = FitReport()
    for model in (base, tuned):
        if any(getattr(m, "merged", False) for c in COMPONENTS if getattr(model.pipe, c, None) is not None
               for m in getattr(model.pipe, c).modules()):
            raise IncompatibleAdapterError(f"{model.name}: adapters are fused into it; unfuse them first")
    mods_b, mods_t = base_modules(base.pipe), base_modules(tuned.pipe)  # the layers themselves, not LoRA wrappers
    layers = []
    for comp in COMPONENTS:
        has_b, has_t = getattr(base.pipe, comp, None) is not None, getattr(tuned.pipe, comp, None) is not None
        if not has_b and not has_t:
            continue
        if has_b != has_t:
            raise IncompatibleAdapterError(f"{comp}: only one of the two models has it; they are not the same "
                                           "architecture")
        group = []
        for module, mod in mods_b.items():
            comp_of, _, name = module.partition(".")
            if comp_of != comp or not _extract_targets(comp, name, mod, conv_rank):
                continue
            other = mods_t.get(module)
            if other is None or other.weight.shape != mod.weight.shape:
                raise IncompatibleAdapterError(
                    f"{module}: {tuple(mod.weight.shape)} in the base, "
                    f"{tuple(other.weight.shape) if other is not None else 'missing'} in the tuned model; they are "
                    "not the same architecture")
            group.append((module, mod, other))
        if comp in TEXT_ENCODERS and group:
            moved = max(float((o.weight.detach().float() - m.weight.detach().float()).abs().max())
                        for _, m, o in group)
            if moved < text_min_diff:
                report.skipped.append(f"{comp} (its weights moved at most {moved:.2g}, under {text_min_diff:g})")
                continue
        layers += group
    sd: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for i, (module, mb, mt) in enumerate(layers):
        if on_layer is not None:
            on_layer(i, len(layers))
        delta = (mt.weight.detach().to("cpu", torch.float32) - mb.weight.detach().to("cpu", torch.float32))
        if not bool(delta.any()):
            report.skipped.append(module)
            continue
        u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
        is_conv = delta.ndim == 4 and tuple(delta.shape[2:]) != (1, 1)
        k = choose_rank(s, conv_rank if is_conv else rank, None if is_conv else keep)
        b, a, kept = _split(u, s, vh, k)
        b, a = _shaped(b, a, delta.shape)
        key = _canon_module(module)
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = a, b
        alphas[key] = float(k)
        report.layers.append(LayerFit(key, min(delta.shape[0], math.prod(delta.shape[1:])), k, kept))
    if not sd:
        raise IncompatibleAdapterError("the two models have the same weights in every layer a LoRA adapts; "
                                       "there is nothing to extract")
    return sd, alphas, report


def extract_adapter(base: "BaseModel", tuned: "BaseModel", dst: str | os.PathLike, *, rank: int | None = None,
                    keep: float | None = None, conv_rank: int | None = None, name: str | None = None,
                    text_min_diff: float = TEXT_MIN_DIFF, precision: str | None = None,
                    on_layer: Callable[[int, int], None] | None = None) -> FitReport:
    """`extract_lora` written as a kohya-layout adapter file for the base's family (loads in AUTOMATIC1111,
    ComfyUI and here)."""
    from .single_file import unet_layout
    from .weights_io import cast_weights

    sd, alphas, report = extract_lora(base, tuned, rank=rank, keep=keep, conv_rank=conv_rank,
                                      text_min_diff=text_min_diff, on_layer=on_layer)
    if precision is not None:
        sd, bad = cast_weights(sd, precision)
        if bad is not None:
            raise ConfigError(f"precision: '{bad}' does not fit in {precision}; use bf16 or fp32")
    dst = Path(dst)
    hi = report.ranks[1]
    meta = lora_metadata(
        family=base.family, rank=hi, alpha=hi, name=name or dst.stem, base_model=base.name,
        modules=sorted({_short_module(m) for m in alphas}),
        components=[c for c in COMPONENTS if any(k.startswith(c + ".") for k in sd)],
        comment=f"extracted from {tuned.name} against {base.name}",
        extra={f"{OURS}extracted": report.summary(), f"{OURS}extracted_from": tuned.name},
    )
    report.path = save_kohya(sd, dst, meta, family=base.family, alphas=alphas, layout=unet_layout(base.pipe.unet))
    return report
