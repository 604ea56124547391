"""`TrainConfig`: the single source of every training option (CLI, TOML file and UI all build it)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError
from pipelines.quantize import QUANTIZATIONS
from pipelines.samplers import SCHEDULERS
from pipelines.schedule import PREDICTION_TYPES
from pipelines.weights_io import PRECISIONS

from .optimizers import ADAPTIVE, OPTIMIZERS

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# LoCon-style: besides attention, the transformer blocks' in/out projections and feed-forward layers and the
# ResNet convolutions. A new object needs them: on the toy model, attention-only LoRA drew the shipped star
# in 6% of trigger images after 300 steps, these modules (rank 16, 600 steps) in 59% (bench/quality.py concept)
WIDE_UNET_TARGETS = [*ATTENTION_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
PRESETS: dict[str, dict[str, Any]] = {
    # a thing (object, character, face): trigger word as the subject, text encoder trained too
    # base preservation with the trigger's neighbours swapped in (bench/quality.py, issue 14): on a concept the
    # toy base can draw (a set of triangles called sks) fidelity 0.84 with a preservation drop of 0.02 in 4.5
    # min, where the same preset without it turned circles and squares into triangles
    "concept": {"rank": 16, "max_steps": 600, "lr_unet": 1e-3, "lr_text": 2e-4, "train_text_encoder": True,
                "instance_template": "a photo of {trigger}", "unet_targets": WIDE_UNET_TARGETS,
                "preserve_weight": 1.0, "preserve_neighbours": 8},
    # a way of drawing: trigger phrase as a style, UNet only
    "style": {"rank": 8, "max_steps": 300, "lr_unet": 1e-3, "lr_text": 0.0, "train_text_encoder": False,
              "instance_template": "in the style of {trigger}"},
    # a word (textual inversion): the trigger's vectors alone, the model untouched. On a set of the toy base's own
    # triangles called sks (bench/quality.py concept --images … --target triangle): one vector 0.97 / 0.00 with
    # the asked backgrounds kept (1.00); two vectors 0.88 / 0.00 but the set's backgrounds took over (0.06)
    "embedding": {"textual_inversion": True, "max_steps": 300, "lr_ti": 5e-3, "ti_vectors": 1,
                  "train_text_encoder": False, "instance_template": "a photo of {trigger}"},
    "custom": {},
}
# Real model families never get the toy's values (those are tuned on the toy world by bench/quality.py and
# would be far too aggressive on SD): published recipes instead.
#  - lr 1e-4, 500 steps, batch 1, constant schedule without warm-up: the diffusers DreamBooth LoRA examples
#    (examples/dreambooth/README.md and README_sdxl.md); SDXL adds gradient accumulation 4 at 1024 px and
#    trains without the text encoders ("decent results without fine-tuning the text encoders").
#  - rank 16 with alpha about half of it, and a text-encoder lr below the UNet's (1e-5): kohya sd-scripts'
#    docs/train_network.md ("--network_dim=16", "alpha ... about half the value of network_dim",
#    "--text_encoder_lr=1e-5 ... A smaller value than that for U-Net is recommended").
_REAL_CONCEPT = {"rank": 16, "alpha": 8.0, "max_steps": 500, "lr_unet": 1e-4, "lr_text": 1e-5,
                 "train_text_encoder": True, "batch_size": 1, "lr_scheduler": "constant", "warmup_steps": 0,
                 "instance_template": "a photo of {trigger}", "unet_targets": ATTENTION_TARGETS}
_REAL_STYLE = {**_REAL_CONCEPT, "lr_text": 0.0, "train_text_encoder": False,
               "instance_template": "in the style of {trigger}"}
#  - textual inversion: diffusers' examples/textual_inversion/README.md trains batch 1 with gradient accumulation
#    4 for 3000 steps at lr 5e-4 with --scale_lr (x batch x accumulation: 2e-3), constant, no warm-up, one vector
#    (its --num_vectors default)
_REAL_EMBEDDING = {"textual_inversion": True, "max_steps": 3000, "lr_ti": 2e-3, "ti_vectors": 1, "batch_size": 1,
                   "grad_accum": 4, "lr_scheduler": "constant", "warmup_steps": 0, "train_text_encoder": False,
                   "instance_template": "a photo of {trigger}"}
FAMILY_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "sd1": {"concept": _REAL_CONCEPT, "style": _REAL_STYLE, "embedding": _REAL_EMBEDDING},
    "sd2": {"concept": _REAL_CONCEPT, "style": _REAL_STYLE, "embedding": _REAL_EMBEDDING},
    "sdxl": {"concept": {**_REAL_CONCEPT, "grad_accum": 4, "lr_text": 0.0, "train_text_encoder": False},
             "style": {**_REAL_STYLE, "grad_accum": 4}, "embedding": _REAL_EMBEDDING},
}

# every field some preset sets, for some family: the Train tab swaps them on a preset change, the CLI's help says so
PRESET_KEYS = frozenset(k for v in [*PRESETS.values(), *(x for f in FAMILY_PRESETS.values() for x in f.values())]
                        for k in v)


def preset_family(base: str | None) -> str:
    """Which presets a base gets: "toy" (the embedded model and any base this small: a cross-attention width
    under 768, which no released SD model has), else "sd1", "sd2" or "sdxl". Read from the folder's configs
    or the checkpoint's header, without loading weights; a base that cannot be read (yet) gets "sd1", the
    gentlest published values, never the toy's."""
    if not base:
        return "toy"
    try:
        from pipelines.base_models import DEFAULT_BASE, _folder_family

        path = Path(base).expanduser()
        if path.resolve() == Path(DEFAULT_BASE).resolve():
            return "toy"
        if path.is_dir():
            ucfg = json.loads((path / "unet" / "config.json").read_text())
            width = ucfg.get("cross_attention_dim") or 0
            width = max(width) if isinstance(width, (list, tuple)) else width
            return "toy" if width < 768 else _folder_family(path)
        if path.is_file() and path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            from pipelines.single_file import detect_family_from_single_file_keys

            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
                family = detect_family_from_single_file_keys(keys, path)
                k = next((k for k in keys if k.endswith("attn2.to_k.weight")), None)
                if k is not None and f.get_slice(k).get_shape()[-1] < 768:
                    return "toy"
            return family
        if not path.exists() and "/" in str(base):  # a hub id
            low = str(base).lower()
            return "sdxl" if "xl" in low else "sd2" if "stable-diffusion-2" in low else "sd1"
    except Exception:  # noqa: BLE001 - unreadable here; loading the base reports it properly later
        pass
    return "sd1"


def preset_values(preset: str, family: str) -> dict[str, Any]:
    """The fields a preset sets for a base of this family (a copy: lists are never shared)."""
    vals = FAMILY_PRESETS.get(family, {}).get(preset, PRESETS.get(preset, {})) if preset != "custom" else {}
    return {k: list(v) if isinstance(v, list) else v for k, v in vals.items()}


MIXED_PRECISION = ("no", "fp16", "bf16")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")  # kohya sd-scripts' --loss_type
HUBER_SCHEDULES = ("snr", "exponential", "constant")  # its --huber_schedule
SAVE_PRECISIONS = tuple(PRECISIONS)
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
CROPS = ("center", "random")
NETWORKS = ("lora", "loha", "lokr")


def default_library_dir() -> Path:
    from pipelines.library import default_library_root

    return default_library_root()


# the UI's Advanced section, in this order; "main" fields are the Train tab's own form, "Other" catches a field
# added without a group
def _complete(data: dict) -> bool:
    """A whole saved config (a job's, a run's .toml): the dataset config's options were taken when it was made,
    so its file is not read again (it may have moved since; the run reads it when it starts)."""
    from .kohya_dataset import RUN_OPTIONS

    return "trigger" in data and set(RUN_OPTIONS.values()) <= set(data)


# the options that hold a local path (shared files write them as '~/…' or a bare name; see training.export)
PATH_FIELDS = ("images", "base", "output_dir", "class_images", "resume", "init_adapter", "vae", "mask_dir",
               "dataset_config", "embeddings_dir", "sample_prompts_file")
GROUPS = ("main", "LoRA", "Optimisation", "Data & captions", "Preservation", "Checkpoints & samples",
          "Precision & memory", "Other")
_META_KEYS = {"help", "group", "label", "min", "max", "gt", "below", "step", "choices", "flags", "list", "ui",
              "negatable", "ui_default"}


def option(default: Any = dataclasses.MISSING, *, help: str, group: str, default_factory: Any = dataclasses.MISSING,
           **meta: Any) -> Any:
    """A TrainConfig field with its description (see TrainConfig's docstring for the keys)."""
    unknown = set(meta) - _META_KEYS
    if unknown:
        raise TypeError(f"option(): unknown metadata {sorted(unknown)}")
    if group not in GROUPS:
        raise TypeError(f"option(): unknown group {group!r}")
    md = {"help": help, "group": group, **meta}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=md)
    return field(default=default, metadata=md)


@dataclass(frozen=True)
class Option:
    """One TrainConfig field as the CLI and the UI see it: its value kind and its metadata, resolved."""

    name: str
    kind: type  # bool, int, float, str or list (of str)
    optional: bool  # None allowed (unset)
    default: Any
    help: str
    group: str
    label: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    gt: float | None = None  # exclusive minimum
    below: float | None = None  # exclusive maximum
    step: float | None = None
    flags: tuple[str, ...] = ()
    list_style: str | None = None  # "comma" (module names) or "lines" (prompts; repeatable flag)
    ui: bool = True  # False: the browser app sets it itself (paths, device, overwrite)
    negatable: bool = True  # a bool flag also has --no-…
    ui_default: Any = None  # the form's first value when it differs from the default

    @property
    def on_main_form(self) -> bool:
        return self.group == "main"


@functools.cache
def train_options() -> tuple[Option, ...]:
    """Every TrainConfig field, described: the CLI's `train` options and the UI's Advanced section come from here."""
    hints = _field_types(TrainConfig)
    out = []
    for f in fields(TrainConfig):
        tp, optional = hints[f.name], False
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp, optional = [a for a in typing.get_args(tp) if a is not type(None)][0], True
        kind = list if typing.get_origin(tp) is list else tp
        m = dict(f.metadata)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        choices = m.get("choices")
        list_style = m.get("list", "comma" if kind is list else None)
        flag = "--" + f.name.replace("_", "-")
        out.append(Option(
            name=f.name, kind=kind, optional=optional, default=default, help=m.get("help", ""),
            group=m.get("group", "Other"), label=m.get("label", f.name.replace("_", " ").capitalize()),
            choices=tuple(choices) if choices is not None else None, min=m.get("min"), max=m.get("max"),
            gt=m.get("gt"), below=m.get("below"), step=m.get("step"), flags=tuple(m.get("flags", (flag,))),
            list_style=list_style, ui=m.get("ui", True), negatable=m.get("negatable", True),
            ui_default=m.get("ui_default", default)))
    return tuple(out)


@dataclass
class TrainConfig:
    """Everything that determines a LoRA training run.

    Each field's metadata is its one description: `help`, `group` (the UI's Advanced section; "main" is the
    Train tab's own form), `label`, a range (`min`/`max` inclusive, `gt` exclusive, `below` exclusive upper),
    `choices`, `flags` (command-line names, when not --field-name), `list` ("comma" or "lines"), and
    `ui=False` for what the browser app sets itself. The CLI's `train` options and the UI's Advanced section
    are generated from it (see `train_options`), and `__post_init__` checks the ranges and choices.
    """

    # ---- the run (the Train tab's main form)
    images: str = option("", group="main", label="Images",
                         help="folder of training images (subfolders too); a same-named .txt file is an image's "
                              "caption. kohya_ss' layout works as there: subfolders '10_ohwx woman' (repeats, "
                              "then the caption of images without a caption file)")
    trigger: str = option("sks", group="main", label="Trigger word",
                          help="a rare word that will mean your concept or style, e.g. sks (default: sks, or the "
                               "first word after the number of a kohya folder name)")
    name: str = option("my-lora", group="main", label="Name",
                       help="adapter name (the file will be NAME.safetensors in the library)")
    base: str | None = option(None, group="main", label="Base model",
                              help="base model: a diffusers folder, a single-file .safetensors checkpoint or a hub "
                                   "id (default: the embedded toy model)")
    vae: str | None = option(None, group="Data & captions", label="VAE file",
                             help="encode the images with this VAE instead of the base model's own (kohya's --vae; "
                                  "a .safetensors file); the samples and checks decode with it too")
    # what the base predicts, and on which schedule (pipelines.schedule): read from the model; these override it, as
    # kohya's --v_parameterization and --zero_terminal_snr say it
    prediction_type: str = option("auto", group="Optimisation", label="Prediction type",
                                  choices=("auto", *PREDICTION_TYPES),
                                  help="what the base model predicts: auto reads it from the model (its config, or "
                                       "a single file's v_pred mark); v_prediction for SD 2.x 768-v and v-pred SDXL "
                                       "models whose file does not say so (kohya's --v_parameterization)")
    zero_terminal_snr: bool = option(False, group="Optimisation", label="Zero terminal SNR",
                                     help="train on the noise schedule rescaled to zero SNR at the last timestep (Lin "
                                          "et al. 2024; kohya's --zero_terminal_snr), for ztsnr models whose file "
                                          "does not say so; v-prediction models only. A model marked ztsnr trains on "
                                          "it anyway")
    output_dir: str | None = option(None, group="main", ui=False, flags=("--output-dir", "--library"),
                                    help="adapter library folder (default: $LORA_STUDIO_HOME/loras, "
                                         "~/.local/share/lora-studio/loras)")
    overwrite: bool = option(False, group="main", ui=False, negatable=False,
                             help="replace an adapter of the same name (up to case) already in the library "
                                  "(otherwise a name in use is refused)")
    preset: str = option("custom", group="main", label="Preset", choices=tuple(PRESETS),
                         help="concept: a thing (text encoder and UNet convolutions too); style: a look (attention "
                              "only); custom: the defaults. Explicit options win over the preset's")
    # ---- data and captions
    instance_template: str = option("a photo of {trigger}", group="Data & captions", label="Caption template",
                                    help="prompt for images without a caption file; {trigger} is the trigger word")
    caption_ext: str = option(".txt", group="Data & captions", ui=False,
                              help="ending of the caption files beside the images, looked for first (the app "
                                   "writes .txt files; kohya's default is .caption)")
    caption_prefix_trigger: bool = option(True, group="Data & captions", label="Put the trigger word first",
                                          help="put the trigger word in front of captions that lack it")
    # per step and row (kohya's caption_dropout_rate / shuffle_caption / keep_tokens): an empty caption with
    # this probability; comma-separated tags shuffled, the first keep_tokens (e.g. the trigger) in place
    caption_dropout: float = option(0.0, group="Data & captions", label="Caption dropout", min=0.0, below=1.0,
                                    step=0.05,
                                    help="share of rows trained on the empty caption (kohya's caption_dropout_rate)")
    shuffle_tags: bool = option(False, group="Data & captions", label="Shuffle caption tags",
                                help="shuffle the comma-separated tags of each caption every step (kohya's "
                                     "shuffle_caption); the first keep_tokens tags stay in place")
    keep_tokens: int = option(1, group="Data & captions", label="Tags kept in place", min=0, max=1000,
                              help="with shuffled tags: this many leading tags stay first (1: the trigger)")
    repeats: int = option(1, group="Data & captions", label="Repeats", min=1, max=10000,
                          help="each image counts this many times per epoch (kohya's folder repeats)")
    resolution: int | None = option(None, group="Data & captions", label="Resolution", min=8, max=4096, step=8,
                                    help="training size in pixels, a multiple of 8 (unset: the base model's native "
                                         "resolution)")
    random_flip: bool = option(False, group="Data & captions", label="Random horizontal flip",
                               help="mirror images at random (not for text, logos or asymmetric subjects)")
    crop: str = option("center", group="Data & captions", label="Crop", choices=CROPS,
                       help="how an image is cut to the training size")
    buckets: bool = option(True, group="Data & captions", label="Aspect-ratio buckets",
                           help="aspect-ratio buckets for images of mixed shapes (otherwise every image is cropped "
                                "square)")
    # ---- prior preservation (DreamBooth)
    class_prompt: str | None = option(None, group="Preservation", label="Class prompt",
                                      help="prior preservation (DreamBooth): the class of the concept, e.g. 'a "
                                           "shape'; its images keep the class as the base draws it (empty: off)")
    class_images: str | None = option(None, group="Preservation", ui=False,
                                      help="folder of class images (default: generated with the base model and "
                                           "cached); kohya's reg_data_dir layout ('1_a photo of a woman') needs no "
                                           "class prompt")
    num_class_images: int = option(8, group="Preservation", label="Class images", min=0, max=100_000,
                                   help="how many class images to train on with the class prompt")
    prior_loss_weight: float = option(1.0, group="Preservation", label="Prior loss weight", min=0.0,
                                      help="weight of the class images' loss")
    # base preservation (self-distillation): on prompts without the trigger (every caption with the trigger
    # word taken out, the class prompt, the empty prompt that classifier-free guidance uses, and
    # preserve_prompts), the LoRA model's prediction is pulled towards the base model's own; 0 turns it off
    preserve_weight: float = option(0.0, group="Preservation", label="Base preservation weight", min=0.0,
                                    help="keep the base model's own output on prompts without the trigger (the "
                                         "captions minus the trigger word, the class prompt, the empty prompt); "
                                         "0 turns it off")
    preserve_prompts: list[str] = option(default_factory=list, group="Preservation", label="Preserve prompts",
                                         list="lines", flags=("--preserve-prompt",),
                                         help="more prompts whose images the adapter must not change (repeatable; "
                                              "one per line)")
    # contrastive preservation: the trigger's place in the captions filled with other words, whose images the
    # adapter must leave as the base draws them; without these the cheapest way to learn "sks is a star" is
    # "whatever fills this slot is a star", and every neighbouring word turns into the concept too
    preserve_neighbours: int = option(0, group="Preservation", label="Neighbour words", min=0, max=256,
                                      help="with base preservation: also keep the captions with the trigger "
                                           "swapped for this many of the base model's own words nearest to it in "
                                           "the text encoder's output (chosen at the start, listed in the log); "
                                           "0: none")
    preserve_swaps: list[str] = option(default_factory=list, group="Preservation", label="Swap words",
                                       list="comma",
                                       help="with base preservation: words put in the trigger's place in the "
                                            "captions, things the adapter must keep drawing as before (e.g. for a "
                                            "dog: cat, fox, bear)")
    preserve_images: int = option(16, group="Preservation", label="Preservation images", min=0, max=100_000,
                                  help="base-model images of those prompts (generated once, cached) to compare on")
    # ---- LoRA
    # LyCORIS' LoHa / LoKr (peft's implementations), saved in LyCORIS' kohya-named layout that AUTOMATIC1111 and
    # ComfyUI apply natively (pipelines.lycoris reads it here)
    network: str = option("lora", group="LoRA", label="Network type", choices=NETWORKS,
                          help="lora; loha: LyCORIS LoHa (Hadamard product of two low-rank pairs: more expressive "
                               "at the same rank, twice the size); lokr: LyCORIS LoKr (Kronecker product: far "
                               "smaller files)")
    # DoRA (weight-decomposed LoRA): a trained length per input channel of each adapted layer, stored as the
    # `dora_scale` that AUTOMATIC1111 and ComfyUI apply (LyCORIS' dora_wd with per-input norms)
    dora: bool = option(False, group="LoRA", label="DoRA",
                        help="with lora: also learn each layer's weight lengths per input channel (DoRA; "
                             "LyCORIS' dora_wd): often closer to a full fine-tune at the same rank; about 20% "
                             "slower to train; the file loads in AUTOMATIC1111 and ComfyUI as a DoRA")
    lokr_factor: int = option(-1, group="LoRA", label="LoKr factor", min=-1, max=1024,
                              help="with lokr: the size of the Kronecker product's first factor (LyCORIS' factor; "
                                   "-1: as square as the layer allows)")
    rank: int = option(8, group="LoRA", label="Rank", min=1, max=1024,
                       help="LoRA rank: capacity (and file size) of the adapter")
    alpha: float | None = option(None, group="LoRA", label="Alpha", gt=0.0,
                                 help="LoRA alpha; the update is scaled by alpha/rank (unset: alpha = rank)")
    # 3x3 convolutions (LoCon; kohya's conv_dim / conv_alpha): None = rank, and the same alpha/rank scale
    conv_rank: int | None = option(None, group="LoRA", label="Conv rank", min=1, max=1024,
                                   help="rank of the UNet's 3x3 convolutions when they are trained (kohya's "
                                        "conv_dim; unset: the rank)")
    conv_alpha: float | None = option(None, group="LoRA", label="Conv alpha", gt=0.0,
                                      help="their alpha (unset: the same alpha/rank scale as the rest)")
    dropout: float = option(0.0, group="LoRA", label="LoRA dropout", min=0.0, below=1.0, step=0.05,
                            help="dropout on the LoRA layers' input")
    train_text_encoder: bool = option(False, group="LoRA", label="Train the text encoder too",
                                      help="LoRA on the text encoder too (a concept's word learns its meaning)")
    unet_targets: list[str] = option(default_factory=lambda: list(ATTENTION_TARGETS), group="LoRA",
                                     label="UNet modules", list="comma",
                                     help="UNet modules that get LoRA (default to_q,to_k,to_v,to_out.0; the concept "
                                          "preset adds proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2)")
    text_targets: list[str] = option(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
                                     group="LoRA", label="Text-encoder modules", list="comma",
                                     help="text-encoder modules that get LoRA")
    # pivotal tuning (diffusers' advanced DreamBooth LoRA scripts' --train_text_encoder_ti; kohya's textual
    # inversion): the trigger word becomes new token vectors trained with the LoRA, saved in the file as
    # AUTOMATIC1111's bundled embedding (`bundle_emb.<trigger>.…`)
    pivotal: bool = option(False, group="LoRA", label="Pivotal tuning (train the trigger's embedding)",
                           help="the trigger word becomes new token vectors trained with the LoRA (textual inversion "
                                "+ LoRA, as diffusers' advanced DreamBooth scripts do); the file carries them as "
                                "AUTOMATIC1111's bundled embedding, so the word works wherever the adapter is loaded")
    ti_vectors: int = option(2, group="LoRA", label="Pivotal: vectors per trigger", min=1, max=75,
                             help="with pivotal tuning: how many token vectors the trigger word becomes (diffusers' "
                                  "num_new_tokens_per_abstraction, 2)")
    lr_ti: float = option(5e-4, group="LoRA", label="Pivotal: embedding learning rate", gt=0.0, step=1e-4,
                          help="with pivotal tuning: the learning rate of the trigger's vectors")
    ti_frac: float = option(0.5, group="LoRA", label="Pivotal: share of steps", gt=0.0, max=1.0, step=0.05,
                            help="with pivotal tuning: the vectors train over this share of the steps, then stay as "
                                 "they are while the LoRA goes on (diffusers' train_text_encoder_ti_frac, 0.5)")
    ti_init: str | None = option(None, group="LoRA", label="Pivotal: initial word",
                                 help="with pivotal tuning: start the vectors from this word's (or text's) token "
                                      "embeddings, repeated to fill them (kohya's --init_word); unset: random, scaled "
                                      "like the vocabulary's")
    # textual inversion (AUTOMATIC1111's Train tab, kohya's train_textual_inversion.py, diffusers'
    # textual_inversion.py): only the trigger's vectors are trained; the result is an embeddings-folder file
    textual_inversion: bool = option(False, group="LoRA", label="Textual inversion only (an embedding, no LoRA)",
                                     help="train only the trigger word's token vectors (ti_vectors, at lr_ti, from "
                                          "ti_init), at every step, and leave the model as it is: the result is "
                                          "NAME.safetensors in the embeddings folder (AUTOMATIC1111's and ComfyUI's "
                                          "embedding file), used by writing NAME in a prompt; it changes nothing "
                                          "else the model draws")
    embeddings_dir: str | None = option(None, group="main", ui=False, flags=("--embeddings-dir",),
                                        help="with textual inversion: the embeddings folder the file goes into "
                                             "(default: $LORA_STUDIO_HOME/models/embeddings, the folder `generate` "
                                             "and the app read)")
    clip_skip: int = option(1, group="LoRA", label="Clip skip", min=1, max=12,
                            help="train on the text encoder's layer N from the end, as AUTOMATIC1111's Clip skip "
                                 "(2 for anime models such as NovelAI-based ones; generate with the same value). "
                                 "SD 1.x/2.x; SDXL takes its own")
    # ---- optimisation
    max_steps: int = option(300, group="Optimisation", label="Steps", min=1, max=10_000_000, flags=("--steps",),
                            help="training steps")
    batch_size: int = option(4, group="Optimisation", label="Batch size", min=1, max=4096,
                             help="images per step (per process with several processes)")
    grad_accum: int = option(1, group="Optimisation", label="Gradient accumulation", min=1, max=4096,
                             help="batches added up before each optimizer step")
    lr_unet: float = option(1e-3, group="Optimisation", label="Learning rate (UNet)", gt=0.0, step=1e-4,
                            help="learning rate of the UNet's LoRA")
    lr_text: float = option(2e-4, group="Optimisation", label="Learning rate (text encoder)", min=0.0, step=1e-5,
                            help="learning rate of the text encoder's LoRA")
    lr_scheduler: str = option("constant_with_warmup", group="Optimisation", label="LR schedule",
                               choices=LR_SCHEDULERS, help="how the learning rate changes over the steps")
    warmup_steps: int = option(10, group="Optimisation", label="Warm-up steps", min=0, max=10_000_000,
                               help="steps over which the learning rate rises from 0")
    optimizer: str = option("adamw", group="Optimisation", label="Optimizer", choices=OPTIMIZERS,
                            help="adamw8bit: bitsandbytes' 8-bit AdamW (CUDA), less memory; prodigy: finds its "
                                 "own step size (learning rate 1.0, a multiplier); adafactor: transformers' "
                                 "Adafactor at a fixed rate; lion: sign updates, use a 3-10x smaller rate")
    # kohya's --optimizer_args: checked against the optimizer's own signature (training.optimizers)
    optimizer_args: list[str] = option(default_factory=list, group="Optimisation", label="Optimizer arguments",
                                       list="lines", flags=("--optimizer-arg", "--optimizer-args"),
                                       help="key=value arguments of the optimizer, as kohya's --optimizer_args "
                                            "(e.g. d_coef=2, use_bias_correction=True, betas=0.9,0.99; repeatable, "
                                            "one per line)")
    weight_decay: float = option(1e-2, group="Optimisation", label="Weight decay", min=0.0, step=1e-3,
                                 help="the optimizer's weight decay")
    max_grad_norm: float = option(1.0, group="Optimisation", label="Gradient clipping", min=0.0, step=0.1,
                                  help="clip the gradient norm to this (0: no clipping)")
    min_snr_gamma: float | None = option(5.0, group="Optimisation", label="Min-SNR gamma", min=0.0, step=0.5,
                                         help="min-SNR loss weighting (0 or unset: off)")
    masked_loss: bool = option(False, group="Data & captions", label="Masked loss",
                               help="count the loss only where an image's mask is white (kohya's --masked_loss): "
                                    "a mask from mask_dir, an IMAGE-masklabel.png beside the image, or the "
                                    "image's transparency; images without one count whole")
    dataset_config: str | None = option(None, group="Data & captions", ui=False,
                                        help="kohya sd-scripts' dataset config (.toml: [[datasets.subsets]] with "
                                             "image_dir, num_repeats, class_tokens, is_reg): the images and class "
                                             "images, and its options unless given here")
    mask_mean: str = option("picture", group="Data & captions", label="Masked loss: average over",
                            choices=("picture", "mask"),
                            help="with masked loss: the error averaged over the whole picture (kohya's way: an "
                                 "image with a small mask also weighs less) or over its mask only (OneTrainer's "
                                 "normalize_masked_area_loss: every image weighs the same)")
    mask_dir: str | None = option(None, group="Data & captions", ui=False,
                                  help="with masked loss: a folder of masks named as the images (kohya's "
                                       "conditioning_data_dir)")
    noise_offset: float = option(0.0, group="Optimisation", label="Noise offset", min=0.0, step=0.01,
                                 help="offset noise (e.g. 0.05): lets the model learn darker and brighter images")
    # kohya sd-scripts' noise and loss options, under its names, as its guides and kohya_ss configs set them
    multires_noise_iterations: int = option(0, group="Optimisation", label="Multires noise iterations", min=0,
                                            max=32,
                                            help="pyramid noise: noise at this many ever coarser resolutions added "
                                                 "to the training noise (kohya's --multires_noise_iterations; 6-10 "
                                                 "in its guides); 0: off")
    multires_noise_discount: float = option(0.3, group="Optimisation", label="Multires noise discount", gt=0.0,
                                            max=1.0, step=0.05,
                                            help="with multires noise: each coarser level's strength, relative to "
                                                 "the one before (kohya's default 0.3)")
    ip_noise_gamma: float = option(0.0, group="Optimisation", label="Input perturbation noise", min=0.0, max=1.0,
                                   step=0.01,
                                   help="extra noise in the UNet's input that the target does not have (input "
                                        "perturbation; kohya's --ip_noise_gamma, 0.1 in its paper); 0: off")
    loss_type: str = option("l2", group="Optimisation", label="Loss", choices=LOSS_TYPES,
                            help="l2: squared error; l1: absolute error; huber / smooth_l1: the scheduled pseudo-Huber "
                                 "loss (kohya's --loss_type), less pulled by outlier images")
    huber_schedule: str = option("snr", group="Optimisation", label="Huber schedule", choices=HUBER_SCHEDULES,
                                 help="with huber / smooth_l1: how the Huber parameter follows the noise level "
                                      "(snr: kohya's default; exponential; constant)")
    huber_c: float = option(0.1, group="Optimisation", label="Huber c", gt=0.0, max=1.0, step=0.01,
                            help="with huber / smooth_l1: the Huber parameter (at the highest noise under snr and "
                                 "exponential)")
    debiased_estimation: bool = option(False, group="Optimisation", label="Debiased estimation loss",
                                       help="weight each image's loss by 1/sqrt(SNR) of its noise level (kohya's "
                                            "--debiased_estimation_loss)")
    scale_weight_norms: float = option(0.0, group="Optimisation", label="Max norm (scale weight norms)", min=0.0,
                                       step=0.1,
                                       help="after each step, scale down any layer whose LoRA update is larger "
                                            "than this (kohya's --scale_weight_norms, 1 in its guides): keeps an "
                                            "adapter from overpowering the base; lora without DoRA; 0: off")
    # kohya sd-scripts' --min_timestep / --max_timestep: the noise levels the run trains on, [min, max)
    min_timestep: int = option(0, group="Optimisation", label="Lowest timestep", min=0, max=999,
                               help="train only on timesteps >= this (low timesteps shape fine detail)")
    max_timestep: int = option(1000, group="Optimisation", label="Highest timestep (exclusive)", min=1, max=1000,
                               help="train only on timesteps below this (high timesteps shape the layout)")
    # 0..2^32-1: the trainer derives torch seeds from it (a TOML 2**62 would overflow)
    seed: int = option(42, group="Optimisation", label="Seed", min=0, max=2**32 - 1,
                       help="random seed of the run (the same seed and data give the same adapter)")
    # ---- precision and memory
    mixed_precision: str = option("no", group="Precision & memory", label="Mixed precision", choices=MIXED_PRECISION,
                                  help="compute in fp16/bf16 (GPU); no: fp32")
    # dtype of the finished adapter file: fp16 halves it (kohya's --save_precision); checkpoints stay fp32
    save_precision: str = option("fp32", group="Precision & memory", label="Save adapter as",
                                 choices=SAVE_PRECISIONS,
                                 help="dtype of the adapter file; fp16 halves its size and loads everywhere "
                                      "(checkpoints stay fp32)")
    gradient_checkpointing: bool = option(False, group="Precision & memory", label="Gradient checkpointing",
                                          help="less memory for about 30% more time per step")
    # measured (bench/step_speedups.py): x1.24 per step on the toy model on a CPU, after a first step that
    # compiles; off by default, as the compile costs more than short runs gain
    compile_unet: bool = option(False, group="Precision & memory", label="Compile the UNet (torch.compile)",
                                help="compile the UNet's training step: faster steps after a first step that "
                                     "takes a minute or more to compile; for long runs")
    quantize_base: str | None = option(None, group="Precision & memory", label="Quantized base (QLoRA)",
                                       choices=QUANTIZATIONS,
                                       help="QLoRA: train on a quantized frozen base; nf4 = bitsandbytes 4-bit "
                                            "(CUDA), int8 = torchao int8 weight-only (any device, also the CPU)")
    device: str | None = option(None, group="Precision & memory", ui=False,
                                help="cpu, cuda, cuda:1, mps (default: the best available)")
    # ---- checkpoints, samples, logs
    checkpoint_every: int = option(100, group="Checkpoints & samples", label="Checkpoint every N steps", min=0,
                                   max=10_000_000, help="save a resumable checkpoint every N steps (0: none)")
    checkpoints_keep: int = option(3, group="Checkpoints & samples", label="Checkpoints kept", min=1, max=1000,
                                   help="how many of the latest checkpoints are kept")
    resume: str | None = option(None, group="Checkpoints & samples", ui=False,
                                help="'latest' or a checkpoint folder of this run")
    init_adapter: str | None = option(None, group="Checkpoints & samples", ui=False,
                                      help="continue training from a finished adapter file (train N more steps)")
    sample_every: int = option(0, group="Checkpoints & samples", label="Sample every N steps", min=0,
                               max=10_000_000, ui_default=50,
                               help="draw the sample prompts every N steps (0: only at the end)")
    sample_prompts: list[str] = option(default_factory=list, group="Checkpoints & samples", label="Sample prompts",
                                       list="lines", flags=("--sample-prompt",),
                                       help="prompts of the sample images (repeatable; one per line; none: the "
                                            "trigger's default prompt), each with kohya's options if wanted: --n "
                                            "negative prompt, --w/--h size, --d seed, --s steps, --l CFG, --ss "
                                            "sampler")
    sample_prompts_file: str | None = option(None, group="Checkpoints & samples", ui=False,
                                             help="a kohya sample prompt file (.txt, kohya's --sample_prompts): one "
                                                  "prompt a line with its options, # lines left out; drawn after "
                                                  "the sample prompts")
    sample_sampler: str = option("DPM++ 2M Karras", group="Checkpoints & samples", label="Sample sampler",
                                 choices=tuple(SCHEDULERS),
                                 help="sampler of the sample images (this app's names, or kohya's: euler_a, ddim, "
                                      "k_dpm_2 …); a prompt's --ss overrides it")
    sample_seed: int = option(1234, group="Checkpoints & samples", label="Sample seed", min=0, max=2**32 - 1,
                              help="seed of the sample images (the same at every step, to compare)")
    weight_check: bool = option(True, group="Checkpoints & samples", label="Check the weight range",
                                help="at the end, draw a few prompts without the trigger with the base and with "
                                     "the adapter at 0.25-1; the model card says up to which weight the base's "
                                     "pictures stay as they were (toy base), or shows the pictures")
    sample_steps: int = option(20, group="Checkpoints & samples", label="Sample denoising steps", min=1, max=500,
                               help="sampler steps for sample images")

    def all_sample_prompts(self) -> list[str]:
        """The sample prompts, then those of sample_prompts_file."""
        from .sample_prompts import read_prompt_file

        return [*self.sample_prompts, *(read_prompt_file(self.sample_prompts_file) if self.sample_prompts_file
                                        else [])]

    def __post_init__(self) -> None:
        # every field's type first, from its annotation (a new field is covered without a line here), so the
        # checks below compare numbers with numbers and a TOML "no" is not read as a true bool
        hints = _field_types(type(self))
        for f in fields(self):
            setattr(self, f.name, _checked_type(f.name, getattr(self, f.name), hints[f.name]))
        for f_ in PATH_FIELDS:
            v = getattr(self, f_)  # shared .toml files write folders under the home as '~/…'
            if isinstance(v, str) and (v == "~" or v.startswith("~/")):
                setattr(self, f_, os.path.expanduser(v))
        from pipelines.schedule import prediction_type_name

        from .sample_prompts import parse_sample_prompt, sampler_name_of

        self.sample_sampler = sampler_name_of(self.sample_sampler)  # kohya's names (euler_a) as this app's
        if str(self.prediction_type).strip().lower() == "auto":
            self.prediction_type = "auto"
        else:  # 'v', 'eps' as the usual spellings
            try:
                self.prediction_type = prediction_type_name(self.prediction_type)
            except ConfigError:
                raise ConfigError(f"prediction_type: must be auto, epsilon or v_prediction (v), got "
                                  f"{self.prediction_type!r}") from None
        self._check_ranges_and_choices()  # from each field's metadata: a new field's range is checked too
        from pipelines.errors import UnsafeNameError
        from pipelines.library import check_name

        try:
            self.name = check_name(self.name)
        except UnsafeNameError as e:
            raise ConfigError(f"name: {e}") from None
        if not str(self.trigger).strip():
            raise ConfigError("trigger: must not be empty")
        if self.resolution is not None and self.resolution % 8:
            raise ConfigError(f"resolution: must be a multiple of 8, got {self.resolution}")
        if self.train_text_encoder and self.lr_text <= 0:
            raise ConfigError("lr_text: must be > 0 when train_text_encoder is on")
        if self.min_timestep >= self.max_timestep:
            raise ConfigError(f"min_timestep: must be below max_timestep ({self.max_timestep}), "
                              f"got {self.min_timestep}")
        if self.min_snr_gamma == 0:
            self.min_snr_gamma = None
        _check_template(self.instance_template)
        _check_device(self.device)
        if not self.unet_targets:
            raise ConfigError("unet_targets: must name at least one module")
        for f_ in ("sample_prompts", "preserve_prompts"):
            v = getattr(self, f_)
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{f_}: must be a list of prompts")
        for line in self.all_sample_prompts():  # kohya's per-prompt options: a bad one is said now, not at the first
            parse_sample_prompt(line)  # sample
        if self.network != "lora" and self.dropout:
            raise ConfigError(f"dropout: {self.network} layers have no LoRA dropout; set it to 0")
        if self.network != "lora" and self.quantize_base:
            raise ConfigError(f"quantize_base: {self.network} trains on an unquantized base only; use network "
                              "'lora' for QLoRA")
        if (self.pivotal or self.textual_inversion) and not re.fullmatch(r"[\w-]+", self.trigger or ""):
            raise ConfigError(f"trigger: with {'pivotal tuning' if self.pivotal else 'textual inversion'} the trigger "
                              "must be one word (letters, digits, _ or -), as AUTOMATIC1111 names an embedding; got "
                              f"{self.trigger!r}")
        if self.textual_inversion:
            self._check_inversion()
        if self.dora and self.network != "lora":
            raise ConfigError(f"dora: DoRA is trained with network 'lora' here, not {self.network}")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ConfigError("zero_terminal_snr: an epsilon model cannot be trained at zero SNR (the last timestep's "
                              "picture is pure noise); it is for v-prediction models: set prediction_type to "
                              "v_prediction or auto")
        if self.scale_weight_norms and (self.network != "lora" or self.dora):
            raise ConfigError("scale_weight_norms: caps the update of a plain LoRA's layers (as kohya's); with "
                              f"{'DoRA' if self.dora else 'network ' + self.network} set it to 0")
        if self.dora and self.quantize_base:
            raise ConfigError("dora: DoRA needs the base weights unquantized to measure them; turn quantize_base "
                              "off or train plain LoRA")
        if self.lokr_factor == 0:
            raise ConfigError("lokr_factor: must be -1 (automatic) or a factor of 1 or more, got 0")
        from .optimizers import check_args, check_rates

        check_args(self.optimizer, self.optimizer_args)
        check_rates(self)
        if not all(isinstance(w, str) and w.strip() and len(w.split()) == 1 for w in self.preserve_swaps):
            raise ConfigError(f"preserve_swaps: must be a list of single words, got {self.preserve_swaps!r}")

    def _check_inversion(self) -> None:
        """Textual inversion trains the trigger's vectors alone: the options of a LoRA have no place in it."""
        if not re.fullmatch(r"[\w-]+", self.name):
            raise ConfigError(f"name: an embedding is used by writing its name in a prompt, so it must be one word "
                              f"(letters, digits, _ or -); got {self.name!r}")
        wrong = [("pivotal", self.pivotal, "it already trains the trigger's vectors; choose one"),
                 ("train_text_encoder", self.train_text_encoder, "no LoRA is trained; turn it off"),
                 ("network", self.network != "lora", "no network is trained; leave it at 'lora'"),
                 ("dora", self.dora, "no LoRA is trained; turn it off"),
                 ("preserve_weight", self.preserve_weight > 0, "an embedding changes only prompts with its word, "
                                                               "so there is nothing else to keep; set it to 0"),
                 ("quantize_base", self.quantize_base, "it trains on an unquantized base; turn it off"),
                 ("scale_weight_norms", self.scale_weight_norms > 0, "no LoRA is trained; set it to 0")]
        for name, bad, why in wrong:
            if bad:
                raise ConfigError(f"{name}: with textual inversion {why}")

    def _check_ranges_and_choices(self) -> None:
        """Each set field against its metadata's choices and range (min/max inclusive, gt/below exclusive)."""
        for o in train_options():
            v = getattr(self, o.name)
            if v is None:
                continue
            if o.choices is not None and v not in o.choices:
                unset = " (or unset)" if o.optional else ""
                raise ConfigError(f"{o.name}: must be one of {', '.join(o.choices)}{unset}, got '{v}'")
            if o.kind is int and (o.min is not None or o.max is not None):
                self._check_int(o.name, o.min if o.min is not None else -2**63, o.max if o.max is not None else 2**63)
            elif o.kind is float:
                lo = f"{o.min:g}" if o.min is not None else None
                if o.below is not None and not ((o.min is None or o.min <= v) and v < o.below):
                    raise ConfigError(f"{o.name}: must be in [{lo}, {o.below:g}), got {v!r}")
                if o.gt is not None and not v > o.gt:
                    raise ConfigError(f"{o.name}: must be > {o.gt:g}, got {v!r}")
                if o.min is not None and v < o.min:
                    raise ConfigError(f"{o.name}: must be a number >= {lo}, got {v!r}")
                if o.max is not None and v > o.max:
                    raise ConfigError(f"{o.name}: must be a number <= {o.max:g}, got {v!r}")

    def _check_int(self, name: str, lo: int, hi: int) -> None:
        v = getattr(self, name)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ConfigError(f"{name}: must be a whole number between {lo} and {hi}, got {v!r}")

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def lora_conv_rank(self) -> int:
        return self.conv_rank or self.rank

    @property
    def lora_conv_alpha(self) -> float:
        if self.conv_alpha is not None:
            return float(self.conv_alpha)
        return self.lora_alpha * self.lora_conv_rank / self.rank  # the same scale as the other layers

    @property
    def library_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else default_library_dir()

    @property
    def embeddings_folder(self) -> Path:
        """Where a textual-inversion run writes its embedding."""
        if self.embeddings_dir:
            return Path(self.embeddings_dir)
        from pipelines.library import default_home

        return default_home() / "models" / "embeddings"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a dict; a preset's defaults apply first, explicit keys win; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}")
        preset = data.get("preset", "custom")
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"preset: must be one of {', '.join(PRESETS)}, got {_short(preset)}")
        defaults = preset_values(preset, preset_family(data.get("base") if isinstance(data.get("base"), str) else None))
        merged = {**defaults, **data}
        if isinstance(data.get("dataset_config"), str) and data["dataset_config"] and not _complete(data):
            from .kohya_dataset import read_kohya_dataset  # its options, under the ones given explicitly

            kohya = read_kohya_dataset(data["dataset_config"])
            merged = {**defaults, **kohya.options, **data}
            if "trigger" not in data:
                from .dataset import trigger_of

                merged["trigger"] = trigger_of(kohya.train) or cls.trigger
        elif "trigger" not in data and isinstance(data.get("images"), str) and data["images"]:
            from .dataset import kohya_trigger  # kohya's layout names the trigger: 10_ohwx woman -> ohwx

            merged["trigger"] = kohya_trigger(data["images"]) or cls.trigger
        # Prodigy: the rates are multipliers of its own estimate
        if isinstance(merged.get("optimizer"), str) and merged["optimizer"] in ADAPTIVE:
            if "lr_unet" not in data:
                merged["lr_unet"] = 1.0
            if "lr_text" not in data:
                merged["lr_text"] = merged["lr_unet"]
            if "lr_ti" not in data:
                merged["lr_ti"] = merged["lr_unet"]
        try:
            return cls(**merged)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_toml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Build from a TOML file (top-level keys or one [train] table), or a kohya_ss GUI config (.json, see
        training.kohya_gui); overrides (the command line) win.

        Every error names the file, and the field where there is one; a field given in overrides is
        not blamed on the file.
        """
        path = Path(path)
        overrides = overrides or {}
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder, not a config file")
        if path.suffix.lower() == ".json":  # a kohya_ss GUI config: its keys read as ours (training.kohya_gui)
            from .kohya_gui import read_kohya_gui

            return cls._from_file_data(path, read_kohya_gui(path).options, overrides)
        try:
            text = path.read_bytes().decode("utf-8").removeprefix("\ufeff")  # a BOM (Windows editors) is no key
            data = tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config file as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML ({e})") from None
        if "train" in data:  # a [train] table holds every key, or there is none
            table = data["train"]
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: train: must be a [train] table of options, got {_short(table)}")
            outside = sorted(k for k in data if k != "train")
            if outside:
                raise ConfigError(f"{path}: {', '.join(outside)}: outside the [train] table; put every option "
                                  "in it (or write them all at the top level)")
            data = table
        return cls._from_file_data(path, data, overrides)

    @classmethod
    def _from_file_data(cls, path: Path, data: dict[str, Any], overrides: dict[str, Any]) -> "TrainConfig":
        try:
            return cls.from_dict({**data, **overrides}, source=str(path))
        except ConfigError as e:
            msg = str(e)
            if msg.startswith(f"{path}:") or msg.split(":", 1)[0] in overrides:
                raise
            raise ConfigError(f"{path}: {msg}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_toml(self) -> str:
        """TOML text that from_toml reads back to an equal config (None values are omitted)."""
        lines = []
        for k, v in self.to_dict().items():
            if v is None:
                continue
            lines.append(f"{k} = {_toml_value(v)}")
        return "\n".join(lines) + "\n"

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    # ensure_ascii=False: JSON writes a character beyond U+FFFF as two \\uD8xx escapes, which TOML refuses;
    # DEL is the one control character JSON leaves raw and TOML does not allow in a string
    return json.dumps(str(v), ensure_ascii=False).replace("\x7f", "\\u007f")


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # the annotations as types (they are strings under `from __future__`)


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _checked_type(name: str, v: Any, tp: Any) -> Any:
    """v if it has the annotated type tp (an int also passes as a float, and becomes one), else ConfigError.

    Knows bool, int, float, str, list[str] and `X | None`; any other annotation is a programming error
    here, so that a new field of a new kind gets a check instead of none.
    """
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1 or len(args) == len(typing.get_args(tp)):
            raise TypeError(f"TrainConfig.{name}: no type check for {tp}")
        if v is None:
            return None
        optional, tp = True, args[0]
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        expected = f"a list of {_EXPECTED[item].removeprefix('a ')}s"
        if isinstance(v, list) and all(_checked_item(x, item) for x in v):
            return list(v)
    elif tp in _EXPECTED:
        expected = _EXPECTED[tp]
        if _checked_item(v, tp):
            return float(v) if tp is float else v
    else:
        raise TypeError(f"TrainConfig.{name}: no type check for {tp}")
    if optional:
        expected += " (or unset)"
    raise ConfigError(f"{name}: must be {expected}, got {_short(v)}")


def _checked_item(v: Any, tp: type) -> bool:
    if tp is bool:
        return isinstance(v, bool)
    if isinstance(v, bool):  # True is an int to Python, not a number to a user
        return False
    if tp is float:
        return isinstance(v, (int, float)) and math.isfinite(v)
    return isinstance(v, tp)


def _check_template(template: str) -> None:
    """A caption template must format with only the trigger word, and must use it."""
    mark = "\x00trigger\x00"
    try:
        text = template.format(trigger=mark)
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as e:
        raise ConfigError(f"instance_template: {template!r} is not a template of {{trigger}} alone "
                          f"({type(e).__name__}: {e}); write a literal brace as {{{{ or }}}}") from None
    if mark not in text:
        raise ConfigError("instance_template: must contain '{trigger}'")


def _check_device(name: str | None) -> None:
    """None (the best available), "cpu", or a device torch knows and this machine has ("cuda", "cuda:1", "mps")."""
    if name is None:
        return
    import torch  # already loaded by pipelines.weights_io

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device: '{name}' is not a device name torch knows; use cpu, cuda, cuda:1, mps, xpu "
                          "(or leave it unset for the best available)") from None
    if dev.type == "cpu":
        return
    backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    if backend is None or not callable(getattr(backend, "is_available", None)):
        raise ConfigError(f"device: '{name}' is not a device LoRA Studio can train on; use cpu, cuda, cuda:1, mps "
                          "or xpu")
    if not backend.is_available():
        why = " (torch.cuda.is_available() is false: no CUDA GPU, or a CPU-only torch build)" \
            if dev.type == "cuda" else ""
        raise ConfigError(f"device: '{name}' is not available on this machine{why}; use cpu, or leave it unset "
                          "for the best available")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise ConfigError(f"device: '{name}' does not exist; this machine has {count()} {dev.type} device(s)")
