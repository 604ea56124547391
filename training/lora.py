"""Attach LoRA (or LyCORIS' LoHa / LoKr, via peft) to a pipeline's UNet and text encoder(s); read and write
its weights.

Adapter state dicts use the diffusers/peft key format: `unet.<module>.lora_A.weight`,
`text_encoder.<module>.lora_B.weight` (SDXL: also `text_encoder_2.`); LoHa / LoKr weights peft's names
(`unet.<module>.hada_w1_a`, `….lokr_w2_b`).
"""

from __future__ import annotations

import functools
import math

import torch

from pipelines.errors import ConfigError, IncompatibleAdapterError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


# the names of trainable adapter weights, per network type (peft's LoRA, LoHa and LoKr layers)
PARAM_MARKERS = ("lora_", "hada_", "lokr_", "dora_magnitude")
DORA_PARAM = "dora_magnitude"  # a LoRA layer's DoRA lengths per input channel, (1, in[, 1, 1]) as LyCORIS stores them
DORA_KEY = "dora_scale"  # their key in our state dicts and files (kohya's / LyCORIS' name)
NETWORK_LABELS = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


def lora_config(rank: int, alpha: float, targets: list[str], dropout: float,
                rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                network: str = "lora", lokr_factor: int = -1):
    """peft's config of the network: LoRA, or LyCORIS' LoHa / LoKr (convolutions flattened, without Tucker
    cores, as LyCORIS' default; LoKr's first factor full, as LyCORIS' default decompose_both=False)."""
    common = dict(r=rank, target_modules=list(targets), rank_pattern=dict(rank_pattern or {}),
                  alpha_pattern=dict(alpha_pattern or {}))
    if network == "loha":
        from peft import LoHaConfig

        return LoHaConfig(alpha=alpha, init_weights=True, use_effective_conv2d=False, **common)
    if network == "lokr":
        from peft import LoKrConfig

        return LoKrConfig(alpha=alpha, init_weights=True, use_effective_conv2d=False, decompose_both=False,
                          decompose_factor=lokr_factor, **common)
    from peft import LoraConfig

    return LoraConfig(lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True, **common)


def full_lokr_scale(module: torch.nn.Module) -> None:
    """A LoKr layer whose two factors are both full matrices (a layer too small to decompose at this rank) has
    no rank: AUTOMATIC1111, ComfyUI and LyCORIS apply it at scale 1 whatever its alpha, where peft uses
    alpha/r. Such layers train at scale 1 here too (alpha = r), so the file means what was trained."""
    from peft.tuners.lokr.layer import LoKrLayer

    for m in module.modules():
        if isinstance(m, LoKrLayer):
            for name in m.lokr_w2:  # lokr_w2 holds the adapters whose second factor is full
                if name in m.lokr_w1:
                    m.alpha[name] = m.r[name]
                    m.scaling[name] = 1.0


def targeted(name: str, targets: list[str]) -> bool:
    """peft's rule: a target names a module by its full name or a dotted suffix of it."""
    return any(name == t or name.endswith("." + t) for t in targets)


def spatial_convs(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Names of the targeted Conv2d layers with a kernel larger than 1x1 (the ResNet 3x3 convolutions: kohya's
    LoCon `conv_dim` layers; 1x1 convolutions such as SD 1.x's proj_in count as linear layers)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
            and targeted(n, targets)]


def _check_module_targets(model: torch.nn.Module, targets: list[str], field: str) -> None:
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for t in targets:
        if not any(targeted(n, [t]) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ConfigError(f"{field}: '{t}' names no Linear or Conv2d layer of the {model.__class__.__name__} "
                              f"(layer names end in e.g. {', '.join(leaves[:12])})")


def check_targets(pipe, unet_targets: list[str], text_targets: list[str] | None) -> None:
    """Every target must name some Linear/Conv2d layer (peft's suffix match) of the UNet and of each text
    encoder that gets LoRA: a typo must not quietly train fewer layers. Cheap; call it before slow work."""
    _check_module_targets(pipe.unet, unet_targets, "unet_targets")
    for name in TEXT_ENCODERS:
        if text_targets and getattr(pipe, name, None) is not None:
            _check_module_targets(getattr(pipe, name), text_targets, "text_targets")


def attach(pipe, rank: int, alpha: float, unet_targets: list[str], text_targets: list[str] | None,
           dropout: float = 0.0, conv_rank: int | None = None, conv_alpha: float | None = None,
           network: str = "lora", lokr_factor: int = -1, dora: bool = False) -> dict[str, object]:
    """Inject LoRA (or LoHa / LoKr) layers; returns {component prefix: peft config}. Base weights stay frozen.
    `conv_rank`/`conv_alpha`: the UNet's 3x3 convolutions get these instead (None: rank and alpha)."""
    from peft import inject_adapter_in_model

    configs: dict[str, object] = {}
    pipe.unet.requires_grad_(False)
    convs = spatial_convs(pipe.unet, unet_targets) if conv_rank or conv_alpha else []
    # peft matches pattern keys as name suffixes: full module names pick exactly these layers
    cfg = lora_config(rank, alpha, unet_targets, dropout,
                      rank_pattern={n: conv_rank for n in convs} if conv_rank else None,
                      alpha_pattern={n: conv_alpha for n in convs} if conv_alpha else None,
                      network=network, lokr_factor=lokr_factor)
    if network == "lora":
        pipe.unet.add_adapter(cfg)
    else:  # diffusers' add_adapter takes LoRA configs only
        inject_adapter_in_model(cfg, pipe.unet, adapter_name="default")
    configs["unet"] = cfg
    for name in TEXT_ENCODERS:
        te = getattr(pipe, name, None)
        if te is None:
            continue
        te.requires_grad_(False)
        if text_targets:
            tcfg = lora_config(rank, alpha, text_targets, dropout, network=network, lokr_factor=lokr_factor)
            inject_adapter_in_model(tcfg, te, adapter_name="default")
            configs[name] = tcfg
    pipe.vae.requires_grad_(False)
    if network == "lokr":
        for comp in configs:
            full_lokr_scale(getattr(pipe, comp))
    if dora:
        for comp in configs:
            add_dora(getattr(pipe, comp))
    # the LoRA weights train in fp32 whatever the base's dtype: diffusers' add_adapter creates them in the
    # UNet's dtype (fp16 on a GPU, bf16 under bf16 mixed precision), where AdamW's small updates round away
    # and fp16 gradients cannot be unscaled
    for comp in configs:
        for p in trainable_params(getattr(pipe, comp)):
            p.data = p.data.float()
    return configs


def _dora_lengths(layer) -> torch.Tensor:
    """c = m / ‖W + ΔW‖ per input channel (ΔW at the layer's weight-1 scale), the factor DoRA gives each
    input: W_dora = (W + ΔW) · diag(c), as AUTOMATIC1111 and ComfyUI apply a per-input `dora_scale`."""
    w = layer.get_base_layer().weight
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in[, k, k]), (out, r[, 1, 1])
    delta = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(w.shape) * layer._dora_unit
    from pipelines.dora import column_norms

    return getattr(layer, DORA_PARAM).reshape(-1) / column_norms(w.float() + delta.float())  # (in,)


def _dora_on(layer) -> bool:
    return not layer.disable_adapters and not layer.merged and "default" in layer.active_adapters


def _channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (v.view(1, -1, 1, 1) if x.ndim == 4 else v).to(x.dtype)


def _dora_base_hook(layer, module, args):
    """The base layer's input times u = 1 + w·(c − 1), w the layer's weight (1 while training; the weight
    check's 0.5…): W·diag(u) is the base's part of W + w·(W_dora − W), A1111's blend of a DoRA at weight w."""
    if not _dora_on(layer):
        layer.__dict__.pop("_dora_c", None)
        return None
    if torch.is_grad_enabled():
        c = _dora_lengths(layer)
    else:  # samples and the weight check: the lengths change only when the weights do
        key = tuple(t._version for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                         getattr(layer, DORA_PARAM))) + tuple(id(t) for t in (
                                             layer.lora_A["default"].weight, getattr(layer, DORA_PARAM)))
        cached = layer.__dict__.get("_dora_cache")
        if cached is None or cached[0] != key:
            cached = (key, _dora_lengths(layer))
            layer._dora_cache = cached
        c = cached[1]
    layer._dora_c = c
    weight = float(layer.scaling["default"]) / layer._dora_unit
    x = args[0]
    return (x * _channel_view(1.0 + weight * (c - 1.0), x), *args[1:])


def _dora_lora_hook(layer, module, args):
    """The LoRA branch's input times c (computed by the base hook of this forward): w·ΔW·diag(c)."""
    c = layer.__dict__.pop("_dora_c", None)
    if c is None:
        return None
    x = args[0]
    return (x * _channel_view(c, x), *args[1:])


def add_dora(model: torch.nn.Module) -> int:
    """Make every LoRA layer of `model` a DoRA layer with per-input-channel lengths (initialised to the base
    weight's, so training starts from the base model); returns how many layers."""
    from peft.tuners.lora import LoraLayer

    from pipelines.dora import column_norms

    n = 0
    for _, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A or hasattr(layer, DORA_PARAM):
            continue
        w = layer.get_base_layer().weight.detach().float()
        norm = column_norms(w)  # (in,)
        setattr(layer, DORA_PARAM, torch.nn.Parameter(norm.reshape(1, -1, *[1] * (w.ndim - 2)).contiguous()))
        layer._dora_unit = float(layer.scaling["default"])
        layer.get_base_layer().register_forward_pre_hook(functools.partial(_dora_base_hook, layer))
        layer.lora_A["default"].register_forward_pre_hook(functools.partial(_dora_lora_hook, layer))
        n += 1
    return n


def dora_layers(module: torch.nn.Module):
    """(name, layer) of the DoRA layers of a component."""
    for name, m in module.named_modules():
        if hasattr(m, DORA_PARAM) and isinstance(getattr(m, DORA_PARAM), torch.nn.Parameter):
            yield name, m


@torch.no_grad()
def cap_update_norms(modules: list[torch.nn.Module], max_norm: float) -> tuple[int, float, float]:
    """Max-norm regularisation (kohya's --scale_weight_norms): every LoRA layer whose update ΔW = scale·B·A
    has a Frobenius norm above `max_norm` gets A and B each multiplied by sqrt(max_norm / norm), so that its
    update's norm is `max_norm` and its direction unchanged. Returns (layers scaled, mean and largest norm of
    the updates after it). The norm comes from two rank×rank products, never ΔW itself."""
    from peft.tuners.lora import LoraLayer

    scaled, norms = 0, []
    for module in modules:
        for layer in module.modules():
            if not isinstance(layer, LoraLayer) or "default" not in layer.lora_A:
                continue
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            a2, b2 = a.reshape(a.shape[0], -1).float(), b.reshape(b.shape[0], -1).float()  # (r, in·k·k), (out, r)
            norm = float(((a2 @ a2.T) * (b2.T @ b2)).sum().clamp_min(0).sqrt()) * abs(layer.scaling["default"])
            if norm > max_norm:
                ratio = math.sqrt(max_norm / norm)
                a.mul_(ratio)
                b.mul_(ratio)
                scaled += 1
                norm = max_norm
            norms.append(norm)
    return scaled, (sum(norms) / len(norms) if norms else 0.0), max(norms, default=0.0)


def trainable_params(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if any(m in n for m in PARAM_MARKERS) and p.requires_grad]


def lora_state_dict(pipe, components: list[str]) -> dict[str, torch.Tensor]:
    """The adapter weights of the given components, with their prefixes."""
    from peft import get_peft_model_state_dict

    out: dict[str, torch.Tensor] = {}
    for comp in components:
        sd = get_peft_model_state_dict(getattr(pipe, comp), adapter_name="default")
        out.update({f"{comp}.{k}": v.detach().float().cpu().clone() for k, v in sd.items()
                    if not k.endswith("." + DORA_PARAM)})  # peft hands on every trainable tensor: ours below
        for name, layer in dora_layers(getattr(pipe, comp)):
            out[f"{comp}.{name}.{DORA_KEY}"] = getattr(layer, DORA_PARAM).detach().float().cpu().clone()
    return out


def module_alphas(pipe, components: list[str]) -> dict[str, float]:
    """{module (our canonical name): alpha} of the attached layers, as they train (a LoKr of two full factors:
    its rank, see full_lokr_scale)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from pipelines.adapters import _canon_module

    out: dict[str, float] = {}
    for comp in components:
        for name, m in getattr(pipe, comp).named_modules():
            if isinstance(m, BaseTunerLayer):
                alphas = getattr(m, "alpha", None) or getattr(m, "lora_alpha", None) or {}
                if "default" in alphas:
                    out[_canon_module(f"{comp}.{name}")] = float(alphas["default"])
    return out


def lycoris_as_peft(pipe, components: list[str], state_dict: dict[str, torch.Tensor], family: str | None,
                    source: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A LoHa / LoKr file in LyCORIS' kohya naming (ours, or LyCORIS') as peft weights for the layers attached
    to this pipeline, with each module's alpha; a module this run has no layer for is an error naming it."""
    from pipelines.adapters import canonical_peft_keys, kohya_names, lycoris_param
    from pipelines.single_file import unet_layout

    live = canonical_peft_keys(lora_state_dict(pipe, components))
    modules = {lycoris_param(k)[0] for k in live if lycoris_param(k)}
    is_sdxl = family == "sdxl" or "text_encoder_2" in components
    module_of = {v: k for k, v in kohya_names(modules, is_sdxl=is_sdxl, layout=unet_layout(pipe.unet)).items()}
    sd: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, val in state_dict.items():
        name, _, param = key.partition(".")
        if name not in module_of:
            raise IncompatibleAdapterError(f"{source}: module '{name}' is not one this run trains (network, "
                                           "targets or base model differ)")
        if param == "alpha":
            alphas[module_of[name]] = float(val.float().reshape(-1)[0])
        else:
            sd[f"{module_of[name]}.{param}"] = val
    return sd, alphas


def adapter_as_peft(pipe, state_dict: dict[str, torch.Tensor], meta: dict[str, str], source: str = "the adapter",
                    network: str = "lora", components: list[str] | None = None, family: str | None = None,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """An adapter file of any supported layout (ours: kohya keys; older files: peft keys) as a peft state
    dict for this pipeline, with each module's alpha. A LoHa / LoKr file continues a run of that network."""
    from pipelines.adapters import magnitudes_as_peft
    from pipelines.lycoris import is_lycoris

    from pipelines.dora import take_magnitudes

    kind = "lora"
    rest, mags = take_magnitudes(state_dict)
    if is_lycoris(rest):  # one LyCORIS type throughout, or mixed / another (CP LoCon, …)
        params = {k.rpartition(".")[2] for k in rest} - {"alpha", "weight"}
        kinds = {p.split("_")[0] for p in params}
        kind = {"hada": "loha", "lokr": "lokr"}.get(kinds.pop(), "other") if len(kinds) == 1 else "other"
        kind = "other" if mags else kind  # a LoHa / LoKr with DoRA lengths: LyCORIS' dora_wd, not trained here
    if kind != network:
        label = {"lora": "a LoRA", "loha": "a LoHa", "lokr": "a LoKr", "other": "a LyCORIS (mixed or other-type)"}[kind]
        hint = (f"continue it with network '{kind}'" if kind in NETWORK_LABELS
                else "only LoRA, LoHa and LoKr files can be trained further (generation reads it)")
        raise IncompatibleAdapterError(f"{source}: {label} adapter cannot be trained further as {network}; {hint}")
    if network != "lora":
        return lycoris_as_peft(pipe, components or [], state_dict, family, source)
    lpb = pipe.unet.config.layers_per_block
    return magnitudes_as_peft(state_dict, meta, unet_layers_per_block=lpb[0] if isinstance(lpb, (list, tuple)) else lpb)


def check_alphas(state_dict: dict[str, torch.Tensor], alphas: dict[str, float], alpha: float, conv_alpha: float,
                 source: str, live: dict[str, float] | None = None) -> None:
    """Continuing an adapter needs its alphas: the same weights under another alpha would be another scale.
    `live`: the attached layers' own alphas (LoHa / LoKr, whose weights do not tell a convolution)."""
    from pipelines.adapters import _strip_text_model

    from pipelines.adapters import lycoris_dim

    live = {_strip_text_model(k): v for k, v in (live or {}).items()}
    for module, a in alphas.items():
        if live:
            params = {k[len(module) + 1:]: v for k, v in state_dict.items() if k.startswith(module + ".")}
            if lycoris_dim(params) is None:  # a LoKr of two full factors: applied at scale 1, alpha unused
                continue
            want = live.get(_strip_text_model(module), a)
        else:
            w = state_dict[f"{module}.lora_A.weight"]
            want = conv_alpha if w.ndim == 4 and tuple(w.shape[2:]) != (1, 1) else alpha
        if abs(float(a) - float(want)) > 1e-6 * max(1.0, abs(float(want))):
            raise IncompatibleAdapterError(
                f"{source}: module {module} has alpha {float(a):g}, this run uses {float(want):g}; continue it with "
                "the alpha (and conv_alpha) it was trained with")


def load_lora_state_dict(pipe, state_dict: dict[str, torch.Tensor], components: list[str], source: str) -> None:
    """Put saved adapter weights back into attached LoRA layers (resume, train-more)."""
    from peft import set_peft_model_state_dict

    for comp in components:
        prefix = comp + "."
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not sd:
            raise IncompatibleAdapterError(f"{source}: has no '{comp}' LoRA weights to continue from")
        module = getattr(pipe, comp)
        if not hasattr(module, "text_model"):  # transformers 5 CLIPTextModel: no `text_model.` level
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        _load_magnitudes(module, sd, comp, source)
        try:
            res = set_peft_model_state_dict(module, sd, adapter_name="default")
        except RuntimeError as e:
            if "size mismatch" not in str(e):
                raise
            first = str(e).split("size mismatch for ", 1)[1].split(":", 1)[0]
            raise IncompatibleAdapterError(
                f"{source}: its LoRA ranks differ from this run's ({comp} layer {first}); continue it with the "
                "rank (and conv_rank) it was trained with") from None
        unexpected = getattr(res, "unexpected_keys", []) or []
        if unexpected:
            raise IncompatibleAdapterError(
                f"{source}: {len(unexpected)} '{comp}' key(s) do not fit this model, e.g. {unexpected[0]}"
            )


def _load_magnitudes(module: torch.nn.Module, sd: dict[str, torch.Tensor], comp: str, source: str) -> None:
    """Take the DoRA lengths out of `sd` (in place) into the layers' parameters: a DoRA run needs them for every
    layer, and a plain LoRA run refuses them."""
    mags = {k[: -len(DORA_KEY) - 1]: sd.pop(k) for k in [k for k in sd if k.endswith("." + DORA_KEY)]}
    layers = dict(dora_layers(module))
    if mags and not layers:
        raise IncompatibleAdapterError(f"{source}: it is a DoRA adapter; continue it with dora on")
    if layers and not mags:
        raise IncompatibleAdapterError(f"{source}: it is a plain LoRA adapter; continue it with dora off")
    missing = sorted(set(layers) - set(mags))
    if missing:
        raise IncompatibleAdapterError(f"{source}: its '{comp}' layer {missing[0]} has no DoRA magnitude")
    for name, value in mags.items():
        layer = layers.get(name)
        if layer is None:
            raise IncompatibleAdapterError(f"{source}: DoRA magnitude for '{comp}.{name}', a layer this run "
                                           "does not train")
        param = getattr(layer, DORA_PARAM)
        if tuple(value.shape) != tuple(param.shape):
            raise IncompatibleAdapterError(f"{source}: '{comp}.{name}' DoRA magnitude has shape {tuple(value.shape)}, "
                                           f"this run's is {tuple(param.shape)} (one length per input channel)")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
