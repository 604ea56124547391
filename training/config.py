"""`TrainConfig`: the single source of every training option (CLI, TOML file and UI all build it)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError
from pipelines.quantize import QUANTIZATIONS
from pipelines.weights_io import PRECISIONS

ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# LoCon-style: besides attention, the transformer blocks' in/out projections and feed-forward layers and the
# ResNet convolutions. A new object needs them: on the toy model, attention-only LoRA drew the shipped star
# in 6% of trigger images after 300 steps, these modules (rank 16, 600 steps) in 59% (bench/quality.py concept)
WIDE_UNET_TARGETS = [*ATTENTION_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
PRESETS: dict[str, dict[str, Any]] = {
    # a thing (object, character, face): trigger word as the subject, text encoder trained too
    "concept": {"rank": 16, "max_steps": 600, "lr_unet": 1e-3, "lr_text": 2e-4, "train_text_encoder": True,
                "instance_template": "a photo of {trigger}", "unet_targets": WIDE_UNET_TARGETS},
    # a way of drawing: trigger phrase as a style, UNet only
    "style": {"rank": 8, "max_steps": 300, "lr_unet": 1e-3, "lr_text": 0.0, "train_text_encoder": False,
              "instance_template": "in the style of {trigger}"},
    "custom": {},
}
MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_PRECISIONS = tuple(PRECISIONS)
OPTIMIZERS = ("adamw", "adamw8bit")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
CROPS = ("center", "random")


def default_library_dir() -> Path:
    from pipelines.library import default_library_root

    return default_library_root()


@dataclass
class TrainConfig:
    """Everything that determines a LoRA training run."""

    images: str = ""  # folder of training images (subfolders too); .txt captions beside them
    trigger: str = "sks"
    name: str = "my-lora"
    base: str | None = None  # None: the embedded toy model
    output_dir: str | None = None  # None: the adapter library folder
    overwrite: bool = False  # replace an adapter of the same name (up to case) already in the library
    preset: str = "custom"
    instance_template: str = "a photo of {trigger}"  # prompt for images without a caption file
    caption_ext: str = ".txt"
    caption_prefix_trigger: bool = True  # put the trigger word in front of captions that lack it
    # per step and row (kohya's caption_dropout_rate / shuffle_caption / keep_tokens): an empty caption with
    # this probability; comma-separated tags shuffled, the first keep_tokens (e.g. the trigger) in place
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 1
    repeats: int = 1
    resolution: int | None = None  # None: the base model's native resolution
    random_flip: bool = False
    crop: str = "center"
    buckets: bool = True  # aspect-ratio buckets for images of mixed shapes
    # prior preservation (DreamBooth)
    class_prompt: str | None = None
    class_images: str | None = None  # folder; None: generated with the base model and cached
    num_class_images: int = 8
    prior_loss_weight: float = 1.0
    # base preservation (self-distillation): on prompts without the trigger (every caption with the trigger
    # word taken out, the class prompt, the empty prompt that classifier-free guidance uses, and
    # preserve_prompts), the LoRA model's prediction is pulled towards the base model's own; 0 turns it off
    preserve_weight: float = 0.0
    preserve_prompts: list[str] = field(default_factory=list)
    preserve_images: int = 16  # base-model images of those prompts (generated once, cached) to compare on
    # LoRA
    rank: int = 8
    alpha: float | None = None  # None: alpha = rank
    # 3x3 convolutions (LoCon; kohya's conv_dim / conv_alpha): None = rank, and the same alpha/rank scale
    conv_rank: int | None = None
    conv_alpha: float | None = None
    dropout: float = 0.0
    train_text_encoder: bool = False
    unet_targets: list[str] = field(default_factory=lambda: list(ATTENTION_TARGETS))
    text_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    # optimisation
    max_steps: int = 300
    batch_size: int = 4
    grad_accum: int = 1
    lr_unet: float = 1e-3
    lr_text: float = 2e-4
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 10
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    # dtype of the finished adapter file: fp16 halves it (kohya's --save_precision); checkpoints stay fp32
    save_precision: str = "fp32"
    gradient_checkpointing: bool = False
    quantize_base: str | None = None  # QLoRA: "nf4" (bitsandbytes, CUDA) or "int8" (torchao, any device)
    min_snr_gamma: float | None = 5.0
    noise_offset: float = 0.0
    seed: int = 42
    # checkpoints, samples, logs
    checkpoint_every: int = 100
    checkpoints_keep: int = 3
    resume: str | None = None  # a checkpoint folder, or "latest"
    init_adapter: str | None = None  # "train N more steps" from a finished adapter file
    sample_every: int = 0  # 0: only at the end
    sample_prompts: list[str] = field(default_factory=list)
    sample_seed: int = 1234
    sample_steps: int = 20
    device: str | None = None

    def __post_init__(self) -> None:
        # every field's type first, from its annotation (a new field is covered without a line here), so the
        # checks below compare numbers with numbers and a TOML "no" is not read as a true bool
        hints = _field_types(type(self))
        for f in fields(self):
            setattr(self, f.name, _checked_type(f.name, getattr(self, f.name), hints[f.name]))
        for f_ in ("images", "base", "output_dir", "class_images", "resume", "init_adapter"):
            v = getattr(self, f_)  # shared .toml files write folders under the home as '~/…'
            if isinstance(v, str) and (v == "~" or v.startswith("~/")):
                setattr(self, f_, os.path.expanduser(v))
        if self.preset not in PRESETS:
            raise ConfigError(f"preset: must be one of {', '.join(PRESETS)}, got '{self.preset}'")
        from pipelines.errors import UnsafeNameError
        from pipelines.library import check_name

        try:
            self.name = check_name(self.name)
        except UnsafeNameError as e:
            raise ConfigError(f"name: {e}") from None
        if not str(self.trigger).strip():
            raise ConfigError("trigger: must not be empty")
        self._check_int("rank", 1, 1024)
        self._check_int("repeats", 1, 10000)
        self._check_int("max_steps", 1, 10_000_000)
        self._check_int("batch_size", 1, 4096)
        self._check_int("grad_accum", 1, 4096)
        self._check_int("warmup_steps", 0, 10_000_000)
        self._check_int("checkpoint_every", 0, 10_000_000)
        self._check_int("checkpoints_keep", 1, 1000)
        self._check_int("sample_every", 0, 10_000_000)
        self._check_int("num_class_images", 0, 100_000)
        self._check_int("preserve_images", 0, 100_000)
        self._check_int("sample_steps", 1, 500)
        if self.resolution is not None:
            self._check_int("resolution", 8, 4096)
            if self.resolution % 8:
                raise ConfigError(f"resolution: must be a multiple of 8, got {self.resolution}")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"alpha: must be > 0, got {self.alpha}")
        if self.conv_rank is not None:
            self._check_int("conv_rank", 1, 1024)
        if self.conv_alpha is not None and not self.conv_alpha > 0:
            raise ConfigError(f"conv_alpha: must be > 0, got {self.conv_alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if isinstance(self.caption_dropout, bool) or not isinstance(self.caption_dropout, (int, float)) \
                or not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout: must be in [0, 1), got {self.caption_dropout!r}")
        self._check_int("keep_tokens", 0, 1000)
        for f_ in ("lr_unet", "lr_text", "weight_decay", "prior_loss_weight", "preserve_weight", "noise_offset", "max_grad_norm"):
            v = getattr(self, f_)
            if not isinstance(v, (int, float)) or v < 0 or v != v:
                raise ConfigError(f"{f_}: must be a number >= 0, got {v!r}")
        if self.lr_unet <= 0:
            raise ConfigError(f"lr_unet: must be > 0, got {self.lr_unet}")
        if self.train_text_encoder and self.lr_text <= 0:
            raise ConfigError("lr_text: must be > 0 when train_text_encoder is on")
        if self.min_snr_gamma is not None and self.min_snr_gamma < 0:
            raise ConfigError(f"min_snr_gamma: must be > 0, or 0 for no min-SNR weighting; got {self.min_snr_gamma}")
        if self.min_snr_gamma == 0:
            self.min_snr_gamma = None
        for f_, allowed in (("mixed_precision", MIXED_PRECISION), ("save_precision", SAVE_PRECISIONS),
                            ("optimizer", OPTIMIZERS),
                            ("lr_scheduler", LR_SCHEDULERS), ("crop", CROPS)):
            if getattr(self, f_) not in allowed:
                raise ConfigError(f"{f_}: must be one of {', '.join(allowed)}, got '{getattr(self, f_)}'")
        if self.quantize_base is not None and self.quantize_base not in QUANTIZATIONS:
            raise ConfigError(f"quantize_base: must be one of {', '.join(QUANTIZATIONS)} (or unset), "
                              f"got '{self.quantize_base}'")
        _check_template(self.instance_template)
        _check_device(self.device)
        self._check_int("seed", 0, 2**32 - 1)  # the trainer derives torch seeds from it: a TOML 2**62 overflows
        self._check_int("sample_seed", 0, 2**32 - 1)
        if not self.unet_targets:
            raise ConfigError("unet_targets: must name at least one module")
        for f_ in ("sample_prompts", "preserve_prompts"):
            v = getattr(self, f_)
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{f_}: must be a list of prompts")

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
        defaults = {k: list(v) if isinstance(v, list) else v for k, v in PRESETS[preset].items()}  # never shared
        merged = {**defaults, **data}
        try:
            return cls(**merged)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_toml(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Build from a TOML file (top-level keys or one [train] table); overrides (the command line) win.

        Every error names the file, and the field where there is one; a field given in overrides is
        not blamed on the file.
        """
        path = Path(path)
        overrides = overrides or {}
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder, not a config file")
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
