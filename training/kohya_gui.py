"""A kohya_ss GUI configuration (the `.json` its LoRA tab's "Save config" writes) read as LoRA Studio's options.

kohya_ss users keep their recipes as these files (its own presets are the same format). What has a counterpart
here is taken: folders and base model, rank/alpha (conv_dim/conv_alpha for LoCon), learning rates, optimizer and
its arguments, schedule and warm-up, steps (or epochs, counted over kohya's `10_name` folders as kohya_ss
counts them), batch size, resolution, caption options, noise options, precision, sample prompts. What has none
(or is only about speed there, such as latent caching or xformers) is listed in the notes, never silently
dropped; a network type LoRA Studio does not train (iA3, DyLoRA, GLoRA, BOFT…) or an unknown optimizer is an
error naming the key. LyCORIS' LoHa and LoKr train as `network` loha / lokr (their `factor`, and the modules
of the LyCORIS preset).

The reading follows kohya_ss' lora_gui.py: an empty or 0 unet_lr / text_encoder_lr falls back to
learning_rate, and a text_encoder_lr of 0 with a non-zero unet_lr trains the UNet only; lr_warmup is a
percentage of the steps unless lr_warmup_steps gives a number; max_train_steps 0 means epochs × images ×
repeats / batch size / gradient accumulation. kohya_ss doubles that count when there are class images (kohya
interleaves them as steps of their own); LoRA Studio trains them in the same step as the instance images, so
the count is not doubled, and the notes say so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError

from .config import ATTENTION_TARGETS, LR_SCHEDULERS
from .sample_prompts import sampler_name_of

# kohya's networks.lora trains every Linear (and 1x1 conv) of the transformer blocks; LoCon adds the 3x3 convs
STANDARD_TARGETS = [*ATTENTION_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
LOCON_TARGETS = [*STANDARD_TARGETS, "conv1", "conv2"]
# kohya_ss' LoRA_type -> (network, UNet modules); LyCORIS' LoHa / LoKr default to its "full" preset (every
# Linear and convolution of the UNet's blocks)
LORA_TYPES = {"Standard": ("lora", STANDARD_TARGETS), "Kohya LoCon": ("lora", LOCON_TARGETS),
              "LoCon": ("lora", LOCON_TARGETS), "LyCORIS/LoCon": ("lora", LOCON_TARGETS),
              "LyCORIS/LoHa": ("loha", LOCON_TARGETS), "Kohya LoHa": ("loha", LOCON_TARGETS),
              "LyCORIS/LoKr": ("lokr", LOCON_TARGETS), "Kohya LoKr": ("lokr", LOCON_TARGETS)}
LYCORIS_PRESETS = {"full": LOCON_TARGETS, "attn-mlp": [*ATTENTION_TARGETS, "ff.net.0.proj", "ff.net.2"],
                   "attn-only": ATTENTION_TARGETS, "unet-transformer-only": STANDARD_TARGETS}
OPTIMIZER_NAMES = {"adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy", "adafactor": "adafactor",
                   "lion": "lion"}
# kohya_ss keys taken as they are (after their type): kohya name -> TrainConfig field
DIRECT = {"network_dim": "rank", "train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
          "max_grad_norm": "max_grad_norm", "seed": "seed", "clip_skip": "clip_skip",
          "shuffle_caption": "shuffle_tags", "keep_tokens": "keep_tokens",
          "caption_dropout_rate": "caption_dropout", "caption_extension": "caption_ext", "flip_aug": "random_flip",
          "enable_bucket": "buckets", "min_timestep": "min_timestep", "max_timestep": "max_timestep",
          "gradient_checkpointing": "gradient_checkpointing", "network_dropout": "dropout",
          "prior_loss_weight": "prior_loss_weight", "masked_loss": "masked_loss",
          "sample_every_n_steps": "sample_every", "save_every_n_steps": "checkpoint_every",
          "train_data_dir": "images", "reg_data_dir": "class_images", "output_name": "name",
          "pretrained_model_name_or_path": "base", "vae": "vae", "network_weights": "init_adapter",
          "lora_network_weights": "init_adapter",  # kohya_ss' older name of network_weights
          "mixed_precision": "mixed_precision", "noise_offset": "noise_offset", "ip_noise_gamma": "ip_noise_gamma",
          "loss_type": "loss_type", "huber_schedule": "huber_schedule", "huber_c": "huber_c",
          "debiased_estimation_loss": "debiased_estimation", "scale_weight_norms": "scale_weight_norms",
          "zero_terminal_snr": "zero_terminal_snr"}
INT_FIELDS = {"rank", "batch_size", "grad_accum", "seed", "clip_skip", "keep_tokens", "min_timestep", "max_timestep",
              "sample_every", "checkpoint_every"}
FLOAT_FIELDS = {"max_grad_norm", "caption_dropout", "dropout", "prior_loss_weight", "noise_offset", "ip_noise_gamma",
                "huber_c", "scale_weight_norms"}
BOOL_FIELDS = {"shuffle_tags", "random_flip", "buckets", "gradient_checkpointing", "masked_loss", "debiased_estimation",
               "zero_terminal_snr"}
PATH_FIELDS = {"images", "class_images", "base", "vae", "init_adapter"}
# read for the options above (not "unused")
CONSUMED = {"LoRA_type", "dora_wd", "network_alpha", "conv_dim", "conv_alpha", "learning_rate", "unet_lr", "text_encoder_lr",
            "network_train_unet_only", "optimizer", "optimizer_args", "lr_scheduler", "lr_warmup",
            "lr_warmup_steps", "max_train_steps", "epoch", "max_train_epochs", "max_resolution", "random_crop",
            "save_precision", "min_snr_gamma", "noise_offset_type", "multires_noise_iterations",
            "multires_noise_discount", "huber_scale", "sample_prompts", "sample_sampler", "sdxl", "v2",
            "v_parameterization", *DIRECT}
# only about speed, logging or where kohya writes things: nothing to say when they are set
QUIET = {"cache_latents", "cache_latents_to_disk", "xformers", "sdpa", "mem_eff_attn", "max_data_loader_n_workers",
         "persistent_data_loader_workers", "num_cpu_threads_per_process", "num_processes", "num_machines",
         "multi_gpu", "gpu_ids", "main_process_port", "dynamo_backend", "dynamo_mode", "dynamo_use_fullgraph",
         "dynamo_use_dynamic", "extra_accelerate_launch_args", "logging_dir", "log_with", "log_tracker_name",
         "log_tracker_config", "log_prefix", "use_wandb", "wandb_api_key", "wandb_run_name", "output_dir",
         "save_model_as", "save_state", "save_state_on_train_end", "save_last_n_steps", "save_last_n_steps_state",
         "save_last_n_epochs", "save_last_n_epochs_state", "save_every_n_epochs", "training_comment",
         "sdxl_no_half_vae", "sdxl_cache_text_encoder_outputs", "vae_batch_size", "unit", "model_list",
         "save_as_bool", "highvram", "lowvram", "full_fp16", "full_bf16", "fp8_base", "fp8_base_unet",
         "log_config", "huggingface_repo_id", "huggingface_token", "huggingface_repo_type",
         "huggingface_repo_visibility", "huggingface_path_in_repo", "save_state_to_huggingface",
         "resume_from_huggingface", "async_upload", "metadata_author", "metadata_description",
         "metadata_license", "metadata_tags", "metadata_title", "dataset_config", "lr_scheduler_args",
         "lr_scheduler_num_cycles", "lr_scheduler_power", "max_token_length", "bucket_no_upscale",
         "bucket_reso_steps", "min_bucket_reso", "max_bucket_reso", "additional_parameters", "LyCORIS_preset",
         "skip_cache_check", "train_on_input", "weighted_captions",
         "dim_from_weights", "save_every_n_steps_state", "log_every_n_steps",
         "stop_text_encoder_training", "stop_text_encoder_training_pct"}

# the LyCORIS network's own options: kohya_ss keeps them in every config, they mean nothing to a Standard LoRA
LYCORIS_ONLY = {"factor", "use_cp", "use_tucker", "use_scalar", "decompose_both", "train_norm", "rank_dropout_scale",
                "constrain", "rescaled", "dora_wd", "bypass_mode", "LyCORIS_preset", "train_on_input"}


@dataclass
class KohyaGuiConfig:
    path: Path
    options: dict[str, Any] = field(default_factory=dict)  # TrainConfig field -> value
    notes: list[str] = field(default_factory=list)


def _blank(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip())


def _number(key: str, v: Any, kind: type) -> Any:
    if isinstance(v, bool):
        raise ConfigError(f"{key}: must be a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: must be a number, got {v!r}") from None
    if kind is int:
        if not x.is_integer():
            raise ConfigError(f"{key}: must be a whole number, got {v!r}")
        return int(x)
    return x


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise ConfigError(f"{key}: must be true or false, got {v!r}")


def _resolution(v: Any) -> int:
    """kohya's "512,512" (width,height; a single number is square): the side of the square of that area."""
    parts = [p for p in str(v).replace(" ", "").split(",") if p]
    try:
        w, h = (int(float(parts[0])), int(float(parts[-1])))
    except (ValueError, IndexError):
        raise ConfigError(f"max_resolution: must be 'width,height', got {v!r}") from None
    return max(8, round(math.sqrt(w * h) / 8) * 8)


def _prompts(text: Any, notes: list[str]) -> list[str]:
    """kohya's sample prompts: one per line with its options (--n, --w, --s …, read by training.sample_prompts);
    an option this app cannot apply (kohya's for Flux, SD3 or ControlNet) is left out with a note."""
    from .sample_prompts import parse_sample_prompt

    out = []
    for line in str(text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kept = [part for part in line.split(" --")]
        for i in range(len(kept) - 1, 0, -1):
            try:
                parse_sample_prompt(f"x --{kept[i]}")
            except ConfigError as e:
                notes.append(f"sample prompt '{kept[0].strip()}': --{kept[i].strip()} is not applied ("
                             f"{str(e).split(': ', 2)[-1]})")
                del kept[i]
        out.append(" --".join(kept))
    return out


def _epoch_steps(images: str, epochs: int, batch: int, accum: int) -> int | None:
    """kohya_ss' count: every `N_name` folder's images × N, / batch / accumulation × epochs (None: no folder)."""
    from .dataset import IMAGE_EXTS, is_mask_file, kohya_subsets

    folder = Path(images).expanduser()
    if not images or not folder.is_dir():
        return None
    total = sum(s.repeats * sum(1 for f in s.folder.rglob("*") if f.suffix.lower() in IMAGE_EXTS
                                and not is_mask_file(f)) for s in kohya_subsets(folder))
    if not total:
        return None
    return max(1, math.ceil(total / batch / accum * epochs))


def read_kohya_gui(path: str | Path) -> KohyaGuiConfig:
    """The options of a kohya_ss GUI .json; every error names the file and the key."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8").removeprefix("\ufeff"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a kohya_ss config (.json): {e}") from None
    if not isinstance(data, dict) or not ({"network_dim", "LoRA_type", "learning_rate"} & set(data)):
        raise ConfigError(f"{path}: not a kohya_ss LoRA config (no network_dim, LoRA_type or learning_rate)")
    try:
        return _read(path, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _read(path: Path, data: dict[str, Any]) -> KohyaGuiConfig:
    out = KohyaGuiConfig(path)
    opts, notes = out.options, out.notes
    get = {k: v for k, v in data.items() if not _blank(v)}
    for key, f in DIRECT.items():
        if key not in get:
            continue
        v = get[key]
        if f in INT_FIELDS:
            opts[f] = _number(key, v, int)
        elif f in FLOAT_FIELDS:
            opts[f] = _number(key, v, float)
        elif f in BOOL_FIELDS:
            opts[f] = _bool(key, v)
        else:
            opts[f] = str(v)
    if opts.get("clip_skip") == 0:
        del opts["clip_skip"]
    for f in ("sample_every", "checkpoint_every"):
        if opts.get(f) == 0:
            del opts[f]
    # network
    kind = str(get.get("LoRA_type", "Standard"))
    if kind not in LORA_TYPES:
        other_model = kind.split()[0] in ("Flux1", "Anima", "Lumina", "HunyuanImage-2.1", "SD3")
        raise ConfigError(f"LoRA_type: '{kind}' is not trained by LoRA Studio; it trains {', '.join(LORA_TYPES)} "
                          "(LoRA, with the convolutions for LoCon; LyCORIS' LoHa and LoKr)"
                          + (" on SD 1.x, 2.x and SDXL models" if other_model else ""))
    network, targets = LORA_TYPES[kind]
    opts["network"] = network
    preset = str(get.get("LyCORIS_preset", "full"))
    if kind.startswith("LyCORIS/") and preset in LYCORIS_PRESETS:
        targets = LYCORIS_PRESETS[preset]
    elif kind.startswith("LyCORIS/"):
        notes.append(f"LyCORIS_preset '{preset}' is not one LoRA Studio knows: its 'full' modules are trained")
    opts["unet_targets"] = list(targets)
    if network == "lokr" and "factor" in get:
        opts["lokr_factor"] = _number("factor", get["factor"], int)
    if _bool("dora_wd", get.get("dora_wd", False)) and kind.startswith("LyCORIS/"):
        if network == "lora":  # LyCORIS/LoCon with DoRA: trained here, with the per-input norms A1111 applies
            opts["dora"] = True
        else:
            notes.append(f"dora_wd is not applied: DoRA is trained with LoRA / LoCon here, not {kind}")
    if network != "lora":
        if opts.pop("dropout", 0):
            notes.append(f"network_dropout {get['network_dropout']} is not applied: {network} has no dropout here")
        tucker = [k for k in ("use_cp", "use_tucker") if get.get(k) is True]
        if tucker:
            notes.append(f"{'/'.join(tucker)} is not applied: convolutions are trained without Tucker cores")
    if "network_alpha" in get:
        opts["alpha"] = _number("network_alpha", get["network_alpha"], float)
    if "conv1" in targets:
        if "conv_dim" in get:
            opts["conv_rank"] = _number("conv_dim", get["conv_dim"], int)
        if "conv_alpha" in get:
            opts["conv_alpha"] = _number("conv_alpha", get["conv_alpha"], float)
    if network == "lokr":  # LyCORIS' way to ask for full (undecomposed) LoKr factors: a huge dim
        for f, key in (("rank", "network_dim"), ("conv_rank", "conv_dim")):
            if (opts.get(f) or 0) > 1024:
                notes.append(f"{key} {opts[f]} (LyCORIS' full LoKr factors) is read as 1024: every factor of an "
                             "SD layer is full at that rank, and applied at scale 1 as LyCORIS does")
                opts[f] = 1024
    # learning rates (kohya_ss: 0 or empty falls back to learning_rate; a TE rate of 0 trains the UNet only)
    main = _number("learning_rate", get.get("learning_rate", 1e-4), float)
    unet = _number("unet_lr", get.get("unet_lr", 0), float) or main
    text = _number("text_encoder_lr", get.get("text_encoder_lr", 0), float)
    unet_only = _bool("network_train_unet_only", get.get("network_train_unet_only", False))
    te_zero = "text_encoder_lr" in get and text == 0 and _number("unet_lr", get.get("unet_lr", 0), float) != 0
    opts["lr_unet"] = unet
    opts["train_text_encoder"] = not (unet_only or te_zero)
    opts["lr_text"] = (text or main) if opts["train_text_encoder"] else 0.0
    # optimizer
    name = str(get.get("optimizer", "AdamW"))
    if name.lower() not in OPTIMIZER_NAMES:
        hint = ("; Prodigy is D-Adaptation's successor (same authors' line of work): lr 1.0, and decouple, "
                "weight_decay, d0, growth_rate and use_bias_correction mean the same there"
                if name.lower().startswith("dadapt") else "")
        raise ConfigError(f"optimizer: '{name}' is not one LoRA Studio has; it has AdamW, AdamW8bit, Prodigy, "
                          f"Adafactor, Lion{hint}")
    opts["optimizer"] = OPTIMIZER_NAMES[name.lower()]
    if "optimizer_args" in get:
        args = get["optimizer_args"]
        opts["optimizer_args"] = [str(a) for a in args] if isinstance(args, list) else [str(args).strip()]
    sched = str(get.get("lr_scheduler", "cosine"))
    if opts["optimizer"] == "adafactor":
        from .optimizers import parse_args

        given = parse_args(opts.get("optimizer_args", []))
        if "relative_step" not in given and not given.get("warmup_init"):
            # kohya's Adafactor: relative_step on unless said otherwise (transformers' defaults, scale_parameter
            # on too); it then picks its own step size and learning_rate only names the first one
            extra = ["relative_step=True"] + ([] if "scale_parameter" in given else ["scale_parameter=True"])
            opts["optimizer_args"] = [*opts.get("optimizer_args", []), " ".join(extra)]
            notes.append("Adafactor as kohya runs it by default: relative_step=True, it picks its own step size "
                         f"(learning_rate {unet:g} is not used)")
    if sched == "adafactor":  # kohya's name for Adafactor's own schedule: nothing on top of it here
        sched = "constant"
    if sched not in LR_SCHEDULERS:
        raise ConfigError(f"lr_scheduler: '{sched}' is not one LoRA Studio has ({', '.join(LR_SCHEDULERS)})")
    opts["lr_scheduler"] = sched
    # steps: max_train_steps, else epochs over the kohya folders
    steps = _number("max_train_steps", get.get("max_train_steps", 0), int)
    if not steps:
        epochs = _number("epoch", get.get("max_train_epochs") or get.get("epoch", 1), int)
        counted = _epoch_steps(opts.get("images", ""), epochs, opts.get("batch_size", 1), opts.get("grad_accum", 1))
        if counted is None:
            where = (f"train_data_dir '{opts['images']}' has no kohya folders here" if opts.get("images")
                     else "no train_data_dir")
            notes.append(f"{epochs} epoch(s) could not be counted as steps ({where}): give --steps")
        else:
            steps = counted
            notes.append(f"{epochs} epoch(s) of the images in train_data_dir are {steps} steps"
                         + (" (kohya_ss counts twice as many with class images, which it trains as steps of "
                            "their own; LoRA Studio trains them in the same step)" if "class_images" in opts else ""))
    if steps:
        opts["max_steps"] = steps
    warm_steps = _number("lr_warmup_steps", get.get("lr_warmup_steps", 0), int)
    pct = _number("lr_warmup", get.get("lr_warmup", 0), float)
    if warm_steps > 0:
        opts["warmup_steps"] = warm_steps
    elif pct and steps:
        opts["warmup_steps"] = round(pct * steps / 100)
    else:
        opts["warmup_steps"] = 0
    if opts["warmup_steps"] and sched == "constant":
        opts["lr_scheduler"] = "constant_with_warmup"  # kohya's constant schedule warms up when asked to
    if "max_resolution" in get:
        opts["resolution"] = _resolution(get["max_resolution"])
    if "random_crop" in get:
        opts["crop"] = "random" if _bool("random_crop", get["random_crop"]) else "center"
    if "save_precision" in get:
        prec = str(get["save_precision"]).lower()
        opts["save_precision"] = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}.get(prec, "fp32")
    if "min_snr_gamma" in get:
        gamma = _number("min_snr_gamma", get["min_snr_gamma"], float)
        opts["min_snr_gamma"] = gamma or None
    if opts.get("scale_weight_norms") and (opts.get("network") != "lora" or opts.get("dora")):
        notes.append(f"scale_weight_norms {opts.pop('scale_weight_norms'):g} is not applied: it caps a plain "
                     f"LoRA's layers, not {'DoRA' if opts.get('dora') else opts.get('network')}'s")
    kind = str(get.get("noise_offset_type", "Original"))
    if kind == "Multires":  # kohya_ss passes the multires options instead of the offset
        opts.pop("noise_offset", None)
        opts["multires_noise_iterations"] = _number("multires_noise_iterations",
                                                    get.get("multires_noise_iterations") or 0, int)
        if not _blank(get.get("multires_noise_discount")):
            opts["multires_noise_discount"] = _number("multires_noise_discount", get["multires_noise_discount"], float)
    elif kind == "Original" and not _blank(get.get("multires_noise_iterations")) \
            and _number("multires_noise_iterations", get["multires_noise_iterations"], int):
        notes.append(f"multires_noise_iterations {get['multires_noise_iterations']} is not applied: kohya_ss passes it "
                     "only with noise_offset_type Multires, and this config's is Original")
    elif kind != "Original":
        notes.append(f"noise_offset_type '{kind}' is not one kohya_ss has (Original, Multires): plain offset noise "
                     f"{opts.get('noise_offset') or 0:g} is applied")
    if opts.get("loss_type", "l2") in ("huber", "smooth_l1") and not _blank(get.get("huber_scale")) \
            and _number("huber_scale", get["huber_scale"], float) != 1:
        notes.append(f"huber_scale {get['huber_scale']} is not applied: the Huber parameter is huber_c as it is")
    if not _blank(get.get("v_parameterization")) and _bool("v_parameterization", get["v_parameterization"]):
        opts["prediction_type"] = "v_prediction"  # kohya's flag for a v-prediction base (SD 2.x 768-v, v-pred SDXL)
    if "sample_prompts" in get:
        opts["sample_prompts"] = _prompts(get["sample_prompts"], notes)
    if not _blank(get.get("sample_sampler")):
        try:
            opts["sample_sampler"] = sampler_name_of(str(get["sample_sampler"]))
        except ConfigError as e:
            notes.append(f"sample_sampler: {e}; the default sampler is used")
    if opts.get("mixed_precision") not in (None, "no", "fp16", "bf16"):
        del opts["mixed_precision"]
    unused = [k for k, v in data.items() if k not in CONSUMED and k not in QUIET and v not in (None, "", 0, False)
              and (network != "lora" or k not in LYCORIS_ONLY) and k not in ("use_cp", "use_tucker", "factor")
              and not (isinstance(v, str) and v.strip() in ("0", "0.0", "None", "none"))]
    if unused:
        shown = ", ".join(f"{k}={data[k]!r}" for k in unused[:10])
        notes.append(f"not applied (LoRA Studio has no counterpart): {shown}"
                     + (f" and {len(unused) - 10} more" if len(unused) > 10 else ""))
    return out
