"""DoRA (weight-decomposed LoRA) files, applied the way AUTOMATIC1111 and ComfyUI apply them.

A DoRA module stores a LoRA pair (ΔW = scale · up @ down) and a magnitude vector m. The adapted weight is the
LoRA-updated weight with its columns (or rows) rescaled to the lengths m:

    per input channel (A1111, ComfyUI, LyCORIS before 3.2: `dora_scale` of shape (1, in[, 1, 1])):
        W_dora = (W + ΔW) · diag(c),  c = m / ‖W + ΔW‖ per column
    per output channel (LyCORIS ≥ 3.2's `wd_on_output`, (out, 1[, 1, 1]); peft's `lora_magnitude_vector`, (out,)):
        W_dora = diag(c) · (W + ΔW),  c = m / ‖W + ΔW‖ per row

and a weight s (the LoRA weight of the prompt tag) blends linearly, W + s · (W_dora − W), as A1111
(`apply_weight_decompose`, then × multiplier) and ComfyUI (`weight_decompose`, strength ≠ 1) both do.

Both forms split exactly into a plain LoRA pair and a per-channel scale of the base layer:

    W_dora − W = W · diag(c − 1) + ΔW · diag(c)       (input side:  A' = A · diag(c))
    W_dora − W = diag(c − 1) · W + diag(c) · ΔW       (output side: B' = diag(c) · B)

so a DoRA file loads as a LoRA with one factor rescaled (everything that handles LoRA — stacking, weights,
block weights, step ranges, fusing — handles it), plus `ChannelScale` terms the stack applies to the base
layer's input or output: u = 1 + Σ sᵢ (cᵢ − 1). c depends on the base weights, so this needs the base model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .errors import IncompatibleAdapterError

# the key endings of a magnitude vector: kohya / LyCORIS, and peft / diffusers (with or without `.weight`)
MAGNITUDE_SUFFIXES = (".dora_scale", ".lora_magnitude_vector.weight", ".lora_magnitude_vector")
# the key endings of a LoRA module's down / up factor in each naming
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", "_lora.down.weight")


def magnitude_module(key: str) -> str | None:
    """The module a magnitude key belongs to ('lora_unet_x.dora_scale' -> 'lora_unet_x'); None for other keys."""
    for suffix in MAGNITUDE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def has_dora(keys) -> bool:
    return any(magnitude_module(k) is not None for k in keys)


def take_magnitudes(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the file without its magnitude vectors, {module: magnitude})."""
    rest, mags = {}, {}
    for k, v in sd.items():
        module = magnitude_module(k)
        if module is None:
            rest[k] = v
        else:
            mags[module] = v
    return rest, mags


@dataclass(frozen=True)
class ChannelScale:
    """What a DoRA module adds besides its (rescaled) LoRA pair, at weight 1: W · diag(delta) ('in') or
    diag(delta) · W ('out'), with delta = c − 1 per channel."""

    side: str  # 'in' | 'out'
    delta: torch.Tensor  # (in,) or (out,), float32


def _source_module(down_key: str) -> str:
    for suffix in _DOWN_SUFFIXES:
        if down_key.endswith(suffix):
            return down_key[: -len(suffix)]
    return down_key.rsplit(".", 2)[0]


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The length of each input channel's column of a Linear / Conv2d weight (over outputs and the kernel), (in,):
    what a per-input DoRA magnitude measures."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def stored_per_input(magnitude: torch.Tensor) -> bool:
    """A stored magnitude in A1111's / ComfyUI's per-input form, (1, in[, 1, 1]), from its shape alone."""
    return magnitude.ndim >= 2 and magnitude.shape[0] == 1


def side_of(magnitude: torch.Tensor, out_features: int, in_features: int) -> str:
    """'in' or 'out': which channels a stored magnitude measures, from its shape (as ComfyUI tells them apart)."""
    shape = tuple(magnitude.shape)
    n = magnitude.numel()
    if stored_per_input(magnitude) and shape[1] == in_features and n == in_features:
        return "in"
    if shape and shape[0] == out_features and n == out_features:
        return "out"
    raise ValueError(f"its DoRA magnitude has shape {shape}, which fits neither the layer's {in_features} input "
                     f"channels (1, {in_features}, …) nor its {out_features} output channels ({out_features}, …)")


def fold(
    sd: Mapping[str, torch.Tensor],
    magnitudes: Mapping[str, torch.Tensor],
    layers: Mapping[str, object],
    base_modules: Mapping[str, torch.nn.Module],
) -> tuple[dict[str, torch.Tensor], dict[str, ChannelScale]]:
    """Fold each module's magnitude into its LoRA pair against the base weights.

    `layers`: {our module name: pipelines.adapters.LoraLayer} of the file without its magnitudes (`a_key`,
    `b_key` in the file's own naming, `scale`); `base_modules`: {our module name (text_model. stripped):
    the base Linear / Conv2d}. Returns the LoRA tensors with one factor rescaled per DoRA module, and
    {our module name (stripped): ChannelScale}. Modules the base does not have are left as they are (the
    loader drops them with the rest of a partly matching file).
    """
    from .adapters import _strip_text_model

    by_source = {_source_module(layer.a_key): (module, layer) for module, layer in layers.items()}
    out = dict(sd)
    terms: dict[str, ChannelScale] = {}
    for src, m in magnitudes.items():
        if src not in by_source:
            raise IncompatibleAdapterError(f"module '{src}' has a DoRA magnitude but no LoRA factors")
        module, layer = by_source[src]
        key = _strip_text_model(module)
        base = base_modules.get(key)
        if base is None:
            continue
        w = base.weight.detach().float()  # (out, in[, kh, kw])
        down, up = sd[layer.a_key].float(), sd[layer.b_key].float()  # (r, in[, k, k]), (out, r[, 1, 1])
        out_f, in_f = w.shape[0], w.shape[1]
        try:
            side = side_of(m, out_f, in_f)
            delta_w = (up.reshape(out_f, -1) @ down.reshape(down.shape[0], -1)).reshape(w.shape) * layer.scale
        except (ValueError, RuntimeError) as e:
            raise IncompatibleAdapterError(f"module '{src}': {e}") from None
        merged = w + delta_w
        mag = m.detach().float().reshape(-1)
        if side == "in":  # the norm of each input channel's column (over outputs and the kernel)
            c = mag / column_norms(merged)  # (in,)
            out[layer.a_key] = (down.reshape(down.shape[0], in_f, -1) * c.view(1, -1, 1)).reshape(down.shape)
        else:
            norm = merged.reshape(out_f, -1).norm(dim=1)  # (out,)
            c = mag / norm
            out[layer.b_key] = up * c.view(-1, *[1] * (up.ndim - 1))
        if not bool(torch.isfinite(c).all()):
            raise IncompatibleAdapterError(f"module '{src}': a column of the DoRA-updated weight has length 0")
        terms[key] = ChannelScale(side, (c - 1.0).contiguous())
    return out, terms


def scaled_weight(weight: torch.Tensor, u_in: torch.Tensor | None, u_out: torch.Tensor | None) -> torch.Tensor:
    """W · diag(u_in) + diag(u_out − 1) · W: the base weight with the channel scales merged in (for fusing)."""
    w = weight.float()
    new = w
    if u_in is not None:
        new = new * u_in.view(1, -1, *[1] * (w.ndim - 2))
    if u_out is not None:
        new = new + w * (u_out - 1.0).view(-1, *[1] * (w.ndim - 1))
    return new.to(weight.dtype)


def _scaled_forward(module, original, x, *args, **kwargs):
    """The base layer with its channel scales: W(x ⊙ u_in) + b, plus (u_out − 1) ⊙ W x."""
    state = module.__dict__.get("_lora_studio_channels")
    if state is None:
        return original(x, *args, **kwargs)
    u_in, u_out = state
    conv = isinstance(module, torch.nn.Conv2d)
    y = original(x * (u_in.view(1, -1, 1, 1) if conv else u_in).to(x.dtype), *args, **kwargs) \
        if u_in is not None else original(x, *args, **kwargs)
    if u_out is not None:
        plain = original(x, *args, **kwargs) if u_in is not None else y
        if module.bias is not None:
            plain = plain - (module.bias.view(1, -1, 1, 1) if conv else module.bias)
        y = y + plain * ((u_out - 1.0).view(1, -1, 1, 1) if conv else (u_out - 1.0)).to(y.dtype)
    return y


def set_channels(module: torch.nn.Module, u_in: torch.Tensor | None, u_out: torch.Tensor | None) -> None:
    """Make the base layer compute with these channel scales (None, None: as it is)."""
    if u_in is None and u_out is None:
        clear_channels(module)
        return
    if "_lora_studio_plain_forward" not in module.__dict__:
        original = module.forward
        module._lora_studio_plain_forward = original

        def forward(x, *args, **kwargs):
            return _scaled_forward(module, original, x, *args, **kwargs)

        module.forward = forward
    dev = module.weight.device
    module._lora_studio_channels = (None if u_in is None else u_in.to(dev),
                                    None if u_out is None else u_out.to(dev))


def clear_channels(module: torch.nn.Module) -> None:
    """Undo `set_channels`: the module's own forward again."""
    if "_lora_studio_plain_forward" in module.__dict__:
        del module.__dict__["forward"]
        del module.__dict__["_lora_studio_plain_forward"]
    module.__dict__.pop("_lora_studio_channels", None)


def channel_state(module: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    return module.__dict__.get("_lora_studio_channels")


def combine(terms: list[tuple[ChannelScale, float]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """u_in, u_out = 1 + Σ sᵢ (cᵢ − 1) per side, for the (term, weight) pairs of one layer (None: no term)."""
    u = {"in": None, "out": None}
    for term, weight in terms:
        if weight == 0.0:
            continue
        add = term.delta * weight
        u[term.side] = add + 1.0 if u[term.side] is None else u[term.side] + add
    return u["in"], u["out"]
