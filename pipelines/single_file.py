"""Convert a diffusers Stable Diffusion pipeline to and from an original single-file checkpoint.

The single-file layout is the one of the original LDM / sgm code, which AUTOMATIC1111 and ComfyUI
load: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.*` (SD 1.x
CLIP / SD 2.x OpenCLIP text encoder) or `conditioner.embedders.{0,1}.*` (SDXL's two encoders).
`to_single_file_state_dict` is the inverse of diffusers' own single-file loading code
(`diffusers.loaders.single_file_utils`), so diffusers' `from_single_file` reads our files back.

A saved file also carries the pipeline's diffusers component configs in its metadata
(`lora_studio.diffusers_config`), so a model whose shapes are not a standard SD 1.x/2.x/XL layout
(such as the embedded toy model) can be loaded back without any hub access.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import CorruptWeightsError, ModelLoadError
from .weights_io import PICKLE_SUFFIXES, load_safetensors, read_header, refuse_pickle, save_safetensors

CONFIG_METADATA_KEY = "lora_studio.diffusers_config"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."

ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
_CONFIG_FILE = re.compile(r"model_index\.json|[A-Za-z0-9_]+/(config|scheduler_config)\.json")
_COMPONENT_NAME = re.compile(r"[A-Za-z0-9_]+")
_ALLOWED_LIBRARIES = {"diffusers", "transformers", None}
_SINGLE_FILE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")

# ----------------------------------------------------------------------------------------------
# UNet: diffusers -> LDM names
# ----------------------------------------------------------------------------------------------

_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's text_time conditioning and class-conditioned UNets share LDM's `label_emb`.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "class_embedding": "label_emb",
}
_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_layout(unet) -> dict[str, list]:
    """The block structure of a UNet2DConditionModel that its LDM / kohya module names depend on:
    per down block [resnets, has attention, has downsampler], the mid block's [resnets, attentions],
    per up block [resnets, has attention, has upsampler]. JSON-serialisable, so an adapter file can
    carry it (`lora_studio.unet_layout`) and be named correctly without the base model at hand."""
    mid = unet.mid_block
    return {
        "down": [[len(b.resnets), getattr(b, "attentions", None) is not None, b.downsamplers is not None]
                 for b in unet.down_blocks],
        "mid": [] if mid is None else [len(mid.resnets), len(getattr(mid, "attentions", None) or [])],
        "up": [[len(b.resnets), getattr(b, "attentions", None) is not None, b.upsamplers is not None]
               for b in unet.up_blocks],
    }


def check_unet_layout(layout: object) -> dict[str, list]:
    """`layout` as `unet_layout` returns it, or ModelLoadError (it may come from a file's metadata)."""
    def triples(v) -> bool:
        return isinstance(v, list) and all(
            isinstance(t, list) and len(t) == 3 and isinstance(t[0], int) and not isinstance(t[0], bool)
            and t[0] >= 0 and isinstance(t[1], bool) and isinstance(t[2], bool) for t in v)

    ok = (isinstance(layout, dict) and triples(layout.get("down")) and triples(layout.get("up"))
          and isinstance(layout.get("mid"), list) and len(layout["mid"]) in (0, 2)
          and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layout["mid"]))
    if not ok:
        raise ModelLoadError(f"invalid UNet layout {layout!r}")
    return layout  # type: ignore[return-value]


def unet_block_prefixes(layout: dict[str, list]) -> dict[str, tuple[str, bool]]:
    """Map each diffusers block module prefix to (LDM prefix, is_resnet), numbering as LDM does.

    LDM's `input_blocks` are numbered sequentially: conv_in is 0, then every resnet (with its
    attention as `.1`) and every downsampler (`.0.op`) takes the next index. `output_blocks` hold
    one resnet each; a level's upsampler sits in its last output block after the resnet (and the
    attention when there is one).
    """
    out: dict[str, tuple[str, bool]] = {}
    idx = 1
    for b, (n, has_attn, has_down) in enumerate(layout["down"]):
        for layer in range(n):
            out[f"down_blocks.{b}.resnets.{layer}."] = (f"input_blocks.{idx}.0.", True)
            if has_attn:
                out[f"down_blocks.{b}.attentions.{layer}."] = (f"input_blocks.{idx}.1.", False)
            idx += 1
        if has_down:
            out[f"down_blocks.{b}.downsamplers.0.conv."] = (f"input_blocks.{idx}.0.op.", False)
            idx += 1

    if layout["mid"]:
        n_res, n_attn = layout["mid"]
        for k in range(n_res):
            out[f"mid_block.resnets.{k}."] = (f"middle_block.{2 * k}.", True)
        for k in range(n_attn):
            out[f"mid_block.attentions.{k}."] = (f"middle_block.{2 * k + 1}.", False)

    idx = 0
    for b, (n, has_attn, has_up) in enumerate(layout["up"]):
        for layer in range(n):
            out[f"up_blocks.{b}.resnets.{layer}."] = (f"output_blocks.{idx}.0.", True)
            if has_attn:
                out[f"up_blocks.{b}.attentions.{layer}."] = (f"output_blocks.{idx}.1.", False)
            if layer == n - 1 and has_up:
                sub = 2 if has_attn else 1
                out[f"up_blocks.{b}.upsamplers.0.conv."] = (f"output_blocks.{idx}.{sub}.conv.", False)
            idx += 1
    return out


def unet_module_to_ldm(module: str, prefixes: dict[str, tuple[str, bool]]) -> str | None:
    """A diffusers UNet module path (`down_blocks.1.resnets.0.conv1`) -> its LDM path
    (`input_blocks.4.0.in_layers.2`); None when it has no LDM name."""
    if module in _UNET_FIXED:
        return _UNET_FIXED[module]
    key = module + "."
    prefix = next((p for p in prefixes if key.startswith(p)), None)
    if prefix is None:
        return None
    ldm_prefix, is_resnet = prefixes[prefix]
    rest = key[len(prefix):].rstrip(".")  # '' for a prefix that is the module itself (a down/upsampler conv)
    if is_resnet:
        rest = _UNET_RESNET_NAMES.get(rest, rest)
    return (ldm_prefix + rest).rstrip(".")


def _unet_block_prefixes(unet) -> dict[str, tuple[str, bool]]:
    return unet_block_prefixes(unet_layout(unet))


def _rename_resnet(rest: str, names: dict[str, str]) -> str:
    """`norm1.weight` -> `in_layers.0.weight` (UNet) or `conv_shortcut.bias` -> `nin_shortcut.bias` (VAE)."""
    module, param = rest.rsplit(".", 1)
    return f"{names.get(module, module)}.{param}"


def _put(out: dict[str, torch.Tensor], key: str, value: torch.Tensor, component: str) -> None:
    """Add one converted weight, refusing two weights that map to the same name."""
    if key in out:
        raise ModelLoadError(f"cannot export to a single file: two {component} weights map to '{key}'")
    out[key] = value


def _unknown_key(component: str, key: str) -> ModelLoadError:
    hint = " (unload or fuse LoRA adapters before exporting)" if "lora" in key.lower() else ""
    return ModelLoadError(f"cannot export to a single file: {component} weight '{key}' has no LDM name{hint}")


def unet_to_ldm(unet, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel weights under their LDM names (without the `model.diffusion_model.` prefix).

    `state_dict` replaces the module's own weights (e.g. with LoRA merged in); `unet` gives the layout.
    """
    blocks = _unet_block_prefixes(unet)
    out: dict[str, torch.Tensor] = {}
    for key, value in (unet.state_dict() if state_dict is None else state_dict).items():
        module, param = key.rsplit(".", 1)
        if module in _UNET_FIXED:
            _put(out, f"{_UNET_FIXED[module]}.{param}", value, "UNet")
            continue
        prefix = next((p for p in blocks if key.startswith(p)), None)
        if prefix is None:
            raise _unknown_key("UNet", key)
        ldm_prefix, is_resnet = blocks[prefix]
        rest = key[len(prefix):]
        _put(out, ldm_prefix + (_rename_resnet(rest, _UNET_RESNET_NAMES) if is_resnet else rest), value, "UNet")
    return out


# ----------------------------------------------------------------------------------------------
# VAE: diffusers -> LDM names
# ----------------------------------------------------------------------------------------------

_VAE_FIXED = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    **{name: name for name in (
        "encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv", "post_quant_conv",
    )},
}
_VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_KEY = re.compile(
    r"^(?P<side>encoder|decoder)\."
    r"(?:(?P<kind>down_blocks|up_blocks)\.(?P<block>\d+)\.(?P<sub>resnets\.\d+|downsamplers\.0|upsamplers\.0)"
    r"|mid_block\.(?P<mid>resnets\.\d+|attentions\.0))"
    r"\.(?P<rest>.+)$"
)


def _vae_attention(side: str, rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Mid-block attention: linear q/k/v/proj_out become LDM's 1x1 convolutions."""
    module, param = rest.rsplit(".", 1)
    if module not in _VAE_ATTN_NAMES:
        raise _unknown_key("VAE", f"{side}.mid_block.attentions.0.{rest}")
    if module != "group_norm" and param == "weight" and value.ndim == 2:
        value = value[:, :, None, None]  # (C_out, C_in) -> (C_out, C_in, 1, 1)
    return f"{side}.mid.attn_1.{_VAE_ATTN_NAMES[module]}.{param}", value


def _vae_block_key(m: re.Match, n_up: int) -> str:
    side, kind, block, sub, rest = m["side"], m["kind"], m["block"], m["sub"], m["rest"]
    if m["mid"] is not None:  # mid resnets: resnets.0 -> block_1, resnets.1 -> block_2
        k = int(m["mid"].split(".")[1])
        return f"{side}.mid.block_{k + 1}.{_rename_resnet(rest, _VAE_RESNET_NAMES)}"
    # LDM numbers the decoder's levels from the lowest resolution up: diffusers' up_blocks reversed.
    level = int(block) if kind == "down_blocks" else n_up - 1 - int(block)
    stage = "down" if kind == "down_blocks" else "up"
    if sub.startswith("resnets."):
        return f"{side}.{stage}.{level}.block.{sub.split('.')[1]}.{_rename_resnet(rest, _VAE_RESNET_NAMES)}"
    sampler = "downsample" if kind == "down_blocks" else "upsample"
    return f"{side}.{stage}.{level}.{sampler}.{rest}"


def vae_to_ldm(vae, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """AutoencoderKL weights under their LDM names (without the `first_stage_model.` prefix)."""
    n_up = len(vae.decoder.up_blocks)
    out: dict[str, torch.Tensor] = {}
    for key, value in (vae.state_dict() if state_dict is None else state_dict).items():
        module, param = key.rsplit(".", 1)
        m = _VAE_KEY.match(key)
        if module in _VAE_FIXED:
            new_key = f"{_VAE_FIXED[module]}.{param}"
        elif m is None:
            raise _unknown_key("VAE", key)
        elif m["mid"] is not None and m["mid"].startswith("attentions"):
            new_key, value = _vae_attention(m["side"], m["rest"], value)
        else:
            new_key = _vae_block_key(m, n_up)
        _put(out, new_key, value, "VAE")
    return out


# ----------------------------------------------------------------------------------------------
# Text encoders: diffusers/transformers -> CLIP (HF layout) or OpenCLIP names
# ----------------------------------------------------------------------------------------------


def clip_text_state_dict(text_encoder, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's weights named `text_model.*` (+ `text_projection.weight`).

    transformers >= 5.6 flattened `CLIPTextModel` (no `text_model.` prefix) while
    `CLIPTextModelWithProjection` still wraps it; single files always use the wrapped names.
    """
    out = {}
    for key, value in (text_encoder.state_dict() if state_dict is None else state_dict).items():
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = value
    return out


_OPENCLIP_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER_NAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def open_clip_state_dict(text_encoder, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A CLIP text encoder in OpenCLIP's layout: fused q/k/v `in_proj`, `resblocks`, `ln_final`.

    `text_projection` is stored as OpenCLIP's (hidden, projection) matrix, the transpose of the
    diffusers Linear weight.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in clip_text_state_dict(text_encoder, state_dict).items():
        if key in _OPENCLIP_FIXED:
            out[_OPENCLIP_FIXED[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # (proj, hidden) -> (hidden, proj)
        elif (m := _CLIP_LAYER.match(key)) is not None:
            layer, module, param = m.groups()
            if module in _QKV:
                qkv.setdefault((layer, param), {})[_QKV[module]] = value
            elif module in _OPENCLIP_LAYER_NAMES:
                out[f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER_NAMES[module]}.{param}"] = value
            else:
                raise _unknown_key("text encoder", key)
        else:
            raise _unknown_key("text encoder", key)
    for (layer, param), parts in qkv.items():
        # (3 * hidden, hidden) weight / (3 * hidden,) bias, in q, k, v order
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _prefixed(prefix: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state_dict.items()}


# ----------------------------------------------------------------------------------------------
# Whole pipeline
# ----------------------------------------------------------------------------------------------


def _pipeline_family(pipe) -> str:
    from .base_models import detect_family

    return detect_family(pipe)


def _text_encoder_state_dict(pipe, family: str, sds: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    te, te2 = sds.get("text_encoder"), sds.get("text_encoder_2")
    if family == "sdxl":
        return {
            **_prefixed(SDXL_TEXT_PREFIX, clip_text_state_dict(pipe.text_encoder, te)),
            **_prefixed(SDXL_TEXT2_PREFIX, open_clip_state_dict(pipe.text_encoder_2, te2)),
        }
    if family == "sd2":
        return _prefixed(SD2_TEXT_PREFIX, open_clip_state_dict(pipe.text_encoder, te))
    return _prefixed(SD1_TEXT_PREFIX, clip_text_state_dict(pipe.text_encoder, te))


def to_single_file_state_dict(pipe, state_dicts: dict[str, dict[str, torch.Tensor]] | None = None
                              ) -> dict[str, torch.Tensor]:
    """All weights of an SD 1.x / 2.x / XL pipeline under their original single-file names.

    The tensors are the pipeline's own (no copy) except the fused OpenCLIP q/k/v projections.
    `state_dicts` ({component: diffusers-named state dict}) replaces the weights of those components,
    e.g. with a LoRA stack merged in (see `pipelines.stack.AdapterStack.bake_checkpoint`).
    """
    sds = state_dicts or {}
    unknown = set(sds) - {"unet", "vae", "text_encoder", "text_encoder_2"}
    if unknown:
        raise ValueError(f"to_single_file_state_dict: no such component(s) {sorted(unknown)}")
    family = _pipeline_family(pipe)
    out = {
        **_prefixed(UNET_PREFIX, unet_to_ldm(pipe.unet, sds.get("unet"))),
        **_prefixed(VAE_PREFIX, vae_to_ldm(pipe.vae, sds.get("vae"))),
    }
    out.update(_text_encoder_state_dict(pipe, family, sds))  # distinct prefixes: no collision possible
    return out


def _architecture(pipe, family: str) -> str:
    """modelspec.architecture: SD 2.x v-prediction models are the '768-v' variant."""
    if family == "sd2" and pipe.scheduler.config.get("prediction_type") == "v_prediction":
        return ARCHITECTURES["sd2-v"]
    return ARCHITECTURES[family]


def _component_config(component) -> dict | None:
    """A model's or scheduler's config as save_pretrained writes it; None for anything else."""
    from diffusers import ModelMixin, SchedulerMixin
    from transformers import PreTrainedModel

    if isinstance(component, (ModelMixin, SchedulerMixin)):
        return json.loads(component.to_json_string())
    if isinstance(component, PreTrainedModel):
        return json.loads(component.config.to_json_string(use_diff=False))
    return None


def pipeline_configs(pipe) -> dict[str, dict]:
    """Relative config file path -> JSON content of a diffusers folder, minus weights and tokenizers.

    Components whose weights are not in a single file (safety checker, image encoder...) are
    recorded as absent (`[null, null]`) in model_index.json.
    """
    from diffusers import SchedulerMixin

    index = {k: v for k, v in json.loads(pipe.to_json_string()).items() if not k.startswith("_name")}
    files: dict[str, dict] = {}
    for name, component in pipe.components.items():
        if component is None or _is_tokenizer(component):
            continue
        cfg = _component_config(component)
        if cfg is None or name not in _SINGLE_FILE_COMPONENTS:
            index[name] = [None, None]
            continue
        filename = "scheduler_config.json" if isinstance(component, SchedulerMixin) else "config.json"
        files[f"{name}/{filename}"] = cfg
    return {"model_index.json": index, **files}


def _is_tokenizer(component) -> bool:
    from transformers import PreTrainedTokenizerBase

    return isinstance(component, PreTrainedTokenizerBase)


def single_file_metadata(pipe, family: str, title: str) -> dict[str, str]:
    """modelspec keys that A1111/ComfyUI tools read, plus the diffusers configs to load it back."""
    from .schedule import modelspec_prediction_type

    resolution = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _architecture(pipe, family),
        "modelspec.implementation": _IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        CONFIG_METADATA_KEY: json.dumps(pipeline_configs(pipe), sort_keys=True),
    }
    pred = modelspec_prediction_type(pipe.scheduler.config.get("prediction_type"))
    if pred:
        meta["modelspec.prediction_type"] = pred
    return meta


def save_single_file(pipe, path: str | os.PathLike, metadata: dict[str, str] | None = None,
                     state_dicts: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the pipeline as one original-layout `.safetensors` checkpoint (atomically).

    `metadata` adds to (and may override the modelspec keys of) the embedded metadata;
    `state_dicts` replaces components' weights (see `to_single_file_state_dict`).
    """
    path = Path(path)
    family = _pipeline_family(pipe)
    meta = single_file_metadata(pipe, family, title=path.stem)
    meta.update({k: v for k, v in (metadata or {}).items() if k != CONFIG_METADATA_KEY})
    from .schedule import marker_tensors, model_schedule

    # AUTOMATIC1111 and ComfyUI read a v-prediction / zero-terminal-SNR model from these empty tensors
    state = {**to_single_file_state_dict(pipe, state_dicts), **marker_tensors(*model_schedule(pipe))}
    return save_safetensors(state, path, metadata=meta)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def detect_family_from_single_file_keys(keys: Iterable[str], path: str | os.PathLike | None = None) -> str:
    """'sd1', 'sd2' or 'sdxl' from a single-file checkpoint's tensor names."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1."):
        return "sdxl"
    if has(SD2_TEXT_PREFIX + "transformer.resblocks"):
        return "sd2"
    if has(SD1_TEXT_PREFIX + "text_model"):
        return "sd1"
    what = "not an SD 1.x/2.x/XL checkpoint"
    if any("lora_" in k for k in keys):
        what = "a LoRA adapter, not a base model"
    elif has("conditioner.embedders.0.model."):
        what = "an SDXL refiner, which is not supported"
    raise ModelLoadError(f"{path or 'checkpoint'}: {what} (no SD 1.x, SD 2.x or SDXL text encoder weights found)")


def _header_and_metadata(path: Path) -> tuple[dict, dict[str, str]]:
    """(header without metadata, metadata) of a safetensors file; ({}, {}) for an allowed pickle."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return {}, {}
    try:
        header, _ = read_header(path)
    except FileNotFoundError as e:
        raise ModelLoadError(str(e)) from None
    meta = dict(header.pop("__metadata__", None) or {})
    return header, meta


def _embedded_configs(path: Path, meta: dict[str, str]) -> dict[str, dict] | None:
    """The validated `lora_studio.diffusers_config` of a file, or None when it has none."""
    raw = meta.get(CONFIG_METADATA_KEY)
    if raw is None:
        return None
    try:
        configs = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: embedded '{CONFIG_METADATA_KEY}' is not valid JSON ({e})") from None
    if not isinstance(configs, dict) or not isinstance(configs.get("model_index.json"), dict):
        raise ModelLoadError(f"{path}: embedded '{CONFIG_METADATA_KEY}' has no model_index.json")
    for rel, content in configs.items():
        # The names become files in a temporary folder: never let them escape it.
        if not _CONFIG_FILE.fullmatch(rel) or not isinstance(content, dict):
            raise ModelLoadError(f"{path}: embedded config has an invalid entry '{rel}'")
    for name, entry in configs["model_index.json"].items():
        if not isinstance(entry, list):
            continue  # a pipeline option such as requires_safety_checker
        if not _COMPONENT_NAME.fullmatch(name) or len(entry) != 2 or entry[0] not in _ALLOWED_LIBRARIES:
            raise ModelLoadError(f"{path}: embedded model_index.json has an invalid component '{name}'")
    return configs


def _tokenizer_slots(index: dict) -> list[str]:
    """Component names that model_index.json declares as transformers tokenizers."""
    return [k for k, v in index.items() if isinstance(v, list) and v[0] == "transformers" and "Tokenizer" in str(v[1])]


def write_config_folder(configs: dict[str, dict], folder: Path, tokenizer_dir: str | os.PathLike | None) -> Path:
    """Write embedded configs (and tokenizer files) as a diffusers config folder for from_single_file.

    `tokenizer_dir` is either one tokenizer folder (used for every tokenizer of the pipeline) or a
    folder with `tokenizer/` (and `tokenizer_2/`) subfolders, such as a diffusers pipeline folder.
    """
    for rel, content in configs.items():
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(content, indent=2))
    slots = _tokenizer_slots(configs["model_index.json"])
    if slots and tokenizer_dir is None:
        raise ModelLoadError("no tokenizer folder given (tokenizer_dir) for the embedded configs")
    for slot in slots:
        src = Path(tokenizer_dir)
        src = src / slot if (src / slot).is_dir() else src
        if not (src / "tokenizer_config.json").is_file() and not (src / "vocab.json").is_file():
            raise ModelLoadError(f"{src}: not a tokenizer folder (no tokenizer_config.json or vocab.json)")
        shutil.copytree(src, folder / slot, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


def _default_config_dir(path: Path, header: dict) -> str:
    """The locally cached diffusers config that diffusers would pick for a standard checkpoint.

    Resolved here, offline, so that diffusers never falls back to downloading it.
    """
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from huggingface_hub import snapshot_download

    shapes = {k: torch.empty(v["shape"], device="meta") for k, v in header.items()}
    repo = fetch_diffusers_config(shapes)["pretrained_model_name_or_path"]
    try:
        patterns = ["*.json", "**/*.json", "*.txt", "**/*.txt"]
        return snapshot_download(repo, local_files_only=True, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not cached
        raise ModelLoadError(
            f"{path}: no config folder given, no configs embedded in the file, and the standard configs "
            f"('{repo}') are not in the local Hugging Face cache; pass a diffusers config folder"
        ) from None


def _read_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Only the tensors whose names start with `prefix` (safetensors reads just those)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        sd, _ = load_safetensors(path, allow_pickle=True)
        return {k: v for k, v in sd.items() if k.startswith(prefix)}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _load_sdxl_text_encoder_2(path: Path, config_dir: str, dtype: torch.dtype | None):
    """SDXL's OpenCLIP encoder, strictly loaded from `conditioner.embedders.1.model.*`.

    diffusers picks a CLIP text encoder's weights by width: when both encoders have the same width
    (tiny test models) it would load the CLIP-L weights into text_encoder_2. Loading it here with
    diffusers' own OpenCLIP conversion avoids that and checks that no weight is missing.
    """
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    ckpt = _read_prefixed(path, SDXL_TEXT2_PREFIX)
    cfg = CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder_2", local_files_only=True)
    with init_empty_weights():
        model = CLIPTextModelWithProjection(cfg)
    state = convert_open_clip_checkpoint(model, ckpt, prefix=SDXL_TEXT2_PREFIX)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype or torch.float32).eval()


def _meta_weights(pipe) -> list[str]:
    """Names of weights that from_single_file left uninitialised (missing in the file)."""
    missing = []
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            missing += [f"{name}.{n}" for n, p in component.named_parameters() if p.is_meta]
    return missing


def _from_single_file(path: Path, pipeline_cls, config_dir: str, dtype: torch.dtype | None):
    """diffusers' from_single_file with a local config folder: no hub access at all."""
    kwargs: dict = {"config": str(config_dir), "local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    index = pipeline_cls.load_config(str(config_dir))
    if (index.get("text_encoder_2") or [None])[0] is not None:
        kwargs["text_encoder_2"] = _load_sdxl_text_encoder_2(path, str(config_dir), dtype)
    return pipeline_cls.from_single_file(str(path), **kwargs)


def load_single_file(
    path: str | os.PathLike,
    pipeline_cls,
    config_dir: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    dtype: torch.dtype | None = None,
):
    """Load an original-layout checkpoint as a diffusers pipeline, without network access.

    Configs come from `config_dir` (a diffusers folder), else from the configs embedded by
    `save_single_file` (with tokenizers from `tokenizer_dir`), else from diffusers' standard
    configs if they are in the local Hugging Face cache. `dtype` is an alias of `torch_dtype`.
    Errors raise ModelLoadError (or CorruptWeightsError for a damaged file) naming the file.
    """
    path = Path(path)
    dtype = dtype if dtype is not None else torch_dtype
    refuse_pickle(path, allow_pickle)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    header, meta = _header_and_metadata(path)
    configs = _embedded_configs(path, meta) if config_dir is None else None
    standard_config = config_dir is None and configs is None
    with tempfile.TemporaryDirectory(prefix="lora_studio_cfg_") as tmp:
        if config_dir is None and configs is not None:
            try:
                config_dir = write_config_folder(configs, Path(tmp), tokenizer_dir)
            except ModelLoadError as e:
                raise ModelLoadError(f"{path}: {e}") from None
        elif config_dir is None:
            config_dir = _default_config_dir(path, header)
        elif not Path(config_dir).is_dir():
            raise ModelLoadError(f"{config_dir}: config folder for {path.name} does not exist")
        try:
            pipe = _from_single_file(path, pipeline_cls, str(config_dir), dtype)
        except (CorruptWeightsError, ModelLoadError):
            raise
        except Exception as e:  # noqa: BLE001 - diffusers/transformers/safetensors raise many types
            # diffusers builds models on the meta device; a weight absent from the file stays there.
            why = "weights are missing from the file; " if "meta tensor" in str(e) else ""
            raise ModelLoadError(
                f"{path}: could not load as a {pipeline_cls.__name__} ({why}{type(e).__name__}: {e})"
            ) from None
    missing = _meta_weights(pipe)
    if missing:
        raise ModelLoadError(f"{path}: {len(missing)} weights are missing from the file, e.g. {missing[:3]}")
    _apply_file_schedule(pipe, path, header, meta, standard_config)
    return pipe


def _apply_file_schedule(pipe, path: Path, header: dict, meta: dict[str, str], standard_config: bool) -> None:
    """The file's own marks of v-prediction and zero terminal SNR (pipelines.schedule) over its config's; what was
    read, and from where, is kept as the pipeline's `_schedule_note`."""
    from .schedule import apply_schedule, file_schedule, model_schedule, schedule_label

    pred, zsnr, why = file_schedule(path, header.keys(), meta, _pipeline_family(pipe), standard_config)
    if not why:
        return
    before = model_schedule(pipe)
    apply_schedule(pipe, pred, zsnr)
    if model_schedule(pipe) != before:
        pipe.__dict__["_schedule_note"] = f"{path.name}: {schedule_label(pipe)}, read from {why}"
