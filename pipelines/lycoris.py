"""LyCORIS adapters (LoHa, LoKr, LoCon's CP-decomposed convolutions), read as exact LoRA factors.

civitai carries many LyCORIS files; AUTOMATIC1111 and ComfyUI apply them natively. Every LyCORIS module
here is a weight difference ΔW (per module, times alpha/dim) with a low-rank structure that a plain LoRA
pair B @ A can hold *exactly*:

- LoHa: ΔW = (U₁D₁) ⊙ (U₂D₂), the element-wise product of two rank-r products. Row by row,
  (U₁D₁)[o, j]·(U₂D₂)[o, j] = Σ_{a,b} (U₁[o,a]U₂[o,b]) (D₁[a,j]D₂[b,j]), so B = the row-wise Kronecker
  product of U₁ and U₂ (out × r₁r₂) and A = the column-wise Kronecker product of D₁ and D₂ (r₁r₂ × in).
- LoKr: ΔW = W₁ ⊗ W₂ with W₁ = U₁D₁ and W₂ = U₂D₂ (either may be a full matrix, which is its own
  factor times an identity), and (U₁D₁) ⊗ (U₂D₂) = (U₁ ⊗ U₂)(D₁ ⊗ D₂).
- Tucker / CP forms (`hada_t1`, `lokr_t2`, `lora_mid`): the core is contracted into the down factor,
  which keeps the rank.

A rank above min(out, in) (a LoHa of dim 32 on a 320-wide layer) is stored as the dense ΔW against an
identity instead, so no module ever costs more than twice its dense difference.

The result has kohya's key layout (`<module>.lora_down.weight`, `.lora_up.weight`, `.alpha` with
alpha/rank = the module's scale), so everything that reads a LoRA (loading, weights, stacks, fusing,
baking, the kohya export) reads these files too. The source file itself is never rewritten: its hash
stays the one AUTOMATIC1111 records.

A convolution that LyCORIS stores flattened (a down factor of shape (r, in·k·k), without Tucker)
needs the base layer's kernel size to be folded back; `kernels` gives it (see `conv_kernels`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .errors import IncompatibleAdapterError

# key suffix -> algorithm, for the LyCORIS types that cannot be written as a LoRA (or that are not read here)
_UNSUPPORTED = {
    "on_input": "(IA)³", "weight": "(IA)³",  # ia3: `<module>.weight` + `.on_input`
    "diff": "full (weight difference)", "diff_b": "full (weight difference)",
    "w_norm": "norm", "b_norm": "norm",
    "oft_blocks": "OFT", "oft_diag": "OFT", "oft_R": "BOFT",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "dora_scale": "DoRA",
}
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOHA_ALL = set(_LOHA) | {"hada_t1", "hada_t2", "alpha"}
_LOKR_ALL = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}
_LORA_ALL = {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"}
# the parameter names (after `<module>.`) that make a file LyCORIS ((IA)³'s `weight` is every LoRA key's end too)
_PARAMS = (_LOHA_ALL | _LOKR_ALL | {"lora_mid.weight"} | set(_UNSUPPORTED)) - {"alpha", "weight"}


@dataclass
class Converted:
    """A LyCORIS file read as LoRA: the kohya-layout tensors and what they were."""

    state_dict: dict[str, torch.Tensor]
    algorithms: Counter = field(default_factory=Counter)  # 'LoHa' / 'LoKr' / 'LoCon (CP)' / 'LoRA' -> modules
    dims: Counter = field(default_factory=Counter)  # the file's own dim per module (before conversion)
    alphas: Counter = field(default_factory=Counter)
    flattened: list[str] = field(default_factory=list)  # convolutions left as (R, in·k·k): no kernel size known
    # DoRA: {module (the file's naming): magnitude vector}, applied with the base weights (dora.fold)
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    dora_modules: int = 0  # how many modules have a magnitude (kept when the tensors are dropped)
    lycoris_keys: bool = True  # LyCORIS' own key names (a peft-named DoRA file is not)

    @property
    def label(self) -> str:
        """'LoHa', 'LoKr', 'LoHa + LoRA', 'DoRA', 'LoHa (DoRA)' …: the LyCORIS algorithms first, most modules first."""
        lyco = [a for a, _ in self.algorithms.most_common() if a != "LoRA"]
        text = " + ".join(lyco + (["LoRA"] if "LoRA" in self.algorithms else []))
        if self.dora_modules:
            text = "DoRA" if text == "LoRA" else f"{text} (DoRA)"
        return text

    def network(self) -> str:
        """'LoHa dim 8, alpha 4': the numbers the file's own tool shows (its most common dim and alpha)."""
        dim = self.dims.most_common(1)[0][0] if self.dims else 0
        alpha = self.alphas.most_common(1)[0][0] if self.alphas else None
        if not dim:  # a LoKr of two full matrices has no dim, and its alpha is not used
            return f"{self.label} (full factors)"
        return f"{self.label} dim {dim}" + (f", alpha {alpha:g}" if alpha is not None else "")


def is_lycoris(keys) -> bool:
    """A file with LyCORIS modules (LoHa, LoKr, CP LoCon, or a type read nowhere here), in kohya's naming
    (`lora_unet_….hada_w1_a`) or another (`unet.….hada_w1_a`, which to_lora refuses by name)."""
    return any(k.partition(".")[2] in _PARAMS or k.rsplit(".", 1)[-1] in _PARAMS for k in keys)


def _modules(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        module, _, param = key.partition(".")
        out.setdefault(module, {})[param] = value
    return out


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def _alpha(params: Mapping[str, torch.Tensor]) -> float | None:
    a = params.get("alpha")
    if a is None or not a.numel():
        return None
    v = float(a.float().reshape(-1)[0])
    return v if math.isfinite(v) else None


def _cp(core: torch.Tensor, up_t: torch.Tensor, down_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Tucker pair W[o, i, k, l] = Σ up_t[a, o] core[a, b, k, l] down_t[b, i] as (U (out, r), D (r, in·k·l))."""
    d = torch.einsum("abkl,bi->aikl", _f(core), _f(down_t))  # (r, in, k, l)
    return _f(up_t).t().contiguous(), d.reshape(d.shape[0], -1)


def _pair(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A low-rank pair (U (out, r), D (r, n)) with a 4-D factor flattened."""
    return _f(up).reshape(up.shape[0], -1), _f(down).reshape(down.shape[0], -1)


def _full(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full matrix (out, n[, k, l]) as the pair of smaller rank: (W, I) or (I, W)."""
    w = _f(w).reshape(w.shape[0], -1)
    out, n = w.shape
    return (torch.eye(out), w) if out <= n else (w, torch.eye(n))


def _loha(p: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    if "hada_t1" in p:
        u1, d1 = _cp(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
        u2, d2 = _cp(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    else:
        u1, d1 = _pair(p["hada_w1_a"], p["hada_w1_b"])
        u2, d2 = _pair(p["hada_w2_a"], p["hada_w2_b"])
    if u1.shape[0] != u2.shape[0] or d1.shape[1] != d2.shape[1] or u1.shape[1] != d1.shape[0] \
            or u2.shape[1] != d2.shape[0]:
        raise ValueError(f"LoHa factor shapes {[tuple(p[k].shape) for k in _LOHA]} do not chain")
    up = (u1[:, :, None] * u2[:, None, :]).reshape(u1.shape[0], -1)  # (out, r1·r2)
    down = (d1[:, None, :] * d2[None, :, :]).reshape(-1, d1.shape[1])  # (r1·r2, n)
    return up, down, int(p["hada_w1_b"].shape[0])


def _lokr(p: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    dim = None
    if "lokr_w1" in p:
        u1, d1 = _full(p["lokr_w1"])
    else:
        u1, d1 = _pair(p["lokr_w1_a"], p["lokr_w1_b"])
        dim = int(p["lokr_w1_b"].shape[0])
    if "lokr_w2" in p:
        u2, d2 = _full(p["lokr_w2"])
    elif "lokr_t2" in p:
        u2, d2 = _cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        dim = int(p["lokr_w2_b"].shape[0])
    else:
        u2, d2 = _pair(p["lokr_w2_a"], p["lokr_w2_b"])
        dim = int(p["lokr_w2_b"].shape[0])
    if u1.shape[1] != d1.shape[0] or u2.shape[1] != d2.shape[0]:
        raise ValueError("LoKr factor shapes " + str({k: tuple(v.shape) for k, v in p.items() if k != "alpha"})
                         + " do not chain")
    # (out, r1·r2), (r1·r2, n)
    return torch.kron(u1.contiguous(), u2.contiguous()), torch.kron(d1.contiguous(), d2.contiguous()), dim


def _cp_locon(p: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """LoCon with a CP middle: ΔW[o, i, k, l] = Σ up[o, a] mid[a, b, k, l] down[b, i]."""
    up = _f(p["lora_up.weight"]).reshape(p["lora_up.weight"].shape[0], -1)  # (out, r)
    down = torch.einsum("abkl,bi->aikl", _f(p["lora_mid.weight"]),
                        _f(p["lora_down.weight"]).reshape(p["lora_down.weight"].shape[0], -1))
    return up, down.reshape(down.shape[0], -1), int(p["lora_down.weight"].shape[0])


def _kind(module: str, params: Mapping[str, torch.Tensor]) -> str:
    names = set(params)
    for k in sorted(names):
        if k == "dora_scale":  # kohya's and LyCORIS' DoRA: a magnitude vector no LoRA pair can hold
            raise IncompatibleAdapterError(f"module '{module}' has DoRA weights (dora_scale), which this app does "
                                           "not apply (LoRA, LoCon, LoHa and LoKr are read)")
        if k in _UNSUPPORTED:
            raise IncompatibleAdapterError(
                f"module '{module}' is a LyCORIS {_UNSUPPORTED[k]} layer, which this app does not apply "
                "(LoRA, LoCon, LoHa and LoKr are read)")
    if names & {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}:
        kind, allowed = "LoHa", _LOHA_ALL
        missing = set(_LOHA) - names
        if ("hada_t1" in names) != ("hada_t2" in names):
            missing |= {"hada_t1", "hada_t2"} - names
    elif names & _LOKR_ALL - {"alpha"}:
        kind, allowed = "LoKr", _LOKR_ALL
        missing = set()
        if "lokr_w1" not in names and not {"lokr_w1_a", "lokr_w1_b"} <= names:
            missing |= {"lokr_w1"}
        if "lokr_w2" not in names and not {"lokr_w2_a", "lokr_w2_b"} <= names:
            missing |= {"lokr_w2"}
    elif "lora_mid.weight" in names:
        kind, allowed = "LoCon (CP)", _LORA_ALL
        missing = {"lora_down.weight", "lora_up.weight"} - names
    else:
        return "LoRA"
    if missing:
        raise IncompatibleAdapterError(f"module '{module}': its {kind} factors lack {', '.join(sorted(missing))}")
    extra = names - allowed
    if extra:
        raise IncompatibleAdapterError(f"module '{module}': unknown {kind} keys {', '.join(sorted(extra))}")
    return kind


def _cap(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """At most rank min(out, n): above it the dense ΔW against an identity is smaller and just as exact."""
    out, n = up.shape[0], down.shape[1]
    if up.shape[1] <= min(out, n):
        return up, down
    dense = up @ down  # (out, n)
    return (torch.eye(out), dense) if out <= n else (dense, torch.eye(n))


def to_lora(sd: Mapping[str, torch.Tensor],
            kernels: Mapping[str, tuple[int, int, int]] | Callable[[str], tuple[int, int, int] | None] | None = None,
            ) -> Converted:
    """Every module of a kohya-named file as a LoRA pair (LoRA modules are kept as they are).

    `kernels`: {module: (in_channels, kh, kw)} of the base's convolutions (or a lookup), to fold a flattened
    down factor (R, in·kh·kw) back into (R, in, kh, kw); modules it does not know are listed in `flattened`.
    Raises IncompatibleAdapterError naming the module for a type that cannot be written as a LoRA.
    """
    look = kernels if callable(kernels) else (lambda m: (kernels or {}).get(m))
    from .adapters import KOHYA_PREFIXES

    odd = next((k for k in sd if not k.startswith(KOHYA_PREFIXES)), None)
    if odd is not None:
        raise IncompatibleAdapterError(f"'{odd}': LyCORIS layers are read in kohya's naming (lora_unet_…, "
                                       "lora_te_…), as LyCORIS and kohya_ss write them; this file uses another")
    res = Converted({})
    for module, params in _modules(sd).items():
        kind = _kind(module, params)
        res.algorithms[kind] += 1
        if kind == "LoRA":
            res.state_dict.update({f"{module}.{k}": v for k, v in params.items()})
            if "lora_down.weight" in params:
                res.dims[int(params["lora_down.weight"].shape[0])] += 1
            if (a := _alpha(params)) is not None:
                res.alphas[a] += 1
            continue
        try:
            if kind == "LoHa":
                up, down, dim = _loha(params)
            elif kind == "LoKr":
                up, down, dim = _lokr(params)
            else:
                up, down, dim = _cp_locon(params)
        except (ValueError, RuntimeError) as e:
            raise IncompatibleAdapterError(f"module '{module}': {e}") from None
        alpha = _alpha(params)
        # AUTOMATIC1111 / ComfyUI: scale = alpha / dim where the module has a dim (a low-rank factor) and an
        # alpha; 1 otherwise (LoKr of two full matrices, or no alpha stored)
        scale = alpha / dim if (alpha is not None and dim) else 1.0
        res.dims[dim or 0] += 1
        if alpha is not None:
            res.alphas[alpha] += 1
        up, down = as_dtype(*_cap(up, down), _source_dtype(params))
        rank = up.shape[1]
        kernel = _kernel_shape(params, kind)
        if kernel is None and kernels is not None:
            known = look(module)  # the base's convolution (a linear layer is not in the map)
            if known is not None and known[0] * known[1] * known[2] == down.shape[1]:
                kernel = known
        elif kernel is None and _maybe_conv(module):
            res.flattened.append(module)
        if kernel is not None:
            down = down.reshape(rank, *kernel)  # (R, in, kh, kw)
            up = up.reshape(*up.shape, 1, 1)  # (out, R, 1, 1)
        res.state_dict[f"{module}.lora_down.weight"] = down.contiguous()
        res.state_dict[f"{module}.lora_up.weight"] = up.contiguous()
        res.state_dict[f"{module}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return res


def balance(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product with each rank component's up column and down row of equal norm: a LoHa's up factor is
    the product of two small factors (~1e-3 each, trained) and would fall below fp16's normal range while its
    down factor stays near 1."""
    nu = up.norm(dim=0)  # (R,)
    nd = down.norm(dim=1)  # (R,)
    c = torch.where((nu > 0) & (nd > 0), (nd / nu.clamp_min(1e-30)).sqrt(), torch.ones_like(nu))
    return up * c, down / c[:, None]


def as_dtype(up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors in `dtype` (fp16/bf16: half the memory of fp32, and the model casts them to its own
    dtype anyway); fp32 where a value would not fit or would sink below the half type's normal range."""
    up, down = balance(up.float(), down.float())
    if dtype in (torch.float16, torch.bfloat16):
        low = up.to(dtype), down.to(dtype)
        # each factor as exact as the half type rounds (bf16: 2^-8, fp16: 2^-11 per value): overflow or values
        # sunk below the normal range show up as a larger error than that, measured over the whole factor
        limit = 4.0 * float(torch.finfo(dtype).eps)
        if all(bool(torch.isfinite(h).all()) and float((h.float() - t).norm()) <= limit * float(t.norm())
               for h, t in zip(low, (up, down))):
            return low
    return up, down


def _source_dtype(params: Mapping[str, torch.Tensor]) -> torch.dtype:
    return next((v.dtype for k, v in params.items() if k != "alpha" and v.is_floating_point()), torch.float32)


def _kernel_shape(params: Mapping[str, torch.Tensor], kind: str) -> tuple[int, int, int] | None:
    """(in, kh, kw) when the file itself says the layer is a convolution (a 4-D factor or core)."""
    if kind == "LoHa" and "hada_t1" in params:
        t, d = params["hada_t1"], params["hada_w1_b"]
        return int(d.shape[1]), int(t.shape[2]), int(t.shape[3])
    if kind == "LoKr":
        w1 = params.get("lokr_w1")
        c = int(w1.shape[1]) if w1 is not None else int(params["lokr_w1_b"].shape[1])
        if "lokr_t2" in params:
            t = params["lokr_t2"]
            return c * int(params["lokr_w2_b"].shape[1]), int(t.shape[2]), int(t.shape[3])
        w2 = params.get("lokr_w2")
        if w2 is not None and w2.ndim == 4:
            return c * int(w2.shape[1]), int(w2.shape[2]), int(w2.shape[3])
        return None
    if kind == "LoCon (CP)":
        m, d = params["lora_mid.weight"], params["lora_down.weight"]
        return int(d.shape[1]), int(m.shape[2]), int(m.shape[3])
    for k in ("hada_w1_b", "lora_down.weight"):
        if k in params and params[k].ndim == 4:
            v = params[k]
            return int(v.shape[1]), int(v.shape[2]), int(v.shape[3])
    return None


def _maybe_conv(module: str) -> bool:
    """A UNet module that is a convolution in SD's UNets (ResNet, down/upsampler, conv_in/out, LDM in/out layers):
    without the base, its down factor may be (R, in·k·k) with k unknown."""
    if not module.startswith("lora_unet_") or module.endswith(("time_emb_proj", "emb_layers_1")):
        return False
    return any(s in module for s in ("resnets_", "samplers_", "conv_in", "conv_out", "in_layers", "out_layers",
                                     "skip_connection", "_op", "_conv", "proj_in", "proj_out"))  # SD 1.x: 1x1 convs


def conv_kernels(pipe, modules, unet_layers_per_block: int | None = None) -> dict[str, tuple[int, int, int]]:
    """{kohya module: (in_channels, kh, kw)} of the base's Conv2d layers among `modules` (kohya names)."""
    from .adapters import FORMAT_KOHYA, _strip_text_model, base_modules, peft_key_map

    keys = [f"{m}.lora_down.weight" for m in modules] + [f"{m}.lora_up.weight" for m in modules]
    try:
        kmap = peft_key_map(keys, FORMAT_KOHYA, unet_layers_per_block)
    except IncompatibleAdapterError:
        return {}
    mods = base_modules(pipe)
    out = {}
    for src, dst in kmap.items():
        if not src.endswith(".lora_down.weight"):
            continue
        target = mods.get(_strip_text_model(dst.rsplit(".lora_", 1)[0]))
        if isinstance(target, torch.nn.Conv2d):
            out[src.split(".")[0]] = (target.in_channels, *target.kernel_size)
    return out
