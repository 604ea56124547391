"""Checkpoints and the finished adapter file: written atomically, with metadata, pruned safely."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pipelines.errors import TrainingError
from pipelines.schedule import modelspec_prediction_type
from pipelines.weights_io import PRECISIONS, atomic_write, cast_weights

from .config import PATH_FIELDS, TrainConfig, _toml_value

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer

# options whose change makes a checkpoint unusable for resuming
RESUME_KEYS = ("base", "rank", "alpha", "conv_rank", "conv_alpha", "train_text_encoder", "unet_targets", "text_targets",
               "resolution", "optimizer", "optimizer_args", "network", "lokr_factor", "dora", "pivotal", "ti_vectors",
               "textual_inversion")
# what a checkpoint made before a key existed holds: that field's default then
RESUME_DEFAULTS = {"optimizer": "adamw", "optimizer_args": [], "network": "lora", "lokr_factor": -1, "dora": False,
                   "pivotal": False, "ti_vectors": 2, "textual_inversion": False}


def adapter_alphas(cfg: TrainConfig, sd: dict[str, torch.Tensor],
                   live: dict[str, float] | None = None) -> float | dict[str, float]:
    """The alpha to save with the adapter: one value, or per module when the 3x3 convolutions have their own.
    LoHa / LoKr: the attached layers' own (`live`, see training.lora.module_alphas)."""
    if cfg.network != "lora" and live:
        return dict(live)
    if cfg.lora_conv_alpha == cfg.lora_alpha:
        return cfg.lora_alpha
    out = {}
    for k, v in sd.items():
        if k.endswith(".lora_A.weight"):
            spatial = v.ndim == 4 and tuple(v.shape[2:]) != (1, 1)
            out[k[: -len(".lora_A.weight")]] = cfg.lora_conv_alpha if spatial else cfg.lora_alpha
    return out


def _ckpt_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def write_checkpoint(run_dir: Path, step: int, adapter: dict[str, torch.Tensor], optimizer_state: dict,
                     scheduler_state: dict, cfg: TrainConfig, family: str | None = None,
                     layout: dict | None = None, live_alphas: dict[str, float] | None = None,
                     embeddings: dict | None = None) -> Path:
    """Write checkpoints/step-N as a temporary folder renamed into place: all or nothing.

    With the base's `family` and UNet `layout` its adapter file has kohya's key layout like the finished
    adapter (users copy a run's intermediate steps into AUTOMATIC1111 / ComfyUI too); else peft keys."""
    final = _ckpt_dir(run_dir) / f"step-{step:06d}"
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        from pipelines.adapters import save_adapter, save_kohya

        # a checkpoint's adapter is a usable LoRA file too (grids of checkpoints load it with its alpha)
        alphas = adapter_alphas(cfg, adapter, live_alphas)
        meta = {"step": str(step), "config": json.dumps(shareable_config(cfg), sort_keys=True),
                "lora_studio.trigger": cfg.trigger, "ss_steps": str(step), **network_fields(cfg)}
        if family is not None and layout is not None:
            meta["lora_studio.base_family"] = family
            save_kohya(adapter, tmp / "adapter.safetensors", meta, family=family, alphas=alphas, layout=layout,
                       embeddings=embeddings)
        else:
            from pipelines.embeddings import bundle_keys

            extra = {k: v for w, vec in (embeddings or {}).items() for k, v in bundle_keys(w, vec).items()}
            save_adapter({**adapter, **extra}, tmp / "adapter.safetensors", meta, alpha=alphas)
        state = {"optimizer": optimizer_state, "lr_scheduler": scheduler_state, "step": step,
                 "config": cfg.to_json()}
        torch.save(state, tmp / "state.pt")
        with open(tmp / "state.pt", "rb") as f:
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TrainingError(f"could not write checkpoint {final} ({e.strerror or e}); older checkpoints are kept") from None
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    d = _ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    ok = [p for p in d.glob("step-*") if (p / "adapter.safetensors").is_file() and (p / "state.pt").is_file()]
    return sorted(ok, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (only ever after a new one is written)."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path, which: str) -> Path | None:
    if which == "latest":
        cks = list_checkpoints(run_dir)
        return cks[-1] if cks else None
    p = Path(which)
    if p.is_dir():
        return p
    cand = _ckpt_dir(run_dir) / which
    return cand if cand.is_dir() else None


def read_checkpoint(path: Path, cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a checkpoint after checking it was made with compatible options."""
    from pipelines.weights_io import load_safetensors

    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"optimizer", "lr_scheduler", "step", "config"} <= set(state):
            raise ValueError("not a training state")
    except FileNotFoundError:
        raise TrainingError(f"cannot resume from {path}: its state.pt is missing") from None
    except Exception as e:  # noqa: BLE001 - truncated, damaged or foreign: one line naming the checkpoint
        raise TrainingError(f"cannot resume from {path}: its state.pt is damaged ({type(e).__name__}: {e}); "
                            "resume from an older checkpoint (--resume checkpoints/step-N) instead") from None
    saved = json.loads(state["config"])
    now = cfg.to_dict()
    saved = {**RESUME_DEFAULTS, **saved}
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in RESUME_KEYS
             if saved.get(k) != now.get(k)]
    if diffs:
        raise TrainingError(f"cannot resume from {path}: the run's options differ ({'; '.join(diffs)})")
    adapter, meta = load_safetensors(path / "adapter.safetensors", check_finite=True)
    from pipelines.adapters import FORMAT_PEFT, detect_format, layout_for, magnitudes_as_peft
    from pipelines.embeddings import split_bundled

    adapter, state["embeddings"] = split_bundled(adapter, str(path))  # pivotal tuning's vectors
    from pipelines.dora import has_dora
    from pipelines.lycoris import is_lycoris

    if not adapter or (is_lycoris(adapter) and not has_dora(adapter)):  # textual inversion: the vectors only;
        return adapter, state  # LoHa / LoKr in kohya names: the trainer maps them
    if detect_format(adapter) != FORMAT_PEFT or has_dora(adapter):  # kohya keys (since the kohya layout): peft
        layout = layout_for(meta)
        adapter, _ = magnitudes_as_peft(adapter, meta, unet_layers_per_block=layout["down"][0][0] if layout else None)
    return adapter, state


# TrainConfig fields that hold local paths: shared files (the adapter's metadata, its library .toml) carry
# them as `shareable_path` gives them, never as absolute paths of this machine


def shareable_path(value: str | None) -> str | None:
    """A path as a shared file may show it: '~/…' under the user's home, else only its last part
    (a hub id such as 'org/model' or a name stays as it is). None stays None."""
    if not value:
        return value
    p = Path(value).expanduser()
    if not p.is_absolute():
        return str(value)
    try:
        return "~/" + p.resolve().relative_to(Path.home().resolve()).as_posix()
    except (ValueError, OSError, RuntimeError):
        return p.name


def shareable_config(cfg: TrainConfig) -> dict:
    """The run's options as the adapter file and its library .toml carry them: no absolute local paths."""
    d = cfg.to_dict()
    for k in PATH_FIELDS:
        d[k] = shareable_path(d.get(k))
    d.pop("overwrite", None)  # a shared .toml run again must never replace an adapter silently
    return d


def base_file_hash(base) -> str | None:
    """SHA-256 of the base model's single checkpoint file (what kohya writes as ss_new_sd_model_hash);
    None for a diffusers folder or a hub id, which have no one file to hash."""
    from pipelines.weights_io import sha256_file

    src = Path(str(getattr(base, "source", "") or ""))
    try:
        return sha256_file(src) if src.is_file() else None
    except OSError:
        return None


def network_fields(cfg: TrainConfig) -> dict[str, str]:
    """kohya's ss_network_module / ss_network_args of a LoHa / LoKr / DoRA run (LyCORIS' own values); {} for LoRA."""
    if cfg.network == "lora" and not cfg.dora:
        return {}
    algo = "locon" if cfg.network == "lora" else cfg.network
    args = {"algo": algo, "conv_dim": str(cfg.lora_conv_rank), "conv_alpha": f"{cfg.lora_conv_alpha:g}"}
    if cfg.dora:  # LyCORIS' DoRA, with the per-input norms AUTOMATIC1111 and ComfyUI apply
        args.update(dora_wd="True", wd_on_output="False")
    if cfg.network == "lokr":
        args["factor"] = str(cfg.lokr_factor)
    return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}


def network_label(cfg: TrainConfig) -> str:
    """'LoRA rank 8' / 'LoHa rank 8' / 'LoKr rank 8 (factor 4)'."""
    from .lora import NETWORK_LABELS

    factor = f" (factor {cfg.lokr_factor})" if cfg.network == "lokr" and cfg.lokr_factor > 0 else ""
    return f"{'DoRA' if cfg.dora else NETWORK_LABELS[cfg.network]} rank {cfg.rank}{factor}"


def adapter_metadata(tr: "Trainer") -> dict[str, str]:
    """Metadata of a finished adapter: ours, kohya's ss_* and modelspec.* (see pipelines.adapters)."""
    from pipelines.adapters import SUGGESTED_START_KEY, UNET_LAYOUT_KEY, lora_metadata
    from pipelines.single_file import unet_layout

    from .optimizers import describe

    cfg, base = tr.cfg, tr.base
    modules = sorted(set(cfg.unet_targets) | (set(cfg.text_targets) if cfg.train_text_encoder else set()))
    meta = lora_metadata(
        family=base.family, rank=cfg.rank, alpha=cfg.lora_alpha, conv_rank=cfg.lora_conv_rank,
        conv_alpha=cfg.lora_conv_alpha, name=cfg.name, base_model=base.name,
        base_hash=getattr(tr, "base_fingerprint", None) or base_hash(base), trigger_word=cfg.trigger, modules=modules, components=tr.components,
        steps=cfg.max_steps, resolution=tr.resolution, num_images=len(tr.scan.items),
        training_config=json.dumps(shareable_config(cfg), sort_keys=True),
        model_file_hash=base_file_hash(base),
        description=f"{network_label(cfg)} on {base.name} ({base.family}); trigger '{cfg.trigger}'",
        prediction_type=modelspec_prediction_type(base.prediction_type),
        extra={
            "ss_num_train_images": str(sum(it.repeats for it in tr.scan.items) * cfg.repeats),
            **dataset_metadata(tr.scan, Path(cfg.images), cfg.repeats),
            "ss_masked_loss": str(cfg.masked_loss),
            "ss_shuffle_caption": str(cfg.shuffle_tags),
            "ss_keep_tokens": str(cfg.keep_tokens),
            "ss_caption_dropout_rate": f"{cfg.caption_dropout:g}",
            "ss_learning_rate": f"{cfg.lr_unet:g}",
            "ss_unet_lr": f"{cfg.lr_unet:g}",
            "ss_text_encoder_lr": f"{cfg.lr_text:g}" if cfg.train_text_encoder else "0",
            "ss_network_dropout": f"{cfg.dropout:g}",
            "ss_seed": str(cfg.seed),
            "ss_optimizer": describe(cfg.optimizer, cfg.optimizer_args),
            "ss_max_grad_norm": f"{cfg.max_grad_norm:g}",
            **noise_and_loss_metadata(cfg),
            "ss_zero_terminal_snr": str(base.zero_terminal_snr),  # kohya's key; a ztsnr model trains on it anyway
            "ss_lr_scheduler": cfg.lr_scheduler,
            "ss_clip_skip": str(cfg.clip_skip) if cfg.clip_skip > 1 else "None",  # kohya: "None" when unset
            **({"ss_vae_name": Path(cfg.vae).name} if cfg.vae else {}),
        },
    )
    meta.update(network_fields(cfg))
    meta[UNET_LAYOUT_KEY] = json.dumps(unet_layout(base.pipe.unet))
    if (sc := suggested_step_check(tr)) is not None:
        meta[SUGGESTED_START_KEY] = f"{sc.suggested}/{sc.steps}"  # the Generate tab's rows start from it
    return meta


def noise_and_loss_metadata(cfg) -> dict[str, str]:
    """kohya's keys for the noise and loss options (its "None" where one is off), which civitai and the
    metadata viewers of A1111 extensions show."""
    def opt(v) -> str:
        return f"{v:g}" if v else "None"

    huber = cfg.loss_type != "l2"
    return {"ss_noise_offset": opt(cfg.noise_offset), "ss_min_snr_gamma": opt(cfg.min_snr_gamma),
            "ss_multires_noise_iterations": opt(cfg.multires_noise_iterations),
            "ss_multires_noise_discount": f"{cfg.multires_noise_discount:g}",
            "ss_ip_noise_gamma": opt(cfg.ip_noise_gamma), "ss_debiased_estimation": str(cfg.debiased_estimation),
            "ss_loss_type": cfg.loss_type, "ss_huber_schedule": cfg.huber_schedule if huber else "None",
            "ss_huber_c": f"{cfg.huber_c:g}" if huber else "None",
            "ss_scale_weight_norms": opt(cfg.scale_weight_norms),
            "ss_min_timestep": str(cfg.min_timestep), "ss_max_timestep": str(cfg.max_timestep)}


def dataset_metadata(scan, images: Path, repeats: int = 1) -> dict[str, str]:
    """kohya's ss_dataset_dirs and ss_tag_frequency: per image folder (a kohya `10_ohwx woman` folder, or the
    images folder itself), its image count and repeats, and how often each comma-separated caption tag occurs
    (what AUTOMATIC1111's and civitai's pages list as the training tags)."""
    from .dataset import tag_counts

    dirs: dict[str, dict[str, int]] = {}
    captions: dict[str, list[str]] = {}
    for it in scan.items:
        key = it.subset or images.name or "images"
        d = dirs.setdefault(key, {"n_repeats": it.repeats * repeats, "img_count": 0})
        d["img_count"] += 1
        captions.setdefault(key, []).append(it.caption)
    tags = {key: dict(tag_counts(caps, None)) for key, caps in captions.items()}
    return {"ss_dataset_dirs": json.dumps(dirs), "ss_tag_frequency": json.dumps(tags)}


def base_hash(base) -> str:
    """A short, stable fingerprint of the base model's weights (sampled tensors, not the whole file)."""
    import hashlib

    h = hashlib.sha256()
    for comp in ("unet", "text_encoder", "vae"):
        mod = getattr(base.pipe, comp, None)
        if mod is None:
            continue
        for i, (n, p) in enumerate(mod.state_dict().items()):
            if "lora_" in n or i % 7:
                continue
            h.update(n.encode())
            h.update(p.detach().float().cpu().flatten()[:64].numpy().tobytes())
    return h.hexdigest()[:16]


def config_toml(cfg: TrainConfig, leave_out: tuple[str, ...] = (), *, shareable: bool = True) -> str:
    """The run's options as a .toml that `lora-studio train --config` and the app's Train tab read back:
    shareable (no absolute local paths, for the library and adapter files), or for this computer (paths kept,
    so a terminal run finds the images and base model)."""
    d = shareable_config(cfg) if shareable else cfg.to_dict()
    return _toml_text({k: v for k, v in d.items() if k not in leave_out})


def _toml_text(d: dict) -> str:
    """TOML that `TrainConfig.from_toml` reads back (None values are left out)."""
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in d.items() if v is not None)


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def export_adapter(tr: "Trainer", preview: Path | None) -> Path:
    """Write <library>/<name>.safetensors with its preview PNG, model card and exact config."""
    from .lora import lora_state_dict

    cfg = tr.cfg
    lib = cfg.library_dir
    lib.mkdir(parents=True, exist_ok=True)
    path = lib / f"{cfg.name}.safetensors"
    from pipelines.adapters import UNET_LAYOUT_KEY, save_kohya

    sd = lora_state_dict(tr.base.pipe, tr.components)
    if cfg.save_precision != "fp32":  # the weights train in fp32
        sd, bad = cast_weights(sd, cfg.save_precision)
        if bad is not None:  # never write an inf into the file; keep the weights
            ckpt = tr._checkpoint(cfg.max_steps)
            raise TrainingError(f"save_precision: '{bad}' does not fit in {cfg.save_precision}; the trained "
                                f"weights are in {ckpt}: run again with save_precision 'bf16' or 'fp32' and "
                                "resume 'latest' to write the adapter")
    meta = adapter_metadata(tr)
    # the library file is what users copy into AUTOMATIC1111 / ComfyUI: kohya's key layout, which both map
    # completely (and diffusers' load_lora_weights reads as it is); per-module alphas as `.alpha` tensors
    alphas = adapter_alphas(cfg, sd, tr.live_alphas())
    try:
        save_kohya(sd, path, meta, family=tr.base.family, alphas=alphas, layout=json.loads(meta[UNET_LAYOUT_KEY]),
                   dtype=PRECISIONS[cfg.save_precision] if cfg.save_precision != "fp32" else None,
                   embeddings=tr.embeddings())
    except OSError as e:
        raise TrainingError(f"could not write {path} ({e.strerror or e})") from None
    if preview is not None:
        atomic_write(lib / f"{cfg.name}.png", lambda tmp: shutil.copyfile(preview, tmp))
    write_text_atomic(lib / f"{cfg.name}.toml", config_toml(cfg))
    write_text_atomic(lib / f"{cfg.name}.md", model_card(tr, meta))
    user = json.dumps(a1111_user_metadata(tr), indent=4, ensure_ascii=False)
    write_text_atomic(lib / f"{cfg.name}.json", user + "\n")
    return path


def export_embedding(tr: "Trainer", preview: Path | None) -> Path:
    """Textual inversion: write <embeddings folder>/<name>.safetensors (AUTOMATIC1111's `emb_params`, SDXL's
    `clip_l` / `clip_g`), its preview as A1111 looks for it (`<name>.preview.png`) and its model card."""
    from pipelines.adapters import save_embedding

    cfg = tr.cfg
    folder = cfg.embeddings_folder
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cfg.name}.safetensors"
    vectors = tr.pivotal.vectors()
    try:
        save_embedding({cfg.name: vectors}, path, {
            "lora_studio.trigger_word": cfg.trigger, "lora_studio.base_model": tr.base.name,
            "lora_studio.base_family": tr.base.family, "lora_studio.steps": str(cfg.max_steps),
            "lora_studio.config": json.dumps(shareable_config(cfg), sort_keys=True)})
    except OSError as e:
        raise TrainingError(f"could not write {path} ({e.strerror or e})") from None
    if preview is not None:
        atomic_write(folder / f"{cfg.name}.preview.png", lambda tmp: shutil.copyfile(preview, tmp))
    write_text_atomic(folder / f"{cfg.name}.md", embedding_card(tr))
    return path


def embedding_card(tr: "Trainer") -> str:
    """The model card of a textual-inversion embedding: what it is, the word that uses it, where it works."""
    cfg = tr.cfg
    prompt = re.sub(rf"(?<![\w-]){re.escape(cfg.trigger)}(?![\w-])", lambda _m: cfg.name, use_prompt(tr))
    return (
        f"# {cfg.name}\n\n"
        f"Textual-inversion embedding trained with LoRA Studio: {cfg.ti_vectors} token vector(s) per text encoder, "
        f"learnt from {len(tr.scan.items)} image(s) (trained as `{cfg.trigger}`); the model itself is unchanged.\n\n"
        f"- Base model: {tr.base.name} ({tr.base.family})\n"
        f"- {cfg.max_steps} steps at {tr.resolution} px, batch {cfg.batch_size}, lr {cfg.lr_ti:g}\n\n"
        f"## Use\n\n"
        f"Write `{cfg.name}` in a prompt (or the negative prompt):\n\n"
        f"    lora-studio generate --prompt \"{prompt}\"\n\n"
        f"The file is AUTOMATIC1111's embedding format: copy it as it is into AUTOMATIC1111's `embeddings` folder "
        f"or ComfyUI's `models/embeddings` (there write `embedding:{cfg.name}`); diffusers reads it with "
        f"`pipe.load_textual_inversion(path, token=\"{cfg.name}\")`. It changes only prompts that name it.\n")


A1111_SD_VERSIONS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}  # its user-metadata dropdown's values


def a1111_user_metadata(tr: "Trainer") -> dict:
    """AUTOMATIC1111's user metadata for the adapter (`<name>.json` beside the file in `models/Lora`, what its
    "Edit user metadata" dialog writes): clicking the adapter's card there inserts `<lora:name:W>` followed by
    the activation text, here the trigger word. ComfyUI's LoRA managers read the same file. Preferred weight 0
    leaves A1111's default multiplier; the weight and step checks go into the notes."""
    from .config import preset_family

    cfg, base = tr.cfg, tr.base
    toy = preset_family(cfg.base) == "toy"
    notes = ["Trained with LoRA Studio."]
    if cfg.clip_skip > 1:
        notes.append(f"Trained with Clip skip {cfg.clip_skip}: set it in the settings when using it.")
    if (wc := getattr(tr, "weight_check", None)) is not None:
        if wc.kept is not None:
            notes.append(f"Keeps the base intact up to weight {wc.safe_up_to:g}." if wc.safe_up_to
                         else f"Changes pictures without the trigger already at weight {wc.weights[0]:g}.")
        if (sc := wc.step_check) is not None and sc.look_kept is not None:
            notes.append(f"Acting from step {sc.suggested} of {sc.steps} keeps more of the base "
                         f"(<lora:{cfg.name}:1:start={sc.suggested}> with the LoRA Block Weight extension)."
                         if sc.suggested else "Best acting at every sampler step.")
    return {
        "description": f"LoRA rank {cfg.rank} on {base.name}; trigger word '{cfg.trigger}'.",
        "sd version": "Unknown" if toy else A1111_SD_VERSIONS.get(base.family, "Unknown"),
        "activation text": cfg.trigger,
        "preferred weight": 0.0,
        "negative text": "",
        "notes": " ".join(notes),
    }


def suggested_step_check(tr: "Trainer"):
    """The end-of-training step check when it suggested a start (`.suggested` of `.steps`), else None."""
    wc = getattr(tr, "weight_check", None)
    sc = wc.step_check if wc is not None else None
    return sc if sc is not None and sc.suggested else None


def use_arg(tr: "Trainer") -> str:
    """The card's `--lora` value: full weight, from the start the step check suggests (the name is quoted on
    the card: a name may hold spaces)."""
    sc = suggested_step_check(tr)
    return f"{tr.cfg.name}:1" + (f":start={sc.suggested}" if sc is not None else "")


def use_prompt(tr: "Trainer") -> str:
    """A prompt with the trigger, worded as the training captions are (else the first sample prompt)."""
    from .sample_prompts import parse_sample_prompt
    from .weight_check import trigger_prompts

    return next(iter(trigger_prompts(tr)), None) or parse_sample_prompt(tr.sample_prompts()[0]).prompt


def optimizer_line(cfg: TrainConfig) -> str:
    """The model card's optimizer line: "AdamW, lr 0.001 (text encoder 0.0002), constant_with_warmup"."""
    from pipelines.adapters import optimizer_label

    from .optimizers import ADAPTIVE, describe

    lr = f"lr {cfg.lr_unet:g}" + (f" (text encoder {cfg.lr_text:g})" if cfg.train_text_encoder
                                    and cfg.lr_text != cfg.lr_unet else "")
    if cfg.optimizer in ADAPTIVE:
        lr += ", a multiplier of its own step size"
    return f"{optimizer_label(describe(cfg.optimizer, cfg.optimizer_args))}, {lr}, {cfg.lr_scheduler} schedule"


def pivotal_note(cfg: TrainConfig) -> str:
    """The model card's words on a pivotal-tuned adapter's bundled embedding: where the trigger word works."""
    return (f"The trigger word `{cfg.trigger}` is a trained embedding ({cfg.ti_vectors} token vector(s), pivotal "
            f"tuning), bundled in the file as AUTOMATIC1111's `bundle_emb.{cfg.trigger}`: in this app and in "
            f"AUTOMATIC1111 (1.7 or later) or Forge the word means what was trained while the adapter is in use. "
            f"ComfyUI and diffusers leave bundled embeddings out: `lora-studio loras export {cfg.name} --format "
            f"embedding` writes `{cfg.trigger}.safetensors` for ComfyUI's `models/embeddings` (write "
            f"`embedding:{cfg.trigger}` where the trigger goes), and `--format peft` writes the LoRA for diffusers' "
            f"`load_lora_weights` with `{cfg.name}_emb.safetensors` beside it for `load_textual_inversion`. ")


def model_card(tr: "Trainer", meta: dict[str, str]) -> str:
    from .lora import NETWORK_LABELS

    cfg = tr.cfg
    prompts = "\n".join(f"- `{p}`" for p in tr.sample_prompts())
    return (
        f"# {cfg.name}\n\n"
        f"{'DoRA' if cfg.dora else NETWORK_LABELS[cfg.network]} adapter trained with LoRA Studio.\n\n"
        f"- Trigger word: `{cfg.trigger}`\n"
        f"- Base model: {meta['lora_studio.base_model']} ({meta['lora_studio.base_family']}), "
        f"hash {meta['lora_studio.base_hash']}\n"
        f"- {network_label(cfg)}, alpha {cfg.lora_alpha:g}; modules: {meta['lora_studio.modules']}\n"
        f"- {cfg.max_steps} steps at {tr.resolution} px on {len(tr.scan.items)} image(s), batch {cfg.batch_size}\n"
        f"- {optimizer_line(cfg)}\n"
        + (f"- Trained with clip skip {cfg.clip_skip}: generate with Clip skip {cfg.clip_skip} too\n"
           if cfg.clip_skip > 1 else "") + "\n"
        f"## Use\n\n"
        f"    lora-studio generate --lora \"{use_arg(tr)}\" --prompt \"{use_prompt(tr)}\""
        + (f" --clip-skip {cfg.clip_skip}" if cfg.clip_skip > 1 else "") + "\n\n"
        + ("The file uses kohya's key layout: copy it as it is into AUTOMATIC1111's or ComfyUI's `models/Lora` "
           + ("folder. " if cfg.pivotal else "folder, or load it in diffusers with `pipe.load_lora_weights(path)`. ")
           if cfg.network == "lora" and not cfg.dora else
           "The file uses kohya's key layout with LyCORIS' DoRA magnitudes (`dora_scale`, one length per input "
           "channel): copy it as it is into AUTOMATIC1111's (1.9 or later) or ComfyUI's `models/Lora` folder, which "
           "apply DoRA natively. " if cfg.dora else
           f"The file uses LyCORIS' key layout under kohya's module names: copy it as it is into AUTOMATIC1111's or "
           f"ComfyUI's `models/Lora` folder, which apply {NETWORK_LABELS[cfg.network]} natively. ")
        + (pivotal_note(cfg) if cfg.pivotal else "")
        + f"Copy `{cfg.name}.json` beside it "
        f"too: AUTOMATIC1111 reads it as the adapter's user metadata, so its card adds the trigger word "
        f"`{cfg.trigger}` to the prompt.\n\n"
        f"Sample prompts:\n{prompts}\n"
        + (f"\n{wc.card_text()}" if (wc := getattr(tr, "weight_check", None)) is not None else "")
    )
