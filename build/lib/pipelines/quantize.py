"""Quantize a base model's frozen weights in place, for QLoRA-style training on a smaller base.

    quantize_frozen(pipe, "nf4")   # bitsandbytes 4-bit NormalFloat: needs a CUDA GPU (as QLoRA)
    quantize_frozen(pipe, "int8")  # torchao int8 weight-only: any device, also the CPU

Only `nn.Linear` layers are quantized (attention projections, feed-forward, time embedding), as
bitsandbytes and torchao do; convolutions and norms stay in their dtype. peft then attaches LoRA
layers on top of the quantized ones (its bnb and torchao LoRA layers), so the adapter itself trains
in full precision and loads on the unquantized base like any other.
"""

from __future__ import annotations

import logging
import warnings

import torch

from .errors import ConfigError

QUANTIZATIONS = ("nf4", "int8")


def check_available(kind: str, device: torch.device | str) -> None:
    """Raise ConfigError (naming the field) when `kind` cannot run on `device` here."""
    device = torch.device(device)
    if kind not in QUANTIZATIONS:
        raise ConfigError(f"quantize_base: must be one of {', '.join(QUANTIZATIONS)}, got '{kind}'")
    if kind == "nf4":
        if device.type != "cuda":
            raise ConfigError(
                "quantize_base: 'nf4' (bitsandbytes 4-bit) needs a CUDA GPU; on this device use 'int8' "
                "(torchao int8 weight-only), which runs on the CPU too"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("quantize_base: 'nf4' needs bitsandbytes: pip install bitsandbytes") from None
    else:
        try:
            _import_torchao()
        except ImportError:
            raise ConfigError("quantize_base: 'int8' needs torchao: pip install torchao") from None


def _import_torchao():
    # torchao announces each optional CUDA kernel it cannot load on this machine: not our user's concern
    logging.getLogger("torchao").setLevel(logging.ERROR)
    import torchao.quantization as q

    return q


def quantize_frozen(pipe, kind: str, components: tuple[str, ...] = ("unet",)) -> dict[str, int]:
    """Quantize the Linear layers of the named pipeline components in place.

    Returns {component: number of Linear layers quantized}. Call before attaching LoRA.
    """
    device = pipe.unet.device
    check_available(kind, device)
    done: dict[str, int] = {}
    for name in components:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        module.requires_grad_(False)
        done[name] = _nf4(module, device) if kind == "nf4" else _int8(module)
    return done


def _int8(module: torch.nn.Module) -> int:
    q = _import_torchao()
    n = sum(isinstance(m, torch.nn.Linear) for m in module.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.quantize_(module, q.Int8WeightOnlyConfig())
    return n


def _nf4(module: torch.nn.Module, device: torch.device) -> int:
    """Swap every nn.Linear for a bitsandbytes Linear4bit (NF4); weights quantize on the move to CUDA."""
    import bitsandbytes as bnb

    count = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or isinstance(child, bnb.nn.Linear4bit):
                continue
            dtype = child.weight.dtype if child.weight.dtype != torch.float32 else torch.bfloat16
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=dtype, quant_type="nf4", device="cpu")
            new.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, new.to(device))
            count += 1
    return count


def quantized_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes the Linear weights take now, bytes they would take in float32)."""
    now = full = 0
    for m in module.modules():
        w = getattr(m, "weight", None)
        if w is None or not isinstance(m, torch.nn.Linear):  # bitsandbytes' Linear4bit is an nn.Linear too
            continue
        if type(w).__name__ == "Params4bit":
            now += w.numel() * w.element_size()  # packed uint8, two weights a byte
            full += (m.in_features * m.out_features) * 4
            continue
        data = getattr(w, "qdata", None)
        if data is not None:  # torchao Int8Tensor: int8 data + per-row scales
            now += data.numel() * data.element_size() + getattr(w, "scale").numel() * getattr(w, "scale").element_size()
        else:
            now += w.numel() * w.element_size()
        full += w.numel() * 4
    return now, full
