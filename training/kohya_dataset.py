"""kohya sd-scripts' dataset config (`--dataset_config dataset.toml`), read as LoRA Studio's options.

    [general]
    shuffle_caption = true
    keep_tokens = 1

    [[datasets]]
    resolution = 512
    batch_size = 2

      [[datasets.subsets]]
      image_dir = 'img/ohwx'
      class_tokens = 'ohwx woman'
      num_repeats = 10

      [[datasets.subsets]]
      is_reg = true
      image_dir = 'reg/woman'
      class_tokens = 'woman'

Each subset is a folder of images with its repeat count and the caption of images without a caption file
(`class_tokens`), as a kohya `10_ohwx woman` folder is; `is_reg` subsets are the class images. Options that
kohya sets per dataset or per subset and LoRA Studio sets for the whole run (resolution, batch size, caption
shuffling, keep_tokens, caption dropout, flips, random crops, buckets, the caption ending) must have one value
across the file; a value given on the command line wins over the file's. Options LoRA Studio has no
counterpart for are listed in the run's log as not applied. A key kohya does not know either is an error, as
kohya's own schema makes it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError

from .dataset import Subset

# kohya key -> (LoRA Studio option, converter); the converter may raise ValueError with a message
RUN_OPTIONS = {
    "resolution": "resolution",
    "batch_size": "batch_size",
    "shuffle_caption": "shuffle_tags",
    "keep_tokens": "keep_tokens",
    "caption_dropout_rate": "caption_dropout",
    "flip_aug": "random_flip",
    "random_crop": "crop",
    "enable_bucket": "buckets",
    "caption_extension": "caption_ext",
    "conditioning_data_dir": "mask_dir",
}
SUBSET_KEYS = {"image_dir", "num_repeats", "class_tokens", "is_reg", "caption_prefix", "caption_suffix"}
# kohya's options that LoRA Studio has no counterpart for: said in the log, not applied
NOT_APPLIED = {"min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "color_aug",
               "face_crop_aug_range", "token_warmup_min", "token_warmup_step", "caption_tag_dropout_rate",
               "caption_dropout_every_n_epochs", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
               "cache_info", "alpha_mask", "validation_seed", "validation_split", "network_multiplier",
               "resize_interpolation", "custom_attributes", "system_prompt", "preference", "preference_caption_prefix",
               "preference_caption_suffix", "non_preference_caption_prefix", "non_preference_caption_suffix",
               "caption_separator"}
KNOWN = set(RUN_OPTIONS) | SUBSET_KEYS | NOT_APPLIED


@dataclass
class KohyaDataset:
    path: Path
    train: list[Subset] = field(default_factory=list)
    reg: list[Subset] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # TrainConfig field -> value
    not_applied: list[str] = field(default_factory=list)


def _table(value: Any, where: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where}: must be a table, got {type(value).__name__}")
    return value


# each kohya key's type, and kohya's own default where a subset leaves it unset (None: the run's own value)
TYPES = {"resolution": (int, list), "batch_size": int, "shuffle_caption": bool, "keep_tokens": int,
         "caption_dropout_rate": (int, float), "flip_aug": bool, "random_crop": bool, "enable_bucket": bool,
         "caption_extension": str, "conditioning_data_dir": str, "image_dir": str, "num_repeats": int,
         "class_tokens": str, "is_reg": bool, "caption_prefix": str, "caption_suffix": str}
KOHYA_DEFAULTS = {"shuffle_caption": False, "keep_tokens": 0, "caption_dropout_rate": 0.0, "flip_aug": False,
                  "random_crop": False, "caption_extension": ".caption", "conditioning_data_dir": None}
NOT_FOR_CLASS_IMAGES = {"flip_aug", "random_crop"}  # class images are never flipped or cropped at random here


def _typed(key: str, value: Any, where: str, path: Path) -> Any:
    want = TYPES.get(key)
    if want is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
        names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
        raise ConfigError(f"{path}: {where}{key}: must be {names.replace('bool', 'true or false')}, got {value!r}")
    return value


def _option(key: str, value: Any, where: str, path: Path) -> Any:
    """A kohya option's value as the LoRA Studio option's."""
    if value is None:
        return None
    _typed(key, value, where, path)
    if key == "resolution" and isinstance(value, list):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{path}: {where}resolution: {value} is not square; LoRA Studio trains at one "
                              "size (with aspect-ratio buckets for other shapes): give one number")
        return value[0]
    if key == "random_crop":
        return "random" if value else "center"
    if key == "caption_dropout_rate":
        return float(value)
    return value


def read_kohya_dataset(path: str | os.PathLike) -> KohyaDataset:
    """Read a kohya dataset config; every error names the file and the key."""
    path = Path(path).expanduser()
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8").removeprefix("\ufeff"))
    except FileNotFoundError:
        raise ConfigError(f"dataset_config: {path}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"dataset_config: {path}: cannot be read as TOML ({e})") from None
    out = KohyaDataset(path)
    unknown = sorted(set(data) - {"general", "datasets"})
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)} (kohya's dataset config has [general] and "
                          "[[datasets]])")
    general = _table(data.get("general", {}), "[general]", path)
    datasets = data.get("datasets", [])
    if not isinstance(datasets, list) or not datasets:
        raise ConfigError(f"{path}: [[datasets]]: at least one dataset with [[datasets.subsets]] is needed")

    def check_keys(scope: dict, where: str, subset: bool) -> None:
        for key in scope:
            if key == "subsets":
                continue
            if key == "metadata_file":
                raise ConfigError(f"{path}: {where}metadata_file: a fine-tuning dataset (captions in a JSON file); "
                                  "LoRA Studio reads DreamBooth-style subsets (image_dir, class_tokens)")
            if key not in KNOWN:
                raise ConfigError(f"{path}: {where}{key}: not an option of kohya's dataset config")
            if key in ("image_dir", "is_reg") and not subset:
                raise ConfigError(f"{path}: {where}{key}: belongs in a [[datasets.subsets]] table")
            if key in NOT_APPLIED and key not in out.not_applied:
                out.not_applied.append(key)

    check_keys(general, "[general] ", False)
    scopes: list[tuple[str, dict]] = []  # (where, what applies to the subset: general < dataset < subset)
    for i, ds in enumerate(datasets, 1):
        ds = _table(ds, f"[[datasets]] #{i}", path)
        check_keys(ds, f"[[datasets]] #{i}: ", False)
        subsets = ds.get("subsets", [])
        if not isinstance(subsets, list) or not subsets:
            raise ConfigError(f"{path}: [[datasets]] #{i}: no [[datasets.subsets]]")
        for j, sub in enumerate(subsets, 1):
            where = f"[[datasets]] #{i} subset #{j}: "
            sub = _table(sub, where.rstrip(": "), path)
            check_keys(sub, where, True)
            scopes.append((where, {**general, **{k: v for k, v in ds.items() if k != "subsets"}, **sub}))
    for where, eff in scopes:
        for key, value in eff.items():  # every value's type, under its kohya name
            _typed(key, value, where, path)
        image_dir = eff.get("image_dir")
        if not image_dir:
            raise ConfigError(f"{path}: {where}image_dir: each subset needs its folder of images")
        repeats = eff.get("num_repeats", 1)
        if repeats < 1:
            raise ConfigError(f"{path}: {where}num_repeats: a whole number of 1 or more, got {repeats!r}")
        sub = Subset(_folder(image_dir, path, where), repeats, eff.get("class_tokens", "").strip(),
                     prefix=eff.get("caption_prefix", ""), suffix=eff.get("caption_suffix", ""))
        (out.reg if eff.get("is_reg") else out.train).append(sub)
    if not out.train:
        raise ConfigError(f"{path}: every subset is is_reg = true; at least one holds the training images")
    # LoRA Studio sets each option once for the run: every subset must come to the same value, a subset that
    # leaves it unset counting with kohya's default (its run-wide ones, resolution and batch size, excepted)
    for key, opt in RUN_OPTIONS.items():
        relevant = [(w, e) for w, e in scopes if not (key in NOT_FOR_CLASS_IMAGES and e.get("is_reg"))]
        if not any(key in e for _, e in relevant):
            continue
        first = None
        for where, eff in relevant:
            if key not in eff and key not in KOHYA_DEFAULTS:
                continue
            v = _option(key, eff.get(key, KOHYA_DEFAULTS.get(key)), where, path)
            if first is None:
                first = (v, where, eff.get(key, KOHYA_DEFAULTS.get(key)))
            elif v != first[0]:
                raise ConfigError(f"{path}: {where}{key}: {eff.get(key, KOHYA_DEFAULTS.get(key))!r} here but "
                                  f"{first[2]!r} in {first[1].strip().rstrip(':')}; LoRA Studio sets {key} once for "
                                  "the whole run")
        if first is not None and first[0] is not None:
            out.options[opt] = first[0]
    if "caption_ext" not in out.options:
        out.options["caption_ext"] = KOHYA_DEFAULTS["caption_extension"]  # kohya's own default ending
    return out


def _folder(image_dir: str, path: Path, where: str) -> Path:
    """image_dir as kohya reads it (from the working folder), else beside the config file."""
    p = Path(image_dir).expanduser()
    for cand in (p, path.parent / p):
        if cand.is_dir():
            return cand
    raise ConfigError(f"{path}: {where}image_dir: {image_dir} is not a folder (looked from the working folder and "
                      f"from {path.parent})")
