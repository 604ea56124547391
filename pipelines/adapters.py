"""LoRA adapter files: our format, kohya/AUTOMATIC1111 and older diffusers formats, metadata, validation.

Our format is diffusers/peft's: `unet.<module>.lora_A.weight` / `.lora_B.weight`,
`text_encoder.text_model.<module>.lora_A.weight` (SDXL: also `text_encoder_2.`), in a .safetensors
file whose metadata carries diffusers' `lora_adapter_metadata` (so `pipe.load_lora_weights` honours
alpha != rank) and the kohya `ss_*` / `modelspec.*` keys other tools show.

Every format is *loaded* by diffusers itself (see `stack.py`); this module only reads headers and
shapes to say what a file is and whether it fits a base model before anything is loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import torch

from .errors import ConfigError, CorruptWeightsError, IncompatibleAdapterError, ModelLoadError
from .dora import fold, has_dora, stored_per_input, take_magnitudes
from .embeddings import BUNDLE_PREFIX, bundle_keys, split_bundled, vector_count
from .lycoris import Converted, conv_kernels, is_lycoris, to_lora
from .weights_io import (
    PICKLE_SUFFIXES,
    PRECISIONS,
    SAFETENSORS_SUFFIX,
    addnet_hash,
    cast_weights,
    load_safetensors,
    read_header,
    refuse_pickle,
    save_safetensors,
)

if TYPE_CHECKING:  # pragma: no cover
    from .base_models import BaseModel

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
FAMILY_LABELS = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
OURS = "lora_studio."
# the end-of-training check's suggested step range, as "START/STEPS" (e.g. "10/20": from step 10 of 20)
SUGGESTED_START_KEY = OURS + "suggested_start"

FORMAT_PEFT = "peft"  # ours / diffusers >= 0.21: <component>.<module>.lora_A.weight
FORMAT_KOHYA = "kohya"  # kohya sd-scripts / A1111 / ComfyUI: lora_unet_<module>.lora_down.weight (+ .alpha)
FORMAT_DIFFUSERS_OLD = "diffusers_old"  # attention processors: unet.<...>.processor.to_q_lora.down.weight
FORMAT_DIFFUSERS = "diffusers"  # diffusers' intermediate: <module>.lora.down.weight / lora_linear_layer
FORMAT_LYCORIS = "lycoris"  # LoHa / LoKr / CP LoCon: read as exact LoRA factors (lycoris.py); (IA)^3 etc. refused
FORMAT_UNKNOWN = "unknown"
FORMAT_EMBEDDING = "embedding"  # an export: only the file's bundled embedding, as an embeddings-folder file
SUPPORTED_FORMATS = (FORMAT_PEFT, FORMAT_KOHYA, FORMAT_DIFFUSERS_OLD, FORMAT_DIFFUSERS)

# kohya `ss_base_model_version` and modelspec architecture per family (kohya sd-scripts' values)
SS_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
MODELSPEC_IMPL_DIFFUSERS = "diffusers"
MODELSPEC_IMPL_SGM = "https://github.com/Stability-AI/generative-models"
# cross-attention width (to_k input) of the real base models
CROSS_ATTN_DIM_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TEXT_WIDTH_FAMILY = {1024: "sd2"}  # CLIP-L (768) is in both SD 1.x and SDXL (text_encoder)

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_PREVIEW_SUFFIXES = (".png", ".preview.png", ".jpg", ".jpeg", ".webp")


# --------------------------------------------------------------------------------------------------
# metadata


def lora_metadata(
    *,
    family: str,
    rank: int,
    alpha: float,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    name: str = "",
    base_model: str = "",
    base_hash: str = "",
    model_file_hash: str | None = None,
    trigger_word: str = "",
    modules: Sequence[str] = (),
    components: Sequence[str] = (),
    steps: int | None = None,
    resolution: int | tuple[int, int] | None = None,
    num_images: int | None = None,
    training_config: Mapping | str | None = None,
    comment: str = "",
    description: str = "",
    author: str = "",
    date: str | None = None,
    prediction_type: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The metadata LoRA Studio embeds in an adapter file: our `lora_studio.*` keys, kohya's `ss_*`
    keys and SAI `modelspec.*` keys, so kohya_ss, AUTOMATIC1111 and ComfyUI show what the file is.

    All values are strings (safetensors metadata is str -> str).
    """
    if family not in FAMILY_LABELS and not family:
        raise ValueError("family: required (sd1, sd2 or sdxl)")
    if int(rank) <= 0:
        raise ValueError(f"rank: must be positive, got {rank}")
    res = (resolution, resolution) if isinstance(resolution, int) else resolution
    cfg_json = training_config if isinstance(training_config, str) or training_config is None else json.dumps(
        dict(training_config), sort_keys=True, default=str)
    date = date or time.strftime("%Y-%m-%dT%H:%M:%S")
    meta: dict[str, str] = {
        f"{OURS}version": "1",
        f"{OURS}name": name,
        f"{OURS}base_model": base_model,
        f"{OURS}base_family": family,
        f"{OURS}base_hash": base_hash,
        f"{OURS}trigger": trigger_word,
        f"{OURS}rank": str(int(rank)),
        f"{OURS}alpha": f"{float(alpha):g}",
        f"{OURS}modules": ",".join(modules),
        f"{OURS}components": ",".join(components),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": f"{float(alpha):g}",
        "ss_base_model_version": SS_BASE_MODEL_VERSION.get(family, family),
        "ss_v2": str(family == "sd2"),
        "ss_sd_model_name": base_model,
        "ss_output_name": name,
        "ss_training_comment": comment or (f"trained with LoRA Studio; trigger: {trigger_word}" if trigger_word
                                           else "trained with LoRA Studio"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCH.get(family, family)}/lora",
        "modelspec.implementation": MODELSPEC_IMPL_DIFFUSERS,
        "modelspec.title": name,
        "modelspec.date": date,
    }
    if model_file_hash:  # kohya's key: the SHA-256 of the base checkpoint file (our base_hash is a fingerprint)
        meta["ss_new_sd_model_hash"] = model_file_hash
    if any(m.rsplit(".", 1)[-1].startswith("conv") for m in modules):
        # kohya's networks.lora names LoRA on 3x3 ResNet convolutions (LoCon) with these network args
        cr, ca = conv_rank or rank, conv_alpha if conv_alpha is not None else alpha
        meta["ss_network_args"] = json.dumps({"conv_dim": str(int(cr)), "conv_alpha": f"{float(ca):g}"})
    if trigger_word:
        meta["modelspec.trigger_phrase"] = trigger_word
    if description:
        meta["modelspec.description"] = description
    if author:
        meta["modelspec.author"] = author
    if prediction_type:
        meta["modelspec.prediction_type"] = prediction_type
    if steps is not None:
        meta[f"{OURS}steps"] = str(int(steps))
        meta["ss_max_train_steps"] = str(int(steps))
    if res is not None:
        meta[f"{OURS}resolution"] = str(res[0]) if res[0] == res[1] else f"{res[0]}x{res[1]}"
        meta["ss_resolution"] = f"({res[0]}, {res[1]})"
        meta["modelspec.resolution"] = f"{res[0]}x{res[1]}"
    if num_images is not None:
        meta[f"{OURS}num_images"] = str(int(num_images))
        meta["ss_num_train_images"] = str(int(num_images))
    if cfg_json is not None:
        meta[f"{OURS}train_config"] = cfg_json
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return meta


def _split_module(key: str) -> tuple[str, str]:
    """'unet.a.b.lora_A.weight' -> ('unet.a.b', 'A')."""
    for tag, role in ((".lora_A.", "A"), (".lora_B.", "B")):
        if tag in key:
            return key.split(tag)[0], role
    raise ValueError(key)


def _strip_text_model(module: str) -> str:
    """Compare text-encoder module paths with or without transformers 4's `text_model.` level."""
    comp, _, rest = module.partition(".")
    if comp in TEXT_ENCODERS and rest.startswith("text_model."):
        return f"{comp}.{rest[len('text_model.'):]}"
    return module


def canonical_peft_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our file layout: text-encoder keys carry `text_model.` (as diffusers writes them with transformers 4,
    and as kohya names them), whichever transformers version produced the state dict."""
    out = {}
    for k, v in state_dict.items():
        comp, _, rest = k.partition(".")
        if comp in TEXT_ENCODERS and not rest.startswith("text_model."):
            k = f"{comp}.text_model.{rest}"
        out[k] = v
    return out


def diffusers_adapter_config(
    state_dict: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float] | None = None
) -> dict[str, object]:
    """The dict diffusers stores under `lora_adapter_metadata`: peft `LoraConfig` kwargs per component,
    prefixed (`unet.r`, `unet.lora_alpha`, `unet.target_modules`, `unet.rank_pattern`, ...).

    `alpha` is one value for every module, or {module: alpha} with modules named as in the state dict
    without the `.lora_A.weight` tail (e.g. `unet.down_blocks.0...attn1.to_q`); default: alpha = rank.
    """
    ranks: dict[str, dict[str, int]] = {}
    for k, v in state_dict.items():
        if ".lora_A." in k and k.endswith(".weight"):
            module, _ = _split_module(k)
            comp, _, path = module.partition(".")
            ranks.setdefault(comp, {})[path] = int(v.shape[0])
    amap = {_strip_text_model(k): float(v) for k, v in alpha.items()} if isinstance(alpha, Mapping) else None
    packed: dict[str, object] = {}
    for comp, per_module in ranks.items():
        # target paths without `text_model.` match both transformers 4 and 5 layouts (peft matches suffixes)
        norm = {(_strip_text_model(f"{comp}.{p}").partition(".")[2]): (p, r) for p, r in per_module.items()}
        r = Counter(r for _, r in norm.values()).most_common(1)[0][0]
        alphas: dict[str, float] = {}
        for target, (p, rk) in norm.items():
            if alpha is None:
                alphas[target] = float(rk)
            elif amap is not None:
                alphas[target] = amap.get(_strip_text_model(f"{comp}.{p}"), float(rk))
            else:
                alphas[target] = float(alpha)
        a0 = Counter(alphas.values()).most_common(1)[0][0]
        packed[f"{comp}.r"] = r
        packed[f"{comp}.lora_alpha"] = a0
        packed[f"{comp}.target_modules"] = sorted(norm)
        packed[f"{comp}.rank_pattern"] = {t: rk for t, (_, rk) in sorted(norm.items()) if rk != r}
        packed[f"{comp}.alpha_pattern"] = {t: a for t, a in sorted(alphas.items()) if a != a0}
        packed[f"{comp}.init_lora_weights"] = True
        packed[f"{comp}.lora_dropout"] = 0.0
        packed[f"{comp}.use_dora"] = False
        packed[f"{comp}.use_rslora"] = False
    return packed


def save_adapter(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    alpha: float | Mapping[str, float] | None = None,
) -> Path:
    """Write an adapter in our (peft) format, atomically, with diffusers' rank/alpha metadata.

    `alpha` defaults to the metadata's `lora_studio.alpha` / `ss_network_alpha`, else alpha = rank.
    A `lora_adapter_metadata` already in `metadata` is kept as given (the training code writes its own).
    """
    fmt = detect_format(state_dict)
    if fmt != FORMAT_PEFT:
        raise IncompatibleAdapterError(f"{path}: save_adapter writes peft-format keys; got a '{fmt}' state dict")
    meta = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
    if alpha is None:
        a = meta.get(f"{OURS}alpha") or meta.get("ss_network_alpha")
        alpha = float(a) if a not in (None, "", "None") else None
    sd = canonical_peft_keys(state_dict)
    if DIFFUSERS_METADATA_KEY not in meta:
        meta[DIFFUSERS_METADATA_KEY] = json.dumps(diffusers_adapter_config(sd, alpha), sort_keys=True)
    meta.setdefault("format", "pt")
    return save_safetensors(sd, path, meta)


# --------------------------------------------------------------------------------------------------
# format detection and key mapping


def detect_format(keys: Iterable[str] | Mapping[str, object]) -> str:
    """'peft' | 'kohya' | 'diffusers_old' | 'diffusers' | 'lycoris' | 'unknown', from key names alone."""
    ks = [k for k in keys if k != "__metadata__"]
    if not ks:
        return FORMAT_UNKNOWN
    if is_lycoris(ks):
        return FORMAT_LYCORIS
    if all(k.startswith(KOHYA_PREFIXES) for k in ks):
        return FORMAT_KOHYA if any(".lora_down." in k for k in ks) else FORMAT_UNKNOWN
    if any(".lora_A." in k for k in ks):
        return FORMAT_PEFT if all(k.split(".")[0] in COMPONENTS for k in ks) else FORMAT_UNKNOWN
    if any(re.search(r"_lora\.(down|up)\.", k) for k in ks):
        return FORMAT_DIFFUSERS_OLD
    if any((".lora.down." in k or ".lora_linear_layer.down." in k) for k in ks):
        return FORMAT_DIFFUSERS if all(k.split(".")[0] in COMPONENTS for k in ks) else FORMAT_UNKNOWN
    return FORMAT_UNKNOWN


def _unet_config_stub(layers_per_block: int | None):
    return SimpleNamespace(layers_per_block=int(layers_per_block or 2))


def _convert_component_to_peft(comp: str, sd: dict[str, object]) -> dict[str, object]:
    """diffusers' own per-component conversion, as its loaders apply it (see `text_encoder_to_peft`)."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if not sd:
        return {}
    if all(".lora_A." in k or ".lora_B." in k for k in sd):
        return sd
    if comp == "unet":
        return convert_unet_state_dict_to_peft(sd)
    return text_encoder_to_peft(sd)


def text_encoder_to_peft(sd: dict[str, object]) -> dict[str, object]:
    """Text-encoder LoRA keys in diffusers' older namings -> peft keys.

    diffusers recognises its old `to_q_lora.down` naming only when an `out_proj` (`to_out_lora`) key is
    present, so a kohya file adapting e.g. only q/k/v of the text encoder fails to load there; naming the
    source type explicitly avoids that.
    """
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
    )

    if all(".lora_A." in k or ".lora_B." in k for k in sd):
        return sd
    if any("_lora.down." in k or "_lora.up." in k for k in sd):
        return convert_state_dict_to_peft(sd, original_type=StateDictType.DIFFUSERS_OLD)
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))


def peft_key_map(keys: Sequence[str], fmt: str | None = None, unet_layers_per_block: int | None = None) -> dict[str, str]:
    """{source key: our peft key} for the LoRA down/up keys of any supported format.

    Uses diffusers' own conversions (kohya names, SDXL input/middle/output_blocks, old processor keys), so a
    key maps to the module diffusers would load it into. Works from key names alone (no tensor data).
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    fmt = fmt or detect_format(keys)
    lora_keys = [k for k in keys if not k.endswith(".alpha")]
    if fmt == FORMAT_PEFT:
        return {k: k for k in lora_keys}
    if fmt not in SUPPORTED_FORMATS:
        raise IncompatibleAdapterError(f"unsupported adapter format '{fmt}'")
    # placeholders: conversions move values without copying, so object identity traces every key
    marks = {k: torch.empty(0) for k in lora_keys}
    back = {id(v): k for k, v in marks.items()}
    sd: dict[str, object] = dict(marks)
    try:
        if fmt == FORMAT_KOHYA:
            sd.update({k: torch.tensor(1.0) for k in keys if k.endswith(".alpha")})
            sd, _ = StableDiffusionLoraLoaderMixin.lora_state_dict(
                sd, unet_config=_unet_config_stub(unet_layers_per_block))
        out: dict[str, object] = {}
        for comp in COMPONENTS:
            part = {k[len(comp) + 1:]: v for k, v in sd.items() if k.split(".")[0] == comp}
            out.update({f"{comp}.{k}": v for k, v in _convert_component_to_peft(comp, part).items()})
    except (ValueError, KeyError) as e:
        raise IncompatibleAdapterError(f"could not map the adapter's keys to model modules ({e})") from None
    return {back[id(v)]: k for k, v in out.items() if id(v) in back}


@dataclass
class LoraLayer:
    """One adapted module: where its factors are in the file, their shapes, and its alpha."""

    module: str  # our naming: component + module path, e.g. 'unet.down_blocks.0...attn1.to_q'
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    alpha: float
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.a_shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def component(self) -> str:
        return self.module.split(".")[0]

    @property
    def in_features(self) -> int:
        return int(self.a_shape[1])

    @property
    def out_features(self) -> int:
        return int(self.b_shape[0])


def _pattern_value(patterns: Mapping[str, object], path: str):
    """peft's rank/alpha pattern lookup (a suffix match on dotted module paths)."""
    candidates = {path, path.removeprefix("text_model.")}
    for key, val in patterns.items():
        k = key[1:] if key.startswith("^") else key
        if any(re.match(rf"(.*\.)?({k})$", p) for p in candidates):
            return val
    return None


def _peft_alphas(meta: Mapping[str, str], modules: Iterable[tuple[str, int]]) -> dict[str, tuple[float, bool]]:
    """Alpha (and rsLoRA flag) per module from diffusers' `lora_adapter_metadata`; alpha = rank without it."""
    raw = meta.get(DIFFUSERS_METADATA_KEY)
    cfg: dict = {}
    if raw:
        try:
            cfg = json.loads(raw)
        except json.JSONDecodeError:
            raise CorruptWeightsError(f"'{DIFFUSERS_METADATA_KEY}' metadata is not valid JSON") from None
    out = {}
    for module, rank in modules:
        comp, _, path = module.partition(".")
        if f"{comp}.lora_alpha" not in cfg:
            out[module] = (float(rank), False)
            continue
        pat = _pattern_value(cfg.get(f"{comp}.alpha_pattern") or {}, path)
        alpha = float(pat if pat is not None else cfg[f"{comp}.lora_alpha"])
        out[module] = (alpha, bool(cfg.get(f"{comp}.use_rslora", False)))
    return out


def parse_layers(
    shapes: Mapping[str, tuple[int, ...]],
    metadata: Mapping[str, str] | None = None,
    alpha_values: Mapping[str, float] | None = None,
    *,
    fmt: str | None = None,
    unet_layers_per_block: int | None = None,
) -> dict[str, LoraLayer]:
    """The adapted modules of a file from its key shapes (and kohya `.alpha` values)."""
    fmt = fmt or detect_format(shapes)
    if fmt == FORMAT_LYCORIS:  # callers convert these first (as_lora)
        raise IncompatibleAdapterError("LyCORIS modules must be read as LoRA first (as_lora)")
    if fmt not in SUPPORTED_FORMATS:
        raise IncompatibleAdapterError("not a LoRA adapter (no lora_A/lora_B or lora_down/lora_up keys)")
    if has_dora(shapes):  # callers take the magnitudes out first (as_lora(dora=True)) and fold them in
        raise IncompatibleAdapterError("DoRA magnitudes must be taken out first (as_lora)")
    kmap = peft_key_map(list(shapes), fmt, unet_layers_per_block)
    pairs: dict[str, dict[str, str]] = {}
    for src, dst in kmap.items():
        if not dst.endswith(".weight"):
            continue  # lora_B bias: rare; loaded by diffusers, not needed to describe the file
        module, role = _split_module(dst)
        pairs.setdefault(module, {})[role] = src
    layers: dict[str, LoraLayer] = {}
    for module, roles in pairs.items():
        if set(roles) != {"A", "B"}:
            raise CorruptWeightsError(f"module '{module}' has a lora_{'A' if 'A' in roles else 'B'} "
                                      "factor without its pair")
        a, b = roles["A"], roles["B"]
        if len(shapes[a]) < 2 or len(shapes[b]) < 2 or shapes[a][0] != shapes[b][1]:
            raise CorruptWeightsError(f"module '{module}': factor shapes {list(shapes[a])} and {list(shapes[b])} "
                                      "do not chain")
        layers[module] = LoraLayer(module, a, b, tuple(shapes[a]), tuple(shapes[b]), float(shapes[a][0]))
    if fmt == FORMAT_PEFT:
        for module, (alpha, rs) in _peft_alphas(metadata or {}, [(m, l.rank) for m, l in layers.items()]).items():
            layers[module].alpha, layers[module].rslora = alpha, rs
    elif fmt == FORMAT_KOHYA:
        for layer in layers.values():
            a = (alpha_values or {}).get(layer.a_key.split(".")[0] + ".alpha")
            if a is not None:
                layer.alpha = float(a)
    return layers


def family_from_metadata(meta: Mapping[str, str]) -> str | None:
    """Base family an adapter was made for, from our key, kohya's or modelspec's."""
    fam = (meta.get(f"{OURS}base_family") or "").strip().lower()
    if fam:
        return fam
    ver = (meta.get("ss_base_model_version") or "").strip().lower()
    if ver:
        if ver.startswith("sdxl"):
            return "sdxl"
        if ver.startswith("sd_v2") or ver.startswith("sd_2"):
            return "sd2"
        if ver.startswith("sd_v1") or ver.startswith("sd_1"):
            return "sd1"
        return ver  # sd3, flux1, ...: surely not one of ours
    arch = (meta.get("modelspec.architecture") or "").strip().lower()
    if arch:
        if arch.startswith("stable-diffusion-xl"):
            return "sdxl" if "refiner" not in arch else arch.split("/")[0]
        if arch.startswith("stable-diffusion-v2"):
            return "sd2"
        if arch.startswith("stable-diffusion-v1"):
            return "sd1"
        return arch.split("/")[0]
    if (meta.get("ss_v2") or "").lower() == "true":
        return "sd2"
    return None


def family_from_layers(layers: Mapping[str, LoraLayer]) -> str | None:
    """Family of the real base models from tensor shapes: SDXL if it adapts a second text encoder, else the
    cross-attention width (to_k input: 768 SD 1.x, 1024 SD 2.x, 2048 SDXL). None when it says nothing."""
    if any(m.startswith("text_encoder_2.") for m in layers):
        return "sdxl"
    for m, layer in layers.items():
        if m.startswith("unet.") and m.endswith("attn2.to_k"):
            return CROSS_ATTN_DIM_FAMILY.get(layer.in_features)
    for m, layer in layers.items():
        if m.startswith("text_encoder.") and m.endswith("q_proj"):
            return TEXT_WIDTH_FAMILY.get(layer.in_features)
    return None


# --------------------------------------------------------------------------------------------------
# matching against a loaded base


@dataclass
class MatchReport:
    """How an adapter's modules line up with a base model's modules."""

    matched: int
    total: int
    per_component: dict[str, tuple[int, int]]  # component -> (matched, total)
    missing: list[str]  # adapter modules with no module of that name in the base
    wrong_shape: list[str]  # 'module: adapter in->out, base in->out'

    @property
    def matched_components(self) -> list[str]:
        return [c for c, (m, _) in self.per_component.items() if m > 0]


def base_modules(pipe) -> dict[str, torch.nn.Module]:
    """Linear/conv modules a LoRA can adapt, keyed like our adapter modules (text_model. stripped)."""
    out: dict[str, torch.nn.Module] = {}
    for comp in COMPONENTS:
        model = getattr(pipe, comp, None)
        if model is None:
            continue
        for name, mod in model.named_modules():
            if not name or ".lora_" in name or name.endswith(".base_layer") or ".base_layer." in name:
                continue
            base = getattr(mod, "base_layer", mod)
            if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
                out[_strip_text_model(f"{comp}.{name}")] = base
    return out


def _io(mod: torch.nn.Module) -> tuple[int, int]:
    if isinstance(mod, torch.nn.Conv2d):
        return mod.in_channels, mod.out_channels
    return mod.in_features, mod.out_features


def match_layers(layers: Mapping[str, LoraLayer], pipe) -> MatchReport:
    mods = base_modules(pipe)
    per: dict[str, list[int]] = {}
    missing, wrong = [], []
    for module, layer in layers.items():
        c = per.setdefault(layer.component, [0, 0])
        c[1] += 1
        target = mods.get(_strip_text_model(module))
        if target is None:
            missing.append(module)
            continue
        fi, fo = _io(target)
        if (layer.in_features, layer.out_features) != (fi, fo):
            wrong.append(f"{module}: adapter {layer.in_features}->{layer.out_features}, base {fi}->{fo}")
            continue
        c[0] += 1
    matched = sum(m for m, _ in per.values())
    return MatchReport(matched, len(layers), {k: (v[0], v[1]) for k, v in per.items()}, missing, wrong)


# --------------------------------------------------------------------------------------------------
# AdapterInfo and inspection


@dataclass
class AdapterInfo:
    """What an adapter file is: shown in the library, checked before loading, recorded in images."""

    name: str
    path: Path
    format: str
    family: str | None  # sd1 / sd2 / sdxl (or another architecture's tag); None: unknown
    trigger_word: str
    rank: int  # most common rank
    alpha: float  # most common alpha
    size: int  # bytes
    modules: list[str]  # short module names adapted: to_q, to_k, ..., q_proj, ...
    hash: str  # AUTOMATIC1111's addnet hash (sha256 of the tensor data); short_hash is its first 12 chars
    metadata: dict[str, str] = field(default_factory=dict)
    preview: Path | None = None
    components: list[str] = field(default_factory=list)
    num_layers: int = 0
    family_source: str = ""  # 'metadata', 'shapes' or ''
    mtime: float = 0.0
    matched: int | None = None  # modules that fit the base it was checked against
    total: int | None = None
    network: str = ""  # a LyCORIS file's own terms, e.g. 'LoHa dim 8, alpha 4' ('' for a LoRA)
    embeddings: dict[str, int] = field(default_factory=dict)  # bundled embeddings: word -> its number of vectors

    @property
    def rank_text(self) -> str:
        """The rank as a user knows it: '16', or a LyCORIS file's own 'LoHa dim 8' (its LoRA reading is larger)."""
        return self.network.split(",")[0] if self.network else str(self.rank)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.rank < 0:
            raise ValueError(f"rank: must not be negative, got {self.rank}")

    @property
    def short_hash(self) -> str:
        return self.hash[:12]

    @property
    def partial(self) -> bool:
        return self.matched is not None and self.total is not None and self.matched < self.total

    @property
    def date(self) -> str:
        return self.metadata.get("modelspec.date") or time.strftime("%Y-%m-%d %H:%M", time.localtime(self.mtime))

    @property
    def family_label(self) -> str:
        return FAMILY_LABELS.get(self.family or "", self.family or "unknown")

    @property
    def clip_skip(self) -> int:
        """The Clip skip it was trained with (kohya's `ss_clip_skip`; 1 when unset or unreadable)."""
        v = str(self.metadata.get("ss_clip_skip", "")).strip()
        return int(v) if v.isdigit() and 1 <= int(v) <= 12 else 1

    def training_tags(self, n: int = 10) -> list[tuple[str, int]]:
        """The most frequent caption tags it was trained on, with their counts (kohya's `ss_tag_frequency`,
        summed over its image folders): for a file from elsewhere, where its trigger word is most often found.
        [] when the file has none or they cannot be read."""
        try:
            folders = json.loads(self.metadata.get("ss_tag_frequency") or "{}")
        except ValueError:
            return []
        counts: dict[str, int] = {}
        for tags in (folders.values() if isinstance(folders, dict) else []):
            for tag, k in (tags.items() if isinstance(tags, dict) else []):
                if isinstance(tag, str) and tag.strip() and isinstance(k, (int, float)) and k > 0:
                    counts[tag.strip()] = counts.get(tag.strip(), 0) + int(k)
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def suggested_start(self, steps: int) -> int | None:
        """The step from which the model card suggests the adapter acts, scaled to a sampler of `steps` steps
        (the check ran with its own count); None without a suggestion or with a value that is not START/STEPS."""
        try:
            start, of = (int(v) for v in self.metadata.get(SUGGESTED_START_KEY, "").split("/"))
        except ValueError:
            return None
        if not 0 < start < of or steps < 2:
            return None
        return min(steps - 1, max(1, round(start * steps / of)))


def preview_for(path: Path) -> Path | None:
    """A same-named image next to the adapter (A1111: name.png or name.preview.png); a symlink is never
    taken (it could point anywhere, and the UI serves previews)."""
    for suffix in _PREVIEW_SUFFIXES:
        p = path.with_name(path.stem + suffix)
        if p.is_file() and not p.is_symlink():
            return p
    return None


def _short_module(module: str) -> str:
    """'…attn1.to_q' -> 'to_q', '…to_out.0' -> 'to_out.0', '…ff.net.0.proj' -> 'ff.net.0.proj' (as in unet_targets)."""
    parts = module.split(".")
    if "ff" in parts[:-1]:
        return ".".join(parts[parts.index("ff"):])
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def _trigger(meta: Mapping[str, str]) -> str:
    for k in (f"{OURS}trigger", f"{OURS}trigger_word", "modelspec.trigger_phrase", "ss_trigger_word"):
        if meta.get(k):
            return meta[k]
    return ""


def a1111_activation_text(path: Path) -> str:
    """The "activation text" of AUTOMATIC1111's user metadata beside an adapter (`name.json`, as A1111's "Edit
    user metadata" and civitai helpers write it), or "" when there is none. A link, a file over 1 MB or one that
    is not such JSON is ignored: it is a hint, never a reason to refuse the adapter."""
    side = Path(path).with_suffix(".json")
    try:
        if side.is_symlink() or not side.is_file() or side.stat().st_size > 1 << 20:
            return ""
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    text = data.get("activation text") if isinstance(data, dict) else None
    return text.strip() if isinstance(text, str) else ""


def optimizer_label(ss_optimizer: str) -> str:
    """kohya's ss_optimizer ("prodigyopt.prodigy.Prodigy(d_coef=2)", "bitsandbytes.optim.adamw.AdamW8bit") as a
    reader says it: "Prodigy (d_coef=2)", "AdamW8bit"; empty when there is none."""
    text = (ss_optimizer or "").strip()
    if not text or text == "None":
        return ""
    name, _, args = text.partition("(")
    label = name.strip().rsplit(".", 1)[-1]
    return label + (f" ({args.rstrip(')')})" if args.rstrip(")") else "")


def adapter_facts(info: AdapterInfo) -> list[tuple[str, str]]:
    """What an adapter is, as (label, text) rows for `loras info` and the Library tab: base family (and where
    that came from), trigger word, network, how it was trained (ours or kohya's `ss_*` keys), its hash and the
    model card's step range."""
    meta = info.metadata

    def m(*keys: str) -> str:
        return next((meta[k] for k in keys if meta.get(k)), "")

    source = {"metadata": "from its metadata", "shapes": "from its layer shapes"}.get(info.family_source, "")
    trained_on = m(f"{OURS}base_model", "ss_sd_model_name")
    rows = [("base", ", ".join(x for x in (info.family_label + (f" ({source})" if source else ""),
                                           f"trained on {trained_on}" if trained_on else "") if x))]
    if info.matched is not None:
        rows.append(("fits", f"{info.matched} of {info.total} layers match the base given"))
    activation = a1111_activation_text(info.path)
    trigger = info.trigger_word or "none recorded: the adapter acts without a word"
    rows.append(("trigger", trigger + (f" (activation text: {activation})" if activation and
                                        activation != info.trigger_word else "")))
    if tags := info.training_tags():
        rows.append(("training tags", ", ".join(f"{t} ({k})" for t, k in tags)
                     + ("" if info.trigger_word else ": its trigger word is most likely among the first")))
    if info.embeddings:
        rows.append(("embedding", "; ".join(
            f"{w} ({n} vector{'s' if n != 1 else ''})" for w, n in info.embeddings.items())
            + ": bundled in the file (pivotal tuning); the word means what was trained while the adapter is in use, "
              "here and in AUTOMATIC1111"))
    if info.network.startswith("DoRA"):
        kind = (f"{info.network} (weight-decomposed LoRA: applied here as AUTOMATIC1111 and ComfyUI apply it, "
                "a LoRA plus per-channel scales of the base weights)")
    elif "(DoRA)" in info.network:
        kind = (f"LyCORIS {info.network} (applied here as an exact LoRA, most common rank {info.rank}, plus the "
                "DoRA per-channel scales of the base weights)")
    elif info.network:
        kind = f"LyCORIS {info.network} (applied here as an exact LoRA, most common rank {info.rank})"
    else:
        kind = f"LoRA rank {info.rank}, alpha {info.alpha:g}"
    rows.append(("network", f"{kind}; {info.num_layers} layers in "
                            f"{', '.join(info.components) or '?'}: {', '.join(info.modules)}"))
    if resized := meta.get(f"{OURS}resized_from"):
        rows.append(("resized", f"from {resized}: {meta.get(f'{OURS}resized', '')}".rstrip(": ")))
    if extracted := meta.get(f"{OURS}extracted_from"):
        rows.append(("extracted", f"from {extracted}: {meta.get(f'{OURS}extracted', '')}".rstrip(": ")))
    if converted := meta.get(f"{OURS}converted_from"):
        rows.append(("converted", f"from {converted} (exactly)"))
    train = []
    if steps := m(f"{OURS}steps", "ss_max_train_steps"):
        train.append(f"{steps} steps")
    if images := m(f"{OURS}num_images"):
        train.append(f"{images} images")
    if res := m(f"{OURS}resolution", "modelspec.resolution"):
        train.append(f"{res} px")
    if lr := m("ss_unet_lr", "ss_learning_rate"):
        te = meta.get("ss_text_encoder_lr")
        train.append(f"lr {lr}" + (f" (text encoder {te})" if te and te != "0" else " (UNet only)"
                                   if te == "0" else ""))
    if opt := optimizer_label(meta.get("ss_optimizer", "")):
        train.append(opt)
    if seed := meta.get("ss_seed"):
        train.append(f"seed {seed}")
    when = meta.get("modelspec.date", "")  # the file's own date only: its mtime is when it was copied here
    if train or when:
        rows.append(("training", ", ".join(train + ([f"on {when.replace('T', ' ')}"] if when else []))))
    if info.clip_skip > 1 and info.family != "sdxl":
        rows.append(("clip skip", f"trained with clip skip {info.clip_skip}: generate with Clip skip "
                                  f"{info.clip_skip} too (--clip-skip {info.clip_skip})"))
    rows.append(("hash", f"{info.short_hash or '?'} (AUTOMATIC1111's short hash of the tensors)"))
    of = meta.get(SUGGESTED_START_KEY, "").partition("/")[2]
    start = info.suggested_start(int(of)) if of.isdigit() else None
    if start is not None:
        rows.append(("step range", f"the model card suggests acting from step {start} of {of}: "
                                   f"<lora:{info.name}:1:start={start}>"))
    return rows


def _read_view(path: Path, allow_pickle: bool, check_tensors: bool):
    """(shapes, metadata, alpha values, state dict or None) reading as little as needed."""
    if path.suffix.lower() in PICKLE_SUFFIXES or check_tensors:
        refuse_pickle(path, allow_pickle)
        sd, meta = load_safetensors(path, allow_pickle=allow_pickle, check_finite=True)
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        alphas = {k: float(v.float().reshape(-1)[0]) for k, v in sd.items() if k.endswith(".alpha") and v.numel()}
        return shapes, meta, alphas, sd
    header, _ = read_header(path)
    meta = dict(header.get("__metadata__", {}) or {})
    shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    alphas: dict[str, float] = {}
    alpha_keys = [k for k in shapes if k.endswith(".alpha")]
    if alpha_keys:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for k in alpha_keys:
                t = f.get_tensor(k)
                if t.numel():
                    alphas[k] = float(t.float().reshape(-1)[0])
    return shapes, meta, alphas, None


def describe(
    shapes: Mapping[str, tuple[int, ...]],
    meta: Mapping[str, str],
    alphas: Mapping[str, float],
    *,
    path: Path,
    name: str | None = None,
    base: "BaseModel | None" = None,
    file_hash: str = "",
    unet_layers_per_block: int | None = None,
    lycoris: Converted | None = None,
    embeddings: Mapping[str, int] | None = None,
) -> tuple[AdapterInfo, dict[str, LoraLayer], MatchReport | None]:
    """Build an AdapterInfo; with `base`, refuse what cannot be loaded into it (family, zero keys, shapes).

    `lycoris`: what `as_lora` read a LyCORIS file as (its shapes are then the converted ones). `embeddings`: its
    bundled embeddings (word -> vectors), read from `shapes` when not given."""
    path = Path(path)
    shapes, bundles = split_bundled(shapes, path.name)
    if embeddings is None:
        embeddings = {w: vector_count(v) for w, v in bundles.items()}
    if not shapes:
        raise IncompatibleAdapterError(f"{path}: the file holds no tensors")
    lpb = unet_layers_per_block or (base.pipe.unet.config.layers_per_block if base is not None else None)
    if isinstance(lpb, (list, tuple)):
        lpb = lpb[0]
    fmt = detect_format(shapes)
    try:
        layers = parse_layers(shapes, meta, alphas, fmt=fmt, unet_layers_per_block=lpb)
    except (IncompatibleAdapterError, CorruptWeightsError) as e:
        raise type(e)(f"{path}: {e}") from None
    if not layers:
        raise IncompatibleAdapterError(f"{path}: no LoRA layers found in the file")
    fam_meta = family_from_metadata(meta)
    fam_shape = family_from_layers(layers)
    family, source = (fam_meta, "metadata") if fam_meta else ((fam_shape, "shapes") if fam_shape else (None, ""))
    ranks = Counter(l.rank for l in layers.values())
    alphas_c = Counter(l.alpha for l in layers.values())
    st = path.stat() if path.exists() else None
    info = AdapterInfo(
        name=name or path.stem,
        path=path,
        format=fmt,
        family=family,
        trigger_word=_trigger(meta) or a1111_activation_text(path),
        rank=ranks.most_common(1)[0][0],
        alpha=alphas_c.most_common(1)[0][0],
        size=st.st_size if st else 0,
        modules=sorted({_short_module(m) for m in layers}),
        hash=file_hash,
        metadata=dict(meta),
        preview=preview_for(path),
        components=[c for c in COMPONENTS if any(l.component == c for l in layers.values())],
        num_layers=len(layers),
        family_source=source,
        mtime=st.st_mtime if st else 0.0,
        network=lycoris.network() if lycoris is not None else "",
        embeddings=dict(embeddings),
    )
    if lycoris is not None and lycoris.lycoris_keys:
        info.format = FORMAT_LYCORIS
    report = None
    if base is not None:
        report = check_compatible(info, layers, base)
    return info, layers, report


def check_compatible(info: AdapterInfo, layers: Mapping[str, LoraLayer], base: "BaseModel") -> MatchReport:
    """Raise IncompatibleAdapterError unless the adapter can be loaded into `base` (at least partly)."""
    where = f"{info.path.name}"
    base_label = f"'{base.name}' ({FAMILY_LABELS.get(base.family, base.family)})"
    if info.family and info.family != base.family:
        how = "its metadata" if info.family_source == "metadata" else "its tensor shapes"
        raise IncompatibleAdapterError(
            f"{where}: this adapter was made for {FAMILY_LABELS.get(info.family, info.family)} (from {how}) "
            f"but the loaded base model '{base.name}' is {FAMILY_LABELS.get(base.family, base.family)}; "
            "load a matching base model or pick another adapter"
        )
    report = match_layers(layers, base.pipe)
    if report.wrong_shape:
        raise IncompatibleAdapterError(
            f"{where}: {len(report.wrong_shape)} of {report.total} adapted layers have shapes that do not fit the "
            f"base model {base_label} (e.g. {report.wrong_shape[0]}); it was made for a different model"
        )
    if report.matched == 0:
        raise IncompatibleAdapterError(
            f"{where}: none of its {report.total} layers match a module of the base model {base_label} "
            f"(e.g. {report.missing[0] if report.missing else '?'}); it is not an adapter for this model"
        )
    info.matched, info.total = report.matched, report.total
    return report


_LYCORIS_VIEWS: dict[tuple, tuple] = {}  # (file, mtime, size) -> shapes, alphas, what it was: a listing reads once


def _lycoris_view(path: Path, sd, base, allow_pickle: bool, lpb: int | None):
    """A LyCORIS file's shapes and alphas as LoRA (cached per file version when no base is involved)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, lpb)
    if base is None and key in _LYCORIS_VIEWS:
        return _LYCORIS_VIEWS[key]
    if sd is None:
        sd, _ = load_safetensors(path, allow_pickle=allow_pickle, check_finite=False)
    sd, lyco = as_lora(sd, base, where=path, unet_layers_per_block=lpb, dora=True)
    view = ({k: tuple(v.shape) for k, v in sd.items()}, _tensor_alphas(sd), replace(lyco, state_dict={},
                                                                                     magnitudes={}))
    if base is None:
        if len(_LYCORIS_VIEWS) >= 64:
            _LYCORIS_VIEWS.pop(next(iter(_LYCORIS_VIEWS)))
        _LYCORIS_VIEWS[key] = view
    return view


def inspect_adapter(
    path: str | os.PathLike,
    base: "BaseModel | None" = None,
    *,
    name: str | None = None,
    allow_pickle: bool = False,
    check_tensors: bool = True,
    compute_hash: bool = True,
    unet_layers_per_block: int | None = None,
) -> AdapterInfo:
    """Describe an adapter file and, given a base, check it fits before anything is loaded.

    Raises PickleRefusedError (pickle without allow_pickle), CorruptWeightsError (malformed file,
    non-finite tensors with check_tensors), IncompatibleAdapterError (not a LoRA, other family,
    no key matching the base, shapes that do not fit). A partly matching file is reported in
    `matched` / `total`.
    """
    path = Path(path)
    shapes, meta, alphas, sd = _read_view(path, allow_pickle, check_tensors)
    lyco = None
    _, bundles = split_bundled(shapes, path.name)  # before a LyCORIS reading leaves them out
    words = {w: vector_count(v) for w, v in bundles.items()}
    if is_lycoris(shapes) or has_dora(shapes):  # read as LoRA: the factors' shapes come from the tensors
        shapes, alphas, lyco = _lycoris_view(path, sd, base, allow_pickle, unet_layers_per_block)
    h = addnet_hash(path) if compute_hash and path.suffix.lower() not in PICKLE_SUFFIXES else ""
    info, _, _ = describe(shapes, meta, alphas, path=path, name=name, base=base, file_hash=h,
                          unet_layers_per_block=unet_layers_per_block, lycoris=lyco, embeddings=words)
    return info


# --------------------------------------------------------------------------------------------------
# conversion


def as_lora(sd: Mapping[str, torch.Tensor], base: "BaseModel | None" = None, *, where: str | os.PathLike = "",
            unet_layers_per_block: int | None = None, dora: bool = False,
            ) -> tuple[dict[str, torch.Tensor], Converted | None]:
    """A LyCORIS file's tensors as exact LoRA factors in kohya's layout (see lycoris.py); any other file as it is.

    `base` gives the kernel size of convolutions that LyCORIS stores flattened. Errors name `where` (the file).
    A DoRA file's magnitude vectors are taken out into the result's `magnitudes` when `dora` is true (they need
    the base weights to be applied: dora.fold); otherwise such a file is refused. Bundled embeddings
    (`bundle_emb.*`) are left out: take them first (embeddings.split_bundled)."""
    sd = {k: v for k, v in sd.items() if not k.startswith(BUNDLE_PREFIX)}
    rest, mags = take_magnitudes(sd)
    if mags and not dora:
        raise IncompatibleAdapterError(
            (f"{Path(where).name}: " if where else "") + f"it is a DoRA adapter ({len(mags)} modules with "
            "magnitude vectors): its lengths rescale the base model's weights as AUTOMATIC1111 and ComfyUI apply "
            "them, which this conversion cannot keep (a kohya-format export keeps them). Use the file as it is: "
            "this app, AUTOMATIC1111 and ComfyUI load it")
    if not is_lycoris(rest):
        if not mags:
            return dict(sd), None
        conv = Converted(dict(rest), lycoris_keys=bool(rest) and all(k.startswith(KOHYA_PREFIXES) for k in rest))
        for k, v in rest.items():
            if k.endswith((".lora_down.weight", ".lora_A.weight")):
                conv.algorithms["LoRA"] += 1
                conv.dims[int(v.shape[0])] += 1
            elif k.endswith(".alpha") and v.numel():
                conv.alphas[float(v.float().reshape(-1)[0])] += 1
        conv.magnitudes, conv.dora_modules = mags, len(mags)
        return conv.state_dict, conv
    kernels = None
    if base is not None:
        lpb = unet_layers_per_block or base.pipe.unet.config.layers_per_block
        lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
        kernels = conv_kernels(base.pipe, {k.split(".")[0] for k in rest}, lpb)
    try:
        conv = to_lora(rest, kernels)
    except IncompatibleAdapterError as e:
        raise IncompatibleAdapterError(f"{Path(where).name}: {e}" if where else str(e)) from None
    conv.magnitudes, conv.dora_modules = mags, len(mags)
    return conv.state_dict, conv


def magnitudes_as_peft(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
                       unet_layers_per_block: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A DoRA file in any naming as our peft state dict with its lengths under `<module>.dora_scale` (to train
    it further), and each module's alpha; a file without magnitudes as `to_peft` reads it."""
    rest, mags = take_magnitudes(state_dict)
    sd, alphas = to_peft(rest, metadata, unet_layers_per_block=unet_layers_per_block)
    if not mags:
        return sd, alphas
    fmt = detect_format(rest)
    suffix, other = (".lora_A.weight", ".lora_B.weight") if fmt == FORMAT_PEFT else (".lora_down.weight",
                                                                                     ".lora_up.weight")
    kmap = peft_key_map([f"{m}{s}" for m in mags for s in (suffix, other)], fmt, unet_layers_per_block)
    for m, v in mags.items():
        target = canonical_peft_keys({kmap[f"{m}{suffix}"]: v})
        (key, value), = target.items()
        sd[key.rsplit(".lora_A.", 1)[0] + ".dora_scale"] = value
    return sd, alphas


def fold_dora(sd: Mapping[str, torch.Tensor], conv: Converted, layers: Mapping[str, LoraLayer], pipe,
              where: str | os.PathLike = ""):
    """A DoRA file's LoRA tensors with its magnitudes folded in against `pipe`'s base weights, and the channel
    scales that remain (see dora.py). `layers`: parse_layers of `sd`."""
    try:
        return fold(sd, conv.magnitudes, layers, base_modules(pipe))
    except IncompatibleAdapterError as e:
        raise IncompatibleAdapterError(f"{Path(where).name}: {e}" if where else str(e)) from None


def _tensor_alphas(sd: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.float().reshape(-1)[0]) for k, v in sd.items() if k.endswith(".alpha") and v.numel()}


def to_peft(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    unet_layers_per_block: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Any supported format -> (our peft state dict, {module: alpha})."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    layers = parse_layers(shapes, metadata or {}, _tensor_alphas(state_dict), unet_layers_per_block=unet_layers_per_block)
    sd: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for module, layer in layers.items():
        sd[f"{module}.lora_A.weight"] = state_dict[layer.a_key]
        sd[f"{module}.lora_B.weight"] = state_dict[layer.b_key]
        alphas[module] = layer.alpha if not layer.rslora else layer.scale * layer.rank
    sd = canonical_peft_keys(sd)
    alphas = {_canon_module(m): a for m, a in alphas.items()}
    return sd, alphas


def _canon_module(module: str) -> str:
    comp, _, rest = module.partition(".")
    if comp in TEXT_ENCODERS and not rest.startswith("text_model."):
        return f"{comp}.text_model.{rest}"
    return module


UNET_LAYOUT_KEY = f"{OURS}unet_layout"  # JSON: pipelines.single_file.unet_layout of the base trained on
_SGM_BLOCKS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


def layout_for(meta: Mapping[str, str], base: "BaseModel | None" = None) -> dict | None:
    """The UNet block layout an adapter's module names refer to: from the file's metadata, else from the
    base model at hand; None when neither says (never guessed)."""
    from .single_file import check_unet_layout, unet_layout

    raw = meta.get(UNET_LAYOUT_KEY)
    if raw:
        try:
            return check_unet_layout(json.loads(raw))
        except (ValueError, ModelLoadError) as e:  # bad JSON or a bad layout: say which key
            raise CorruptWeightsError(f"metadata '{UNET_LAYOUT_KEY}': {e}") from None
    if base is not None:
        return unet_layout(base.pipe.unet)
    return None


def has_sgm_names(keys: Iterable[str]) -> bool:
    """kohya's SDXL UNet naming (LDM `input_blocks` / `middle_block` / `output_blocks`)."""
    return any(k.startswith(_SGM_BLOCKS) for k in keys)


def to_kohya(
    state_dict: Mapping[str, torch.Tensor],
    alphas: float | Mapping[str, float] | None = None,
    *,
    family: str | None = None,
    layout: Mapping[str, list] | None = None,
) -> dict[str, torch.Tensor]:
    """Our peft state dict -> kohya/A1111 keys with a `.alpha` per module.

    Text encoder: `lora_te_` (SD 1.x/2.x) or `lora_te1_`/`lora_te2_` (SDXL), named as in transformers'
    CLIP (as kohya names them). UNet: SD 1.x/2.x keep diffusers' module names (`lora_unet_down_blocks_0_…`),
    as kohya's SD 1.x networks do; SDXL modules get the LDM names kohya trains SDXL on
    (`lora_unet_input_blocks_4_1_…`, `…_in_layers_2` for a ResNet's conv1), which depend on the UNet's
    block layout: `layout` (`single_file.unet_layout`) is required for SDXL and never guessed.
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    sd = canonical_peft_keys(state_dict)
    if not sd:  # a textual-inversion checkpoint: its embedding only
        return {}
    is_sdxl = family == "sdxl" or any(k.startswith("text_encoder_2.") for k in sd)
    sd, mags = take_magnitudes(sd)
    if mags:  # DoRA lengths (ours: `<module>.dora_scale`): kohya's module name, LyCORIS' `dora_scale`
        names = kohya_names(mags, is_sdxl=is_sdxl, layout=layout)
        rest = to_kohya(sd, alphas, family=family, layout=layout)
        return {**rest, **{f"{names[m]}.dora_scale": v for m, v in mags.items()}}
    lyco = {k: v for k, v in sd.items() if lycoris_param(k)}
    if lyco:  # LoHa / LoKr weights: LyCORIS' own parameter names under kohya's module names
        sd = {k: v for k, v in sd.items() if k not in lyco}
        result = _lycoris_to_kohya(lyco, alphas, is_sdxl=is_sdxl, layout=layout)
        return {**result, **(to_kohya(sd, alphas, family=family, layout=layout) if sd else {})}
    out = convert_state_dict_to_kohya(dict(sd))
    # module name per key diffusers wrote (lora_te1_ for every text encoder), to rename and attach our alphas
    module_of = {}
    for k in sd:
        if ".lora_A." in k:
            module, _ = _split_module(k)
            comp, _, rest = module.partition(".")
            prefix = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[comp]
            module_of[f"{prefix}_{rest.replace('.', '_')}"] = module
    named = kohya_names(module_of.values(), is_sdxl=is_sdxl, layout=layout)
    renames = {name: named[module] for name, module in module_of.items()}
    amap = {_strip_text_model(k): v for k, v in alphas.items()} if isinstance(alphas, Mapping) else {}
    result: dict[str, torch.Tensor] = {}
    for key, val in out.items():
        name, _, tail = key.partition(".")
        if name not in module_of:
            raise IncompatibleAdapterError(f"cannot name '{key}' in kohya format")
        new = renames[name]
        if tail == "alpha":
            module = module_of[name]
            if alphas is None:
                a = float(sd[f"{module}.lora_A.weight"].shape[0])
            elif isinstance(alphas, Mapping):
                a = amap.get(_strip_text_model(module))
                a = float(sd[f"{module}.lora_A.weight"].shape[0]) if a is None else float(a)
            else:
                a = float(alphas)
            result[f"{new}.alpha"] = torch.tensor(a, dtype=torch.float32)
        else:
            result[f"{new}.{tail}"] = val
    return result


# LyCORIS' parameter names (LoHa's Hadamard pairs, LoKr's Kronecker factors), as peft and LyCORIS files name them
LYCORIS_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                  "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def lycoris_param(key: str) -> tuple[str, str] | None:
    """(module, parameter) of a LoHa / LoKr weight's key (`unet.….to_q.hada_w1_a`), else None."""
    module, _, param = key.rpartition(".")
    return (module, param) if param in LYCORIS_PARAMS else None


def kohya_names(modules: Iterable[str], *, is_sdxl: bool, layout: Mapping[str, list] | None) -> dict[str, str]:
    """Our module names (`unet.down_blocks.0.…`, `text_encoder.text_model.…`) -> kohya's (`lora_unet_…`,
    `lora_te_…` / `lora_te1_…`, SDXL's UNet in LDM names from its `layout`), as `to_kohya` names LoRA modules."""
    from .single_file import unet_block_prefixes, unet_module_to_ldm

    out: dict[str, str] = {}
    prefixes = None
    for module in modules:
        comp, _, rest = module.partition(".")
        if comp == "unet" and is_sdxl:
            if layout is None:
                raise IncompatibleAdapterError(
                    "SDXL UNet module names in kohya format depend on the base model's block layout, which this "
                    "adapter's metadata does not record: give the base model it was trained on (--base)")
            prefixes = prefixes or unet_block_prefixes(dict(layout))
            ldm = unet_module_to_ldm(rest, prefixes)
            if ldm is None:
                raise IncompatibleAdapterError(f"UNet module '{module}' has no LDM name in this layout")
            out[module] = "lora_unet_" + ldm.replace(".", "_")
            continue
        prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if is_sdxl else "lora_te",
                  "text_encoder_2": "lora_te2"}.get(comp)
        if prefix is None:
            raise IncompatibleAdapterError(f"cannot name '{module}' in kohya format")
        out[module] = f"{prefix}_{rest.replace('.', '_')}"
    return out


def lycoris_dim(params: Mapping[str, torch.Tensor]) -> int | None:
    """A LoHa / LoKr module's dim as LyCORIS' loaders divide alpha by (None: a LoKr of two full factors)."""
    for name in ("hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if name in params:
            return int(params[name].shape[0])
    return None


def _lycoris_to_kohya(sd: Mapping[str, torch.Tensor], alphas: float | Mapping[str, float] | None, *,
                      is_sdxl: bool, layout: Mapping[str, list] | None) -> dict[str, torch.Tensor]:
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, val in sd.items():
        module, param = lycoris_param(key)
        by_module.setdefault(module, {})[param] = val
    names = kohya_names(by_module, is_sdxl=is_sdxl, layout=layout)
    amap = {_strip_text_model(k): v for k, v in alphas.items()} if isinstance(alphas, Mapping) else {}
    out: dict[str, torch.Tensor] = {}
    for module, params in by_module.items():
        name = names[module]
        out.update({f"{name}.{p}": v for p, v in params.items()})
        dim = lycoris_dim(params)
        a = amap.get(_strip_text_model(module)) if isinstance(alphas, Mapping) else alphas
        out[f"{name}.alpha"] = torch.tensor(float(a if a is not None else dim or 1), dtype=torch.float32)
    return out


def _kohya_metadata(meta: Mapping[str, str], family: str | None, rank: int, alpha: float, sgm: bool) -> dict[str, str]:
    out = {k: v for k, v in meta.items() if k not in (DIFFUSERS_METADATA_KEY, "format")}
    out.setdefault("ss_network_module", "networks.lora")
    out.setdefault("ss_network_dim", str(rank))
    out.setdefault("ss_network_alpha", f"{alpha:g}")
    if family in SS_BASE_MODEL_VERSION:
        out.setdefault("ss_base_model_version", SS_BASE_MODEL_VERSION[family])
        out.setdefault("modelspec.sai_model_spec", "1.0.0")
        out.setdefault("modelspec.architecture", f"{MODELSPEC_ARCH[family]}/lora")
    if sgm:
        out["modelspec.implementation"] = MODELSPEC_IMPL_SGM
    trig = _trigger(meta)
    if trig:
        out.setdefault("modelspec.trigger_phrase", trig)
    return out


def kohya_metadata(meta: Mapping[str, str], state_dict: Mapping[str, torch.Tensor], family: str | None,
                   alphas: float | Mapping[str, float] | None) -> dict[str, str]:
    """The metadata of a kohya-layout file: ours and the ss_* / modelspec.* keys, without diffusers' peft config."""
    ranks = Counter(int(v.shape[0]) for k, v in state_dict.items() if ".lora_A." in k or ".lora_down." in k
                    or k.endswith((".hada_w1_b", ".lokr_w2_b", ".lokr_w1_b")))
    rank = ranks.most_common(1)[0][0] if ranks else 0  # 0: LoKr layers of full factors only
    if isinstance(alphas, Mapping) and alphas:
        alpha = Counter(float(a) for a in alphas.values()).most_common(1)[0][0]
    else:
        alpha = float(alphas) if alphas is not None else float(rank)
    return _kohya_metadata(meta, family, rank, alpha, has_sgm_names(state_dict))


def save_kohya(peft_sd: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str], *,
               family: str | None, alphas: float | Mapping[str, float] | None, layout: dict | None,
               dtype: torch.dtype | None = None, embeddings: Mapping[str, dict] | None = None) -> Path:
    """Our peft state dict written as a file users take out of the app: kohya's key layout (which AUTOMATIC1111
    and ComfyUI map fully), a `.alpha` per module, kohya's metadata keys, and the UNet layout it names (when
    given). `dtype` casts every tensor, `.alpha` too, as kohya saves them. `embeddings` ({word: vectors}) go in
    as A1111's bundled embeddings."""
    meta = dict(metadata)
    if layout is not None:
        meta[UNET_LAYOUT_KEY] = json.dumps(layout)
    kohya = to_kohya(peft_sd, alphas, family=family, layout=layout)
    for word, vectors in (embeddings or {}).items():
        kohya.update(bundle_keys(word, vectors))
    if dtype is not None:
        kohya = {k: v.to(dtype) for k, v in kohya.items()}
    # looked up at the call, as the writers this replaced did: a test's stand-in for a full disk reaches it
    from . import weights_io

    return weights_io.save_safetensors(kohya, path, kohya_metadata(meta, kohya, family, alphas))


def export_adapter(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    fmt: str = FORMAT_KOHYA,
    *,
    base: "BaseModel | None" = None,
    allow_pickle: bool = False,
    precision: str | None = None,
    transform: "Callable[[dict, dict, dict], tuple[dict, dict]] | None" = None,
) -> Path:
    """Convert an adapter file to 'kohya' (A1111/ComfyUI) or 'peft' (diffusers, ours), keeping its metadata.

    SDXL UNet names depend on the UNet's block layout: taken from the file's metadata, else from `base`;
    without either an SDXL conversion is refused rather than guessed.
    `precision` 'fp32' / 'fp16' / 'bf16' casts the weights (fp16 halves the file); None keeps their dtype.
    `transform(peft state dict, alphas, metadata) -> (state dict, alphas)` changes the factors on the way
    (resize.py); it may update the metadata dict in place.
    """
    src, dst = Path(src), Path(dst)
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"precision: must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    sd, meta = load_safetensors(src, allow_pickle=allow_pickle, check_finite=True)
    try:
        sd, words = split_bundled(sd, src.name)
        if precision is not None:
            words = {w: {k: v.to(PRECISIONS[precision]) for k, v in vec.items()} for w, vec in words.items()}
        if fmt == FORMAT_EMBEDDING:
            return save_embedding(words, dst)
        layout = layout_for(meta, base)
        if layout is None and has_sgm_names(sd):
            raise IncompatibleAdapterError("its SDXL UNet names (input_blocks/…) can only be read with the base "
                                           "model's block layout, which its metadata does not record: give the "
                                           "base model (--base)")
        lpb = layout["down"][0][0] if layout else None
        # DoRA: kohya's layout holds its lengths (`dora_scale`) as A1111 and ComfyUI apply them; diffusers' does not
        sd, lyco = as_lora(sd, base, unet_layers_per_block=lpb, dora=fmt == FORMAT_KOHYA and transform is None)
        if lyco is not None and lyco.flattened and base is None:
            raise IncompatibleAdapterError(
                f"its LyCORIS ({lyco.label}) convolutions ({lyco.flattened[0]}, …) store their kernels flattened; "
                "the base model's layers give their kernel size: give the base model (--base)")
        mags = lyco.magnitudes if lyco is not None else {}
        odd = next((m for m, v in mags.items() if not stored_per_input(v)), None)
        if odd is not None:
            raise IncompatibleAdapterError(
                f"module '{odd}': its DoRA lengths are per output channel (LyCORIS 3.2's wd_on_output, or peft's), "
                "which AUTOMATIC1111 and ComfyUI apply per input channel: a kohya file of it would draw something "
                "else there. This app applies the file as it is")
        peft_sd, alphas = magnitudes_as_peft({**sd, **{f"{m}.dora_scale": v for m, v in mags.items()}}, meta,
                                             unet_layers_per_block=lpb)
        family = family_from_metadata(meta) or family_from_layers(
            parse_layers({k: tuple(v.shape) for k, v in peft_sd.items() if not k.endswith(".dora_scale")}, {}, {}))
        keep = {k: v for k, v in meta.items() if k not in (DIFFUSERS_METADATA_KEY, "format")}
        if transform is not None:
            peft_sd, alphas = transform(peft_sd, alphas, keep)
        if precision is not None:
            peft_sd, bad = cast_weights(peft_sd, precision)
            if bad is not None:
                raise ConfigError(f"precision: {src.name}'s '{bad}' does not fit in {precision}; use bf16 or fp32")
        if lyco is not None and lyco.label != "DoRA":  # now a plain LoRA (+ DoRA lengths): kohya's network keys
            # describe the LoRA, not the LyCORIS source
            for k in ("ss_network_module", "ss_network_args", "ss_network_dim", "ss_network_alpha"):
                keep.pop(k, None)
            keep[f"{OURS}converted_from"] = f"LyCORIS {lyco.network()}"
        if family and f"{OURS}base_family" not in keep:
            keep[f"{OURS}base_family"] = family
        if fmt == FORMAT_KOHYA:
            return save_kohya(peft_sd, dst, keep, family=family, alphas=alphas, layout=layout, embeddings=words)
        if layout is not None:
            keep[UNET_LAYOUT_KEY] = json.dumps(layout)
        if fmt == FORMAT_PEFT:
            # diffusers' load_lora_weights refuses keys it does not know: the embedding goes beside, as diffusers'
            # pivotal-tuning example writes it (<name>_emb.safetensors, for pipe.load_textual_inversion)
            if words:
                save_embedding(words, embedding_path(dst))
            return save_adapter(peft_sd, dst, keep, alpha=alphas)
    except (IncompatibleAdapterError, CorruptWeightsError) as e:
        raise type(e)(f"{src}: {e}") from None
    raise ValueError(f"fmt: unknown export format '{fmt}' (choose 'kohya', 'peft' or 'embedding')")


def embedding_path(adapter_file: str | os.PathLike) -> Path:
    """Where a diffusers-format export puts its embedding: `<name>_emb.safetensors` beside it."""
    p = Path(adapter_file)
    return p.with_name(p.name.removesuffix(SAFETENSORS_SUFFIX).removesuffix(".peft") + "_emb" + SAFETENSORS_SUFFIX)


def save_embedding(words: Mapping[str, dict], dst: str | os.PathLike, metadata: Mapping[str, str] | None = None
                   ) -> Path:
    """An adapter's bundled embedding as an embeddings-folder file: A1111's `emb_params` (SD 1.x/2.x) or SDXL's
    `clip_l` and `clip_g`, which AUTOMATIC1111, ComfyUI and this app read; diffusers' load_textual_inversion reads
    it with `token=`."""
    if not words:
        raise IncompatibleAdapterError("it carries no bundled embedding (only adapters trained with pivotal tuning, "
                                       "or files with `bundle_emb` keys, do)")
    if len(words) > 1:
        raise IncompatibleAdapterError(f"it carries {len(words)} embeddings ({', '.join(words)}); an embedding file "
                                       "holds one")
    word, vectors = next(iter(words.items()))
    tensors = {"emb_params": vectors[""]} if set(vectors) == {""} else dict(vectors)
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, dst,
                            {"lora_studio.embedding_word": word, **(metadata or {})})


def export_kohya(src: str | os.PathLike, dst: str | os.PathLike, **kwargs) -> Path:
    """Write `src` as a kohya/AUTOMATIC1111 LoRA file at `dst`, keeping its metadata."""
    return export_adapter(src, dst, FORMAT_KOHYA, **kwargs)


__all__ = [
    "AdapterInfo", "LoraLayer", "MatchReport", "lora_metadata", "save_adapter", "diffusers_adapter_config",
    "detect_format", "peft_key_map", "parse_layers", "family_from_metadata", "family_from_layers",
    "match_layers", "check_compatible", "inspect_adapter", "describe", "to_peft", "to_kohya", "export_adapter",
    "kohya_metadata", "layout_for", "has_sgm_names", "UNET_LAYOUT_KEY", "SUGGESTED_START_KEY",
    "export_kohya", "canonical_peft_keys", "preview_for", "FAMILY_LABELS", "save_kohya", "as_lora", "fold_dora",
    "magnitudes_as_peft", "FORMAT_EMBEDDING", "embedding_path", "save_embedding",
]
