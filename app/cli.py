"""The `lora-studio` command line: a thin adapter from argv to the domain functions."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from pipelines.errors import LoraStudioError
from pipelines.schedule import PREDICTION_TYPES

SAMPLER_HELP = ("Euler a, Euler, DPM++ 2M, DPM++ 2M Karras, DPM++ SDE Karras, DPM++ 2M SDE (Karras), DPM2, DPM2 a, DDIM, "
                "UniPC, Heun, LMS, PNDM; for few-step LoRAs LCM, Euler SGM Uniform, DPM++ 2M SGM Uniform, TCD")


def _add_style_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--style", action="append", default=[], metavar="NAME",
                   help="apply a saved prompt style (AUTOMATIC1111's styles.csv: its prompt and negative prompt merged "
                        "into yours, at {prompt} or after it); repeatable, in order")
    p.add_argument("--styles", default=None, metavar="FILE",
                   help="the styles file (default: $LORA_STUDIO_HOME/styles.csv; A1111's styles.csv as it is)")


def _with_styles(args: argparse.Namespace, prompt: str, negative: str) -> tuple[str, str]:
    """The prompts with --style's styles merged in (as AUTOMATIC1111 does)."""
    if not getattr(args, "style", None):
        return prompt, negative
    from pipelines.styles import STYLES_FILE, apply_styles, read_styles

    path = Path(args.styles).expanduser() if args.styles else _home(None) / STYLES_FILE
    if args.styles and not path.is_file():
        raise _usage(f"--styles: {path} is not a file")
    return apply_styles(prompt, negative, args.style, read_styles(path), path)


# the grid's request-setting axes, for its columns and for --rows-…: option (without --), what it varies, metavar,
# the column option's help, and what a row option's help names
_SETTING_AXES = (
    ("cfgs", "guidance", "C1,C2,...", "compare these CFG scales (adapters: tags in --prompt)", "these CFG scales"),
    ("step_counts", "steps", "N1,N2,...", "compare these numbers of sampler steps", "these numbers of steps"),
    ("samplers", "scheduler", "A,B,...", "compare these samplers (e.g. 'Euler a,DPM++ 2M Karras')", "these samplers"),
    ("prompt_sr", "prompt_sr", "WORD,OTHER,...", "A1111's Prompt S/R: WORD is in the prompt; each column swaps it for "
     "one of the values (quotes keep a comma inside a value)", "Prompt S/R"),
)


def _add_variation_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    p.add_argument("--subseed", type=int, default=-1 if defaults else None, metavar="N",
                   help="variation seed (AUTOMATIC1111's Extra; default -1: a random one, recorded in the PNG)")
    p.add_argument("--subseed-strength", type=float, default=0.0 if defaults else None, metavar="S",
                   help="how far each image's starting noise moves from its seed's towards the variation seed's "
                        "(0 to 1; default 0: off). With it the images share the seed and image i takes variation "
                        "seed N + i, as in A1111: variations of one picture")
    p.add_argument("--tiling", action="store_true", default=False if defaults else None,
                   help="AUTOMATIC1111's Tiling: the picture wraps around its edges, so it tiles seamlessly "
                        "(textures, patterns)")
    p.add_argument("--cfg-rescale", type=float, default=0.0 if defaults else None, metavar="PHI",
                   help="CFG rescale (0 to 1; 0.7 in its paper; default 0: off): the guided prediction scaled back "
                        "towards the prompt's own spread, against over-exposed, burnt pictures at high CFG on "
                        "v-prediction and zero-terminal-SNR models; recorded as 'CFG Rescale'")


def _add_wildcard_args(p: argparse.ArgumentParser, grid: bool = False) -> None:
    p.add_argument("--wildcards", default=None, metavar="DIR",
                   help="the wildcards folder: __name__ in a prompt is a line of DIR/name.txt (default: "
                        "$LORA_STUDIO_HOME/wildcards; the Dynamic Prompts extension's files work as they are). "
                        "{a|b|c} in a prompt is a choice, made anew for " + ("the grid (once, by its seed)" if grid
                                                                             else "each image"))
    if grid:
        return
    p.add_argument("--combinatorial", action="store_true",
                   help="every combination of the prompt's choices, one image each, at most --num-images (the "
                        "Dynamic Prompts extension's combinatorial generation)")
    p.add_argument("--fixed-seed", action="store_true",
                   help="every image with the same seed, so only the prompt's choices differ")


def _wildcards(args: argparse.Namespace):
    from pipelines.wildcards import WILDCARDS_FOLDER, Wildcards

    given = getattr(args, "wildcards", None)
    if given and not Path(given).expanduser().is_dir():
        raise _usage(f"--wildcards: {given} is not a folder")
    return Wildcards.at(Path(given).expanduser() if given else _home(None) / WILDCARDS_FOLDER)


def _add_embeddings_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embeddings", default=None, metavar="DIR",
                   help="textual-inversion embeddings folder: a prompt word naming a file there (EasyNegative…) "
                        "uses it (default: $LORA_STUDIO_HOME/models/embeddings)")


def _models_folder(kind: str) -> Path:
    """A folder of the app's home models folder, as the app has it (`VAE`, `embeddings`)."""
    from pipelines.library import default_home

    return default_home() / "models" / kind


def _embeddings_folder(args: argparse.Namespace) -> Path:
    given = getattr(args, "embeddings", None)
    return Path(given).expanduser() if given else _models_folder("embeddings")


def _embeddings_into(base, args: argparse.Namespace, texts) -> None:
    from pipelines.embeddings import use_embeddings

    folder = _embeddings_folder(args)
    if getattr(args, "embeddings", None) and not folder.is_dir():
        raise _usage(f"--embeddings: {folder} is not a folder")
    for line in use_embeddings(base, folder, texts, args.allow_pickle):
        print(f"warning: {line}")


def _add_vae_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", default=None, metavar="FILE|NAME",
                   help="decode with this VAE instead of the model's own (AUTOMATIC1111's SD VAE): a file, or a "
                        "name in $LORA_STUDIO_HOME/models/VAE; recorded in the PNG")


def _vae_in_folder(name: str) -> Path | None:
    from pipelines.vae import vae_files

    return vae_files(_models_folder("VAE")).get(name)


def _vae_path(value: str | None) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    if path.exists():
        return path
    found = _vae_in_folder(value)
    if found is None:
        raise _usage(f"--vae: no file '{value}', and no VAE of that name in {_models_folder('VAE')}")
    return found


def _add_hires_args(p: argparse.ArgumentParser, defaults: bool) -> None:
    """AUTOMATIC1111's Hires fix and img2img options (defaults None where --from-png may give them)."""
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--hires-scale", type=float, default=d(1.0), metavar="X",
                   help="Hires fix: make the image at --width x --height, enlarge it X times (up to 4) and draw it "
                        "again, for more detail than the model gives at that size (default 1: off)")
    p.add_argument("--hires-steps", type=int, default=d(0), metavar="N",
                   help="steps of the Hires fix's second pass (default 0: as --steps)")
    p.add_argument("--hires-upscaler", default=d("Latent"), choices=("Latent", "Lanczos"),
                   help="how the first picture is enlarged: Latent (its latents, A1111's default) or Lanczos")
    p.add_argument("--denoising-strength", type=float, default=d(0.7), metavar="S",
                   help="how much of the picture the second pass (or --init-image) draws anew: 0-1 (default 0.7)")
    p.add_argument("--init-image", default=None, metavar="IMAGE",
                   help="img2img: start from this picture (stretched to --width x --height, default the model's "
                        "size) rather than from noise; --denoising-strength says how much changes")
    p.add_argument("--mask", dest="mask_image", default=None, metavar="IMAGE",
                   help="inpainting, with --init-image: draw anew only where this mask is white (black: the "
                        "picture stays as it is; grey between; a PNG's transparency: its painted strokes)")
    p.add_argument("--mask-blur", type=int, default=d(4), metavar="PX",
                   help="blur of the mask's edge in pixels (default 4, as AUTOMATIC1111)")


CLIP_SKIP_HELP = ("AUTOMATIC1111's Clip skip: 2 takes the text encoder's next-to-last layer, as most anime models "
                  "and the adapters trained for them expect; 1 the last (SD 1.x/2.x; SDXL takes its own)")


def _add_base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=None,
                   help="base model: a diffusers folder, a single-file .safetensors checkpoint, or a hub id "
                        "(default: the embedded toy model in sample_data/toy-sd)")
    p.add_argument("--base-config", default=None,
                   help="diffusers config folder for a single-file checkpoint with a non-standard layout")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt/.pt/.bin files (they can run code when loaded: only for files you trust)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    p.add_argument("--prediction-type", default=None, choices=(*PREDICTION_TYPES, "v"),
                   help="what the base model predicts, when its file does not say it (default: read from the model: "
                        "its config, a single file's v_pred tensor, a NAME.yaml beside it); v_prediction for SD 2.x "
                        "768-v and v-pred SDXL models (ComfyUI's ModelSamplingDiscrete)")
    p.add_argument("--zero-terminal-snr", action="store_true", default=None,
                   help="sample the base model on a zero-terminal-SNR schedule (for ztsnr-trained models whose "
                        "file does not say so; A1111's Noise schedule 'Zero Terminal SNR'); recorded in the PNG")


def _base_kwargs(args: argparse.Namespace) -> dict:
    """load_base's options from _add_base_args' flags."""
    return dict(allow_pickle=args.allow_pickle, device=args.device, config=args.base_config,
                prediction_type=args.prediction_type, zero_terminal_snr=args.zero_terminal_snr)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lora-studio",
        description="Train LoRA adapters for Stable Diffusion and generate images with them.",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images from a prompt")
    _add_base_args(g)
    g.add_argument("--prompt", default=None,
                   help="required unless --from-png gives it; AUTOMATIC1111's syntax: (word:1.3), [word], BREAK, "
                        "<lora:NAME:W>, prompt editing [from:to:when] (when 0.5: half the steps; 10: step 10), "
                        "[to:when], [from::when] and alternation [a|b]")
    g.add_argument("--from-png", default=None, metavar="IMAGE",
                   help="make an image again from the generation parameters stored in IMAGE (a PNG made here or "
                        "by AUTOMATIC1111; its JPEG/WebP too): prompt with its adapters, negative prompt, steps, "
                        "sampler, CFG, seed, size. Options given as well override them")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--steps", type=int, default=None, help="default 20")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (CFG) scale (default 7)")
    g.add_argument("--seed", type=int, default=None, help="default -1: a random seed (recorded in the PNG)")
    g.add_argument("--width", type=int, default=None, help="default: the model's native size")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="make the images N at a time (AUTOMATIC1111's Batch size; default: all at once): less GPU "
                        "memory for many images, the same images")
    _add_variation_args(g, defaults=False)
    g.add_argument("--scheduler", default=None, help=SAMPLER_HELP + " (default DPM++ 2M Karras)")
    g.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help=CLIP_SKIP_HELP + " (default 1)")
    _add_hires_args(g, defaults=False)
    _add_vae_arg(g)
    _add_embeddings_arg(g)
    _add_style_args(g)
    _add_wildcard_args(g)
    g.add_argument("--out", default="out.png", help="output PNG (several images: name-0.png, name-1.png, ...)")
    g.add_argument("--lora", action="append", default=[], metavar="NAME[:W[:TE_W]][:start=N][:stop=N][:lbw=B]",
                   help="apply an adapter from the library (or a .safetensors path) with UNet weight W and "
                        "text-encoder weight TE_W (default 1; range -10..10); repeatable. start=N / stop=N: its "
                        "UNet part acts from sampler step N (0-based) / up to step N only. lbw=B: block weights "
                        "as the LoRA Block Weight extension takes them (a preset: INALL, OUTD, MIDD, … or 17/26 "
                        "numbers, SDXL 12/20). The prompt may also carry AUTOMATIC1111 tags: <lora:NAME:W> or "
                        "<lora:NAME:TE_W:UNET_W>, with :start=N / :stop=N / :lbw=B")
    _add_library_arg(g)
    g.set_defaults(func=cmd_generate)

    gr = sub.add_parser("grid", help="one prompt and seed across adapter weights, adapters or checkpoints: "
                                     "one labelled image",
                        description="An AUTOMATIC1111-style X/Y plot: the same prompt and seed generated once per "
                                    "column, composed into one labelled PNG (its `parameters` describe the grid).")
    _add_base_args(gr)
    _add_request_args(gr, default_out="grid.png")
    mode = gr.add_mutually_exclusive_group(required=True)
    mode.add_argument("--lora", metavar="NAME[:W][:start=N]",
                      help="the adapter whose weight varies across the columns (see --weights); a step range "
                           "given here holds in every column")
    mode.add_argument("--loras", metavar="A,B,C", help="compare these adapters, one per column, at --weight")
    for attr, _, metavar, help_text, _ in _SETTING_AXES:
        mode.add_argument("--" + attr.replace("_", "-"), metavar=metavar, help=help_text)
    mode.add_argument("--checkpoints", metavar="RUN", help="compare the saved checkpoints of training run RUN "
                      "(<library>/runs/RUN/checkpoints/step-*) and its finished adapter, at --weight")
    gr.add_argument("--weights", default="0,0.25,0.5,0.75,1", metavar="W1,W2,...",
                    help="weights for --lora (default 0,0.25,0.5,0.75,1; range -10..10)")
    gr.add_argument("--starts", default=None, metavar="N1,N2,...",
                    help="with --lora: vary the sampler step the adapter acts from instead of its weight (0 = every "
                         "step; the adapter at --weight), e.g. 0,5,10,15")
    gr.add_argument("--weight", type=float, default=None,
                    help="the weight for --loras, --checkpoints and --starts (default 1; with --starts, the one "
                         "given as --lora NAME:W)")
    axes = (("rows", "a second axis", "(A1111's X/Y plot), one row per value"),
            ("z", "a third axis", "(A1111's X/Y/Z plot), one X/Y grid per value, one under the other"))
    for prefix, axis, how in axes:
        group = gr.add_mutually_exclusive_group()
        group.add_argument(f"--{prefix}-weights", metavar="W1,W2,...",
                           help=f"{axis} {how}: the weight of the adapter each column compares (with --checkpoints, "
                                "--loras or --starts), e.g. checkpoints x weights")
        for attr, _, metavar, _, what in _SETTING_AXES:
            group.add_argument(f"--{prefix}-" + attr.replace("_", "-"), metavar=metavar, help=f"{axis}: {what}")
    _add_library_arg(gr)
    gr.set_defaults(func=cmd_grid)

    t = sub.add_parser("train", help="train a LoRA adapter from a folder of images",
                       description="Train a LoRA adapter. Options given here override those of --config.")
    t.add_argument("--config", default=None, help="a TOML file with TrainConfig keys (top level or a [train] table), "
                                                 "or a kohya_ss GUI config (.json)")
    add_train_config_args(t)  # every TrainConfig field, from its metadata (training/config.py)
    t.add_argument("--num-processes", type=int, default=None,
                   help="train with N processes (one per GPU; on a CPU, N gloo processes) through "
                        "`accelerate launch`; --batch-size is per process")
    t.add_argument("--queue", action="store_true", default=None,
                   help="add the run to the jobs queue instead of training now; the app's worker or "
                        "`lora-studio jobs run` trains it (`lora-studio jobs` lists the queue)")
    t.set_defaults(func=cmd_train)

    u = sub.add_parser("ui", help="start the browser app (what `lora-studio` with no command does)",
                       description="Start the LoRA Studio browser app (Train, Generate, Library).")
    u.add_argument("--base", default=None, help="base model (default: the embedded toy model); more models can be "
                   "put in $LORA_STUDIO_HOME/models")
    u.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this computer only)")
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--share", action="store_true", help="also publish on a public gradio.live URL (needs --auth)")
    u.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login")
    u.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt/.pt/.bin files (they can run code when loaded: only for files you trust)")
    u.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")
    _add_library_arg(u)
    u.set_defaults(func=cmd_ui)

    j = sub.add_parser("jobs", help="the training queue and its history: list (the default), run, stop, resume",
                       description="Training jobs of the app's home ($LORA_STUDIO_HOME): queued with the app or "
                                   "`lora-studio train --queue`, trained one at a time, each as its own process.")
    _add_home_arg(j)
    j.set_defaults(func=cmd_jobs_list)  # `lora-studio jobs` alone lists them
    jsub = j.add_subparsers(dest="jobs_command", metavar="ACTION")
    p = jsub.add_parser("list", help="id, name, state, step/total, started, finished of every job")
    p.add_argument("--limit", type=int, default=None, help="only the last N jobs")
    _add_home_arg(p, suppress=True)
    p.set_defaults(func=cmd_jobs_list)
    p = jsub.add_parser("run", help="train the queued jobs here, one at a time, without the app",
                        description="Train the queued jobs in this terminal (headless), oldest first, each as its "
                                    "own process; waits while the app trains one. Ctrl-C stops the job training "
                                    "now after its step (a checkpoint is kept) and ends.")
    p.add_argument("--wait", action="store_true", help="keep waiting for new jobs when the queue is empty")
    _add_home_arg(p, suppress=True)
    p.set_defaults(func=cmd_jobs_run)
    p = jsub.add_parser("stop", help="take a queued job out of the queue, or stop a training one (checkpoint kept)")
    p.add_argument("id", type=int)
    _add_home_arg(p, suppress=True)
    p.set_defaults(func=cmd_jobs_stop)
    p = jsub.add_parser("resume", help="queue a stopped or interrupted run to continue from its latest checkpoint",
                        description="Queue the run of job ID (or the run called NAME) to continue from its latest "
                                    "checkpoint with its own options, as the app's Resume does; `jobs run` trains "
                                    "it here, or the app's worker does while the app runs.")
    p.add_argument("run", metavar="ID|NAME")
    _add_home_arg(p, suppress=True)
    p.set_defaults(func=cmd_jobs_resume)

    e = sub.add_parser("embeddings", help="the textual-inversion embeddings a prompt can name: word, vectors, "
                                          "model family, size, hash")
    _add_embeddings_arg(e)
    how = e.add_mutually_exclusive_group()
    how.add_argument("--rename", nargs=2, metavar=("OLD", "NEW"),
                     help="rename an embedding (and its preview and card): prompts then write NEW")
    how.add_argument("--delete", metavar="NAME", help="delete an embedding with its preview and card")
    e.set_defaults(func=cmd_embeddings)
    w = sub.add_parser("wildcards", help="the wildcard files a prompt can name as __name__, with their line counts; "
                                         "--draw TEMPLATE shows what a dynamic prompt gives")
    w.add_argument("--wildcards", default=None, metavar="DIR",
                   help="the wildcards folder (default: $LORA_STUDIO_HOME/wildcards)")
    w.add_argument("--draw", default=None, metavar="TEMPLATE",
                   help="print the prompts this template gives (one a line) instead of the list")
    w.add_argument("--num", type=int, default=5, metavar="N", help="with --draw: how many prompts (default 5)")
    w.add_argument("--seed", type=int, default=0, help="with --draw: image 0's seed (prompt i is drawn by seed + i)")
    w.add_argument("--combinatorial", action="store_true", help="with --draw: every combination, at most --num")
    w.set_defaults(func=cmd_wildcards)

    lo = sub.add_parser("loras", help="the adapter library: list (the default), info, import, export, bake, resize, "
                                      "extract, preview, rename, rm")
    _add_library_arg(lo)
    lo.set_defaults(func=cmd_loras_list)  # `lora-studio loras` alone lists them
    lsub = lo.add_subparsers(dest="loras_command", metavar="ACTION")
    p = lsub.add_parser("list", help="list the adapters in the library")
    _add_library_arg(p, suppress=True)
    p.set_defaults(func=cmd_loras_list)
    p = lsub.add_parser("import", help="copy a .safetensors LoRA into the library (checked first)")
    p.add_argument("file")
    p.add_argument("--name", default=None, help="library name (default: the file name)")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter of the same name")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .pt/.bin/.ckpt (they can run code when loaded: only for files you trust)")
    _add_library_arg(p, suppress=True)
    p.set_defaults(func=cmd_loras_import)
    p = lsub.add_parser("export", help="write an adapter in another format")
    p.add_argument("name")
    p.add_argument("--format", default="kohya", choices=["kohya", "peft", "embedding"],
                   help="kohya: AUTOMATIC1111/ComfyUI/kohya_ss keys (with its bundled embedding, if any); peft: "
                        "diffusers keys (a bundled embedding goes beside as <name>_emb.safetensors); embedding: only "
                        "the bundled embedding of a pivotal-tuned adapter, for an embeddings folder (ComfyUI)")
    p.add_argument("--out", default=None, help="output file or folder (default: <library>/exports/)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="cast the weights (fp16: half the size); default: as they are")
    p.add_argument("--base", default=None,
                   help="the base model the adapter was trained on; needed only for an SDXL adapter whose file does "
                        "not record its UNet layout (files trained here do) and for a LyCORIS file (LoHa/LoKr) "
                        "whose convolutions are stored flattened")
    _add_library_arg(p, suppress=True)
    p.set_defaults(func=cmd_loras_export)
    p = lsub.add_parser("bake", help="merge a weighted stack of adapters into one adapter file (or a full checkpoint)",
                        description="Bake adapters at their weights into ONE adapter file that reproduces the stack "
                                    "exactly, or with --checkpoint into a full single-file base model checkpoint "
                                    "(loads in AUTOMATIC1111/ComfyUI and as --base here).")
    _add_base_args(p)
    p.add_argument("--lora", action="append", required=True, metavar="NAME[:W[:TE_W]]",
                   help="an adapter from the library (or a .safetensors path) with UNet weight W and text-encoder "
                        "weight TE_W (default 1); repeatable")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--checkpoint", action="store_true",
                   help="write the base model with the stack merged in (a full single-file checkpoint)")
    p.add_argument("--rank", type=int, default=None,
                   help="an adapter file at this rank (the stack's ranks add up; `loras resize` does the same)")
    _add_keep_arg(p)
    _add_library_arg(p, suppress=True)
    p.set_defaults(func=cmd_loras_bake)
    p = lsub.add_parser("resize", help="a smaller copy of an adapter at a lower rank (SVD: each layer's best "
                                       "approximation of that rank)",
                        description="Write adapter NAME at a lower rank into the library (as NAME-rN, or --name) or "
                                    "to --out: each layer keeps the leading singular vectors of its weight difference "
                                    "(kohya_ss' Resize LoRA). --keep 0.99 picks per layer the fewest ranks that hold "
                                    "99% of its ‖ΔW‖² (with --rank as the most).")
    p.add_argument("name", help="a library adapter's name")
    p.add_argument("--rank", type=int, default=None, help="the new rank (the most, with --keep)")
    _add_keep_arg(p)
    _add_new_adapter_args(p, "library name of the result (default: NAME-rN)", "the adapter's own")
    p.add_argument("--base", default=None,
                   help="the base model; needed only for an SDXL file without its UNet layout or a LyCORIS file "
                        "with flattened convolutions")
    _add_library_arg(p, suppress=True)
    p.set_defaults(func=cmd_loras_resize)
    p = lsub.add_parser("extract", help="a LoRA from a fine-tuned checkpoint: the difference to its base model, "
                                        "by SVD",
                        description="Extract the weight difference between a fine-tuned model (--tuned) and the base "
                                    "it was tuned from (--base) as a LoRA (kohya_ss' Extract LoRA): the UNet's "
                                    "transformer layers, with --conv-rank its ResNet blocks (the 3x3 convolutions "
                                    "at that rank, as kohya's LoCon), and the text encoders when they changed. It "
                                    "goes into the library as --name, or to --out.")
    _add_base_args(p)
    p.add_argument("--tuned", required=True, help="the fine-tuned model: a diffusers folder or single-file checkpoint")
    p.add_argument("--rank", type=int, default=None, help="rank of each layer (the most, with --keep)")
    _add_keep_arg(p)
    p.add_argument("--conv-rank", type=int, default=None,
                   help="also the UNet's ResNet blocks (their 3x3 convolutions at this rank)")
    p.add_argument("--text-min-diff", type=float, default=None, metavar="D",
                   help="a text encoder whose weights moved less than D everywhere is left out (default 0.01, "
                        "kohya's)")
    _add_new_adapter_args(p, "library name of the result", "fp32")
    _add_library_arg(p, suppress=True)
    p.set_defaults(func=cmd_loras_extract)
    p = lsub.add_parser("preview", help="make an image the adapter's preview (NAME.png: the card here, in "
                                        "AUTOMATIC1111 and ComfyUI)")
    p.add_argument("name", help="a library adapter's name")
    p.add_argument("image", help="a picture file (a PNG made with the adapter, say)")
    _add_library_arg(p, suppress=True)
    p.set_defaults(func=cmd_loras_preview)
    p = lsub.add_parser("info", help="what an adapter is: base, trigger, rank, layers, training, the model card's "
                                     "suggestions (a library name or any .safetensors file)")
    p.add_argument("name", help="a library adapter's name, or the path of an adapter file")
    p.add_argument("--base", default=None,
                   help="also check that it fits this base model (a folder, single file or hub id)")
    show = p.add_mutually_exclusive_group()
    show.add_argument("--card", action="store_true", help="print the adapter's model card (NAME.md)")
    show.add_argument("--metadata", action="store_true", help="print every metadata key of the file as JSON")
    _add_library_arg(p, suppress=True)
    p.set_defaults(func=cmd_loras_info)
    p = lsub.add_parser("rename", help="rename an adapter (its preview and model card follow)")
    p.add_argument("old")
    p.add_argument("new")
    _add_library_arg(p, suppress=True)
    p.set_defaults(func=cmd_loras_rename)
    p = lsub.add_parser("rm", help="delete an adapter and its preview, model card and config")
    p.add_argument("name")
    _add_library_arg(p, suppress=True)
    p.set_defaults(func=cmd_loras_rm)
    return ap


def _add_request_args(p: argparse.ArgumentParser, default_out: str) -> None:
    """The GenerationRequest options (as `generate` has them)."""
    p.add_argument("--prompt", required=True, help="may carry AUTOMATIC1111 tags <lora:NAME:W> applied to every tile")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance (CFG) scale")
    p.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed (the same for every tile; recorded)")
    p.add_argument("--width", type=int, default=None, help="default: the model's native size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1, help="several: one row per seed")
    _add_variation_args(p, defaults=True)
    p.add_argument("--scheduler", default="DPM++ 2M Karras", help=SAMPLER_HELP)
    p.add_argument("--clip-skip", type=int, default=1, metavar="N", help=CLIP_SKIP_HELP)
    _add_hires_args(p, defaults=True)
    _add_vae_arg(p)
    _add_embeddings_arg(p)
    _add_style_args(p)
    _add_wildcard_args(p, grid=True)
    p.add_argument("--out", default=default_out, help=f"output PNG (default {default_out})")


def _add_keep_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", type=float, default=None, metavar="SHARE",
                   help="per layer, the fewest ranks that keep this share of ‖ΔW‖² (e.g. 0.99)")


def _add_new_adapter_args(p: argparse.ArgumentParser, name_help: str, precision_default: str) -> None:
    """Where a made adapter goes (resize, extract): into the library, or a file."""
    p.add_argument("--name", dest="new_name", default=None, help=name_help)
    p.add_argument("--out", default=None, help="write a file here instead of into the library")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help=f"cast the weights (fp16: half the size of fp32); default: {precision_default}")
    p.add_argument("--overwrite", action="store_true", help="replace a library adapter of the same name")


def _add_library_arg(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    # on `loras ACTION` parsers too (SUPPRESS: absent there, the value given before ACTION stays)
    p.add_argument("--library", default=argparse.SUPPRESS if suppress else None,
                   help="adapter library folder (default: $LORA_STUDIO_HOME/loras, ~/.local/share/lora-studio/loras)")


def _add_home_arg(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    p.add_argument("--home", default=argparse.SUPPRESS if suppress else None,
                   help="the app's home folder holding jobs.sqlite (default: $LORA_STUDIO_HOME, "
                        "~/.local/share/lora-studio)")


def _home(value: str | None) -> Path:
    from pipelines.library import default_home

    return Path(value).expanduser() if value else default_home()


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from training.jobs import JobQueue

    q = JobQueue(_home(args.home), worker=False)
    jobs = q.jobs()
    if getattr(args, "limit", None):
        jobs = jobs[-args.limit:]
    if not jobs:
        print(f"no jobs in {q.store.path}")
        return 0
    print(f"{'ID':>4}  {'NAME':<28} {'STATE':<12} {'STEP':>11}  {'STARTED':<16}  FINISHED")
    for job in jobs:
        print(f"{job.id:>4}  {job.name:<28} {job.state:<12} {f'{job.step}/{job.total}':>11}  {_when(job.started):<16}  "
              f"{_when(job.finished)}")
        if job.error and job.state in ("failed", "interrupted"):
            print(f"      {job.error.splitlines()[0][:300]}")
    return 0


def cmd_jobs_run(args: argparse.Namespace) -> int:
    from training.jobs import JobQueue

    q = JobQueue(_home(args.home), worker=False)
    print(f"training the queued jobs of {q.store.path} (Ctrl-C stops the one training, keeping a checkpoint)")

    def report(job, _phase: str) -> None:
        what = {"done": f"wrote {job.result.adapter_path}" if job.result else "",
                "stopped": f"checkpoint {job.result.checkpoint}" if job.result and job.result.checkpoint else ""}
        detail = what.get(job.state, job.error or "")
        print(f"job {job.id} '{job.name}': {job.state} at step {job.step}/{job.total}" + (f"; {detail}" if detail
              else "") + f" (log: {job.log_path})", flush=True)

    done = q.run_pending(wait=args.wait, on_job=report)
    if not done:
        print("no queued jobs")
    return 1 if any(j.state == "failed" for j in done) else 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    from training.jobs import JobQueue

    q = JobQueue(_home(args.home), worker=False)
    job = q.get(args.id)
    if job is None:
        raise _usage(f"jobs stop: no job {args.id} in {q.store.path}")
    if not job.active:
        print(f"job {job.id} '{job.name}' is already {job.state}")
        return 0
    was = job.state
    q.stop(job.id)
    print(f"took job {job.id} '{job.name}' out of the queue" if was == "queued" else
          f"stopping job {job.id} '{job.name}' after its current step; a checkpoint is kept")
    return 0


def cmd_jobs_resume(args: argparse.Namespace) -> int:
    from app.studio import Studio
    from training.jobs import JobQueue

    home = _home(args.home)
    q = JobQueue(home, worker=False)
    # a job id, else a run's name (a run may be called '2024'); its run folder is in the library it trained into
    job = q.get(int(args.run)) if args.run.isdigit() else None
    if job is None:
        job = max((j for j in q.jobs() if j.name.casefold() == args.run.casefold()), key=lambda j: j.id, default=None)
    if job is None and args.run.isdigit():
        raise _usage(f"jobs resume: no job {args.run} in {q.store.path}, and no run called '{args.run}'")
    name, library = (job.name, job.config.output_dir) if job is not None else (args.run, None)
    new = Studio(home, library=library, queue=q).resume(name)
    print(f"queued job {new.id} '{new.name}' to continue from its latest checkpoint; `lora-studio jobs run` "
          "trains it here (the app's worker takes it while the app runs)")
    return 0


_REQUEST_FIELDS = ("negative_prompt", "steps", "guidance", "seed", "width", "height", "scheduler", "clip_skip",
                   "hires_scale", "hires_steps", "hires_upscaler", "denoising_strength", "init_image", "mask_image",
                   "mask_blur", "subseed", "subseed_strength", "tiling", "cfg_rescale", "zero_terminal_snr",
                   "batch_size")


def _generate_request(args: argparse.Namespace):
    """The request of `generate`: its options, over what --from-png recorded, over the defaults; and the
    notes on what of the recorded image cannot be made the same way (and the recorded model's name)."""
    from dataclasses import fields

    from pipelines.generation import GenerationRequest

    values = {f.name: f.default for f in fields(GenerationRequest) if f.name in _REQUEST_FIELDS}
    notes, model = [], None
    args.vae_path = _vae_path(args.vae)
    args.recalled_a1111 = True
    if args.from_png:
        from pipelines.library import AdapterLibrary
        from pipelines.recall import read_parameters, recall

        got = recall(read_parameters(args.from_png), AdapterLibrary(args.library), embeddings=_embeddings_folder(args))
        args.recalled_a1111 = got.a1111
        r = got.request
        values.update(prompt=got.tagged_prompt, negative_prompt=r.negative_prompt, steps=r.steps,
                      guidance=r.guidance, seed=r.seed, width=r.width, height=r.height, scheduler=r.scheduler,
                      clip_skip=r.clip_skip, hires_scale=r.hires_scale, hires_steps=r.hires_steps,
                      hires_upscaler=r.hires_upscaler, denoising_strength=r.denoising_strength,
                      mask_blur=r.mask_blur, subseed=r.subseed, subseed_strength=r.subseed_strength,
                      tiling=r.tiling, cfg_rescale=r.cfg_rescale, zero_terminal_snr=r.zero_terminal_snr)
        notes, model = got.notes, got.model
        if got.vae and args.vae is None:  # the recorded VAE, where it is in the VAE folder
            args.vae_path = _vae_in_folder(got.vae)
            if args.vae_path is None:
                notes.append(f"the image was decoded with the VAE '{got.vae}', which is not in "
                             f"{_models_folder('VAE')} (or give it with --vae): the model's own is used, colours "
                             "may differ")
    elif args.prompt is None:
        raise _usage("generate: give --prompt TEXT, or --from-png IMAGE to make an image again")
    values.update({k: v for k in (*_REQUEST_FIELDS, "prompt") if (v := getattr(args, k)) is not None})
    values["prompt"], values["negative_prompt"] = _with_styles(args, values["prompt"], values["negative_prompt"] or "")
    return GenerationRequest(num_images=args.num_images, **values), notes, model


def cmd_generate(args: argparse.Namespace) -> int:
    from pipelines.base_models import load_base
    from pipelines.generation import generate, output_paths, save_png
    from pipelines.wildcards import plan, run

    req, notes, recorded_model = _generate_request(args)
    loras = [_lora_entry(x) for x in args.lora]
    drawn = plan(req, _wildcards(args), combinatorial=args.combinatorial, fixed_seed=args.fixed_seed)
    notes += drawn.notes
    t0 = time.time()
    base = load_base(args.base, **_base_kwargs(args))
    if base.schedule_note:
        print(f"note: {base.schedule_note}", file=sys.stderr)
    if args.vae_path is not None:
        from pipelines.vae import use_vae

        use_vae(base, args.vae_path, args.allow_pickle)
    _embeddings_into(base, args, drawn.prompts)
    t1 = time.time()
    if args.from_png and args.clip_skip is None:  # A1111 records Clip skip on SDXL images too
        from pipelines.recall import for_family

        req = for_family(req, base.family, notes, a1111=args.recalled_a1111)
        drawn.requests = [replace(r, clip_skip=req.clip_skip) for r in drawn.requests]
    if recorded_model and recorded_model != base.name:
        notes.append(f"the image was made with the base model '{recorded_model}'; this is '{base.name}' "
                     "(choose it with --base): the picture will differ")
    for line in notes:
        print(f"note: {line}")
    if loras or any("<lora:" in r.prompt.lower() for r in drawn.requests):
        from pipelines.library import AdapterLibrary
        from pipelines.stack import AdapterStack, clip_skip_warnings, range_warnings

        stack = AdapterStack(base, AdapterLibrary(args.library), allow_pickle=args.allow_pickle)
        for entry, path in loras:
            if path is not None:
                stack.load(entry.name, path)
        images = run(drawn, lambda r: stack.generate(r, [e for e, _ in loras]))
        for line in (stack.interference().warnings + range_warnings(stack.stack, req.steps)
                     + clip_skip_warnings(stack, req.clip_skip)):
            print(f"warning: {line}")
        for line in _step_range_hints(stack, req.steps):
            print(line)
    else:
        images = run(drawn, lambda r: generate(base, r))
    t2 = time.time()
    templated = bool(drawn.templates)
    for img, path in zip(images, output_paths(args.out, len(images))):
        save_png(img, path)
        print(f"wrote {path} (seed {img.seed})" + (f": {img.parameters.split(chr(10))[0]}" if templated else ""))
    print(f"{base.name} ({base.family}) loaded in {t1 - t0:.1f}s; {len(images)} image(s) in {t2 - t1:.1f}s")
    return 0


def _step_range_hints(stack, steps: int) -> list[str]:
    """For each adapter used at every step whose model card suggests a later start: say so, with the option."""
    lines = []
    for e in stack.stack:
        info = stack.loaded.get(e.name)
        if info is None or e.start or e.stop is not None or e.weight == 0:
            continue
        if (start := info.suggested_start(steps)) is not None:
            lines.append(f"note: the model card of {e.name} suggests acting from step {start} of {steps}, which keeps "
                         f"more of the base: {replace(e, start=start).tag()} in the prompt, or --lora "
                         f"{e.name}:{e.weight:g}:start={start}")
    return lines


def _numbers(text: str, flag: str, cast=float, kind: str = "numbers") -> list:
    try:
        return [cast(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise _usage(f"grid: {flag} must be {kind} separated by commas, got '{text}'") from None




def _settings_axis(args: argparse.Namespace, req, prefix: str = "") -> tuple[list, str] | None:
    """The grid's settings axis given by --cfgs / --step-counts / --samplers / --prompt-sr (with `prefix` 'rows_':
    the --rows-… second axis): its entries and its name; None when none of them is given."""
    from pipelines.grid import settings_axis, split_values

    for attr, kind, *_ in _SETTING_AXES:
        text = getattr(args, prefix + attr)
        if not text:
            continue
        flag = "--" + (prefix + attr).replace("_", "-")
        values = (_numbers(text, flag) if kind == "guidance"
                  else _numbers(text, flag, int, "whole step numbers") if kind == "steps"
                  else split_values(text) if kind == "prompt_sr"
                  else [n.strip() for n in text.split(",") if n.strip()])
        return settings_axis(kind, values, req)
    return None


def _grid_rows(args: argparse.Namespace, req, prefix: str = "rows_") -> tuple[list, str]:
    """The grid's second axis (--rows-…), or with `prefix` 'z_' its third (--z-…): its values and its name; none
    without it."""
    from pipelines.grid import weight_rows

    weights = getattr(args, prefix + "weights")
    if weights:
        flag = "--" + (prefix + "weights").replace("_", "-")
        if args.lora and args.starts is None:
            raise _usage(f"grid: {flag} with --lora: the columns vary its weight already (use --starts, or "
                         "--checkpoints, for the columns)")
        return weight_rows(_numbers(weights, flag)), "weight"
    return _settings_axis(args, req, prefix) or ([], "")


def cmd_grid(args: argparse.Namespace) -> int:
    from pipelines.generation import GenerationRequest, output_paths, save_png
    from pipelines.grid import (adapter_columns, checkpoint_columns, grid_prompts, make_grid, range_words,
                                start_columns, weight_columns)

    args.prompt, args.negative_prompt = _with_styles(args, args.prompt, args.negative_prompt)
    req = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
        seed=args.seed, width=args.width, height=args.height, num_images=args.num_images,
        scheduler=args.scheduler, clip_skip=args.clip_skip, hires_scale=args.hires_scale,
        hires_steps=args.hires_steps, hires_upscaler=args.hires_upscaler, denoising_strength=args.denoising_strength,
        init_image=args.init_image, mask_image=args.mask_image, mask_blur=args.mask_blur,
        subseed=args.subseed, subseed_strength=args.subseed_strength, tiling=args.tiling,
        cfg_rescale=args.cfg_rescale,
    )
    from pipelines.wildcards import draw_once

    req, templates = draw_once(req, _wildcards(args))  # one prompt for every tile
    weights = _numbers(args.weights, "--weights") if args.lora else []
    if args.starts is not None and not args.lora:
        raise _usage("grid: --starts varies one adapter: give it with --lora NAME")
    starts = _numbers(args.starts, "--starts", int, "whole step numbers") if args.starts is not None else []
    weight = 1.0 if args.weight is None else args.weight
    t0 = time.time()
    stack = _stack_for(args)
    t1 = time.time()
    if args.lora:
        [entry] = _entries_into(stack, [args.lora])
        if args.starts is not None:  # the weight of --weight, else the one given with --lora NAME:W
            entry = entry if args.weight is None else replace(entry, weight=args.weight, te_weight=None)
            columns, axis = start_columns(entry.name, starts, [entry]), f"{entry.name} acting"
        else:  # a step range given with --lora NAME:W:start=N holds in every column
            columns = weight_columns(entry.name, weights, [entry])
            axis = f"{entry.name} weight{range_words(columns[0].entries[-1])}"
    elif args.loras:
        entries = _entries_into(stack, [n.strip() for n in args.loras.split(",") if n.strip()])
        columns, axis = adapter_columns([e.name for e in entries], weight), f"LoRA at {weight:g}"
    elif settings := _settings_axis(args, req):
        columns, axis = settings
    else:
        columns, axis = checkpoint_columns(stack, args.checkpoints, weight), f"{args.checkpoints} checkpoint"
    rows, row_axis = _grid_rows(args, req)
    zs, z_axis = _grid_rows(args, req, "z_")
    # every column's prompts: a word Prompt S/R swaps in may name an embedding
    _embeddings_into(stack.model, args, grid_prompts(req, [*columns, *rows, *zs]))
    result = make_grid(stack, req, columns, axis=axis, rows=rows, row_axis=row_axis, zs=zs, z_axis=z_axis)
    [path] = output_paths(args.out, 1)
    from pipelines.generation import with_pairs

    save_png(result.image, path, with_pairs(result.parameters, templates))
    t2 = time.time()
    labels = ", ".join(c.label for c in result.columns)
    print(f"wrote {path}: {len(result.columns)} tiles ({labels}), seed {req.seed}")
    print(f"{stack.model.name} ({stack.model.family}) loaded in {t1 - t0:.1f}s; grid in {t2 - t1:.1f}s")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from app.options import check_launch_options

    check_launch_options(args.share, args.auth)  # refused before anything heavy is loaded
    from app.ui import main_ui

    return main_ui(base=args.base, host=args.host, port=args.port, share=args.share, auth=args.auth,
                   library=args.library, allow_pickle=args.allow_pickle, device=args.device)


def _lora_entry(text: str):
    """--lora NAME[:W[:TE_W]]; NAME may be a path to a weights file (then named after the file): one with
    a path separator or a weights ending (.safetensors; .ckpt/.pt/.bin with --allow-pickle)."""
    from dataclasses import replace

    from pipelines.stack import parse_lora_arg
    from pipelines.weights_io import PICKLE_SUFFIXES

    e = parse_lora_arg(text)
    p = Path(e.name).expanduser()
    suffix = p.suffix.lower()
    has_sep = "/" in e.name or os.sep in e.name or bool(os.altsep and os.altsep in e.name)
    if suffix == ".safetensors" and not has_sep and not p.is_file():
        return e, None  # 'style.safetensors': the library's 'style'
    if suffix not in (".safetensors", *PICKLE_SUFFIXES) and not has_sep:
        if ":" in e.name:  # a library name has no ':': what follows one is a mistyped weight
            head, _, tail = e.name.rpartition(":")
            if re.fullmatch(r"\s*[-+]?[\d.]+\s*", tail):
                raise _usage(f"--lora {text}: at most two weights (UNet, then text encoder)")
            raise _usage(f"--lora {text}: weight '{tail}' of '{head}' is not a number; the form is "
                         "NAME[:WEIGHT[:TEXT_ENCODER_WEIGHT]][:start=N][:stop=N]")
        return e, None  # a library name
    if not p.is_file():
        kind = "a file path" if has_sep else f"a '{p.suffix}' file"
        raise _usage(f"--lora {e.name}: no such file. That is {kind}, not a library name: a file must exist "
                     "(.safetensors; .ckpt/.pt/.bin need --allow-pickle), a library adapter is given by its name "
                     "as `lora-studio loras` lists it")
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise _usage(f"--lora {e.name}: not an adapter file (expected .safetensors, or .ckpt/.pt/.bin with "
                     "--allow-pickle)")
    return replace(e, name=p.stem), p


def _library(args: argparse.Namespace):
    from pipelines.library import AdapterLibrary

    return AdapterLibrary(args.library, allow_pickle=getattr(args, "allow_pickle", False))


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_embeddings(args: argparse.Namespace) -> int:
    """`lora-studio embeddings`: the embeddings folder, a row per file (a file that cannot be read: a warning);
    `--rename OLD NEW` and `--delete NAME` manage it (with the preview and card beside each file)."""
    from pipelines.embeddings import delete_embedding, describe_embeddings, rename_embedding

    folder = _embeddings_folder(args)
    if args.rename:
        path = rename_embedding(folder, *args.rename)
        print(f"renamed to {path}: write '{path.stem}' in a prompt from now on")
        return 0
    if args.delete:
        gone = delete_embedding(folder, args.delete)
        print("deleted " + ", ".join(p.name for p in gone))
        return 0
    rows = describe_embeddings(folder)
    if not rows:
        print(f"no embeddings in {folder}")
        return 0
    print(f"{'WORD':<28} {'VECTORS':>7} {'FAMILY':<9} {'SIZE':>9}  {'HASH':<12}")
    for e in rows:
        if e.error:
            print(f"warning: {e.path.name}: {e.error}", file=sys.stderr)
            continue
        extra = ("  [preview]" if e.preview else "") + ("  [card]" if e.card else "")
        print(f"{e.word:<28} {e.vectors:>7} {e.family:<9} {_human(e.size):>9}  {e.hash:<12}{extra}")
    return 0


def cmd_wildcards(args: argparse.Namespace) -> int:
    """`lora-studio wildcards`: the wildcard files and their line counts, or what a template draws."""
    from pipelines.wildcards import draw, every

    cards = _wildcards(args)
    if args.draw is not None:
        if args.num < 1:
            raise _usage("wildcards: --num must be 1 or more")
        if args.combinatorial:
            prompts, more = every(args.draw, cards, args.num)
        else:
            prompts, more = [draw(args.draw, args.seed + i, cards) for i in range(args.num)], False
        for p in prompts:
            print(p)
        if more:
            print(f"note: more than {args.num} combinations; --num N shows more", file=sys.stderr)
        return 0
    lists = cards.lists()
    if not lists:
        print(f"no wildcards in {cards.folder} (a file name.txt there, one choice a line, is __name__ in a prompt)")
        return 0
    print(f"{'WILDCARD':<40} LINES")
    for name in cards.names():
        print(f"{'__' + name + '__':<40} {len(lists[name])}")
    return 0


def cmd_loras_list(args: argparse.Namespace) -> int:
    lib = _library(args)
    infos = lib.list()
    for name, problem in lib.problems.items():
        print(f"warning: {name}: {problem}", file=sys.stderr)
    if not infos:
        print(f"no adapters in {lib.root}")
        return 0
    print(f"{'NAME':<28} {'FAMILY':<7} {'RANK':>4} {'SIZE':>9}  {'HASH':<12}  TRIGGER")
    for i in infos:
        extra = "  [preview]" if i.preview else ""
        print(f"{i.name:<28} {i.family or '?':<7} {i.rank:>4} {_human(i.size):>9}  {i.short_hash:<12}  "
              f"{i.trigger_word}{extra}")
    return 0


def _info_lines(info, card: Path | None, in_library: bool) -> list[str]:
    """`loras info`: the adapter in rows of 'label  value'."""
    from pipelines.adapters import adapter_facts

    name = info.name
    rows = [("file", f"{info.path} ({_human(info.size)}, {info.format} keys)"), *adapter_facts(info)]
    rows.append(("use", (f"<lora:{name}:1> in a prompt, or --lora \"{name}:1\"" if in_library else
                         f"--lora {info.path} (or `lora-studio loras import` it into the library)")))
    if card is not None:
        rows.append(("model card", f"{card} (`lora-studio loras info {name} --card` prints it)"))
    if info.preview is not None:
        rows.append(("preview", str(info.preview)))
    width = max(len(k) for k, _ in rows) + 2
    return [name] + [f"  {k:<{width}}{v}" for k, v in rows]


def cmd_loras_info(args: argparse.Namespace) -> int:
    import json

    from pipelines.adapters import inspect_adapter

    lib = _library(args)
    _, path = _lora_entry(args.name)
    if path is None:  # a library name
        info = lib.info(args.name, check_tensors=True)
        in_library = True
    else:
        info = inspect_adapter(path, check_tensors=True)
        in_library = False
    if args.base:
        from pipelines.base_models import load_base

        base = load_base(args.base, device="cpu")
        checked = inspect_adapter(info.path, base, name=info.name, check_tensors=False, compute_hash=False)
        info.matched, info.total = checked.matched, checked.total
    card_path = info.path.with_name(info.path.stem + ".md")
    card = card_path if card_path.is_file() and not card_path.is_symlink() else None
    if args.card:
        if card is None:
            raise _usage(f"{args.name}: no model card ({card_path.name}) beside {info.path}")
        print(card.read_text(encoding="utf-8", errors="replace"), end="")
    elif args.metadata:
        print(json.dumps(info.metadata, indent=2, sort_keys=True, ensure_ascii=False))
    else:
        print("\n".join(_info_lines(info, card, in_library)))
    return 0


def cmd_loras_import(args: argparse.Namespace) -> int:
    info = _library(args).import_file(args.file, args.name, overwrite=args.overwrite, allow_pickle=args.allow_pickle)
    print(f"imported {info.name} ({info.format}, {info.family or 'unknown family'}, rank {info.rank}) -> {info.path}")
    return 0


def cmd_loras_export(args: argparse.Namespace) -> int:
    base = None
    if args.base:
        from pipelines.base_models import load_base

        base = load_base(args.base, device="cpu")
    out = _library(args).export(args.name, args.format, args.out, precision=args.precision, base=base)
    print(f"wrote {out} ({args.format}{', ' + args.precision if args.precision else ''})")
    return 0


def _into_library(args: argparse.Namespace, name: str, write) -> Path:
    """Write a new adapter with `write(path)`: to --out, or into the library as `name` (checked on the way in)."""
    if args.out:
        out = Path(args.out).expanduser()
        if out.suffix.lower() != ".safetensors":
            raise _usage(f"--out must be a .safetensors file, got '{out}'")
        write(out)
        return out
    return _library(args).create(name, write, overwrite=args.overwrite).path


def cmd_loras_preview(args: argparse.Namespace) -> int:
    if not Path(args.image).is_file():
        raise _usage(f"preview: {args.image}: no such file")
    print(f"wrote {_library(args).set_preview(args.name, args.image)}")
    return 0


def cmd_loras_resize(args: argparse.Namespace) -> int:
    from pipelines.resize import check_rank_keep, resize_adapter, resized_name

    check_rank_keep(args.rank, args.keep)
    lib = _library(args)
    src = lib.path_for(args.name)
    base = None
    if args.base:
        from pipelines.base_models import load_base

        base = load_base(args.base, device="cpu")
    name = args.new_name or resized_name(src.stem, args.rank, args.keep)
    report = None

    def write(path):
        nonlocal report
        report = resize_adapter(src, path, rank=args.rank, keep=args.keep, base=base, precision=args.precision,
                                name=None if args.out else name)

    t0 = time.time()
    path = _into_library(args, name, write)
    size = src.stat().st_size
    print(f"wrote {path} ({_human(size)} -> {_human(path.stat().st_size)}) in {time.time() - t0:.1f}s")
    print(f"  {report.summary()}")
    return 0


def cmd_loras_extract(args: argparse.Namespace) -> int:
    from pipelines.base_models import load_base
    from pipelines.resize import TEXT_MIN_DIFF, extract_adapter

    if not args.out and not args.new_name:
        raise _usage("extract: give --name NAME (into the library) or --out FILE")
    from pipelines.resize import check_rank_keep

    check_rank_keep(args.rank, args.keep)
    t0 = time.time()
    kw = {**_base_kwargs(args), "device": args.device or "cpu"}
    base = load_base(args.base, **kw)
    tuned = load_base(args.tuned, **kw)
    if tuned.family != base.family:
        raise _usage(f"extract: --tuned is an {tuned.family} model, --base an {base.family} one")
    report = None

    def write(path):
        nonlocal report
        report = extract_adapter(base, tuned, path, rank=args.rank, keep=args.keep, conv_rank=args.conv_rank,
                                 name=args.new_name or Path(args.out).stem, precision=args.precision,
                                 text_min_diff=TEXT_MIN_DIFF if args.text_min_diff is None else args.text_min_diff)

    path = _into_library(args, args.new_name or Path(args.out).stem, write)
    print(f"wrote {path} ({_human(path.stat().st_size)}) in {time.time() - t0:.1f}s")
    print(f"  {report.summary()}")
    for what in report.skipped:
        if " " in what:  # a text encoder left out (single unchanged layers are not worth a line each)
            print(f"  left out: {what}")
    return 0


def _stack_for(args: argparse.Namespace):
    """Load the base model and an adapter stack on it; --lora values that are paths are loaded from there."""
    from pipelines.base_models import load_base
    from pipelines.stack import AdapterStack

    base = load_base(args.base, **_base_kwargs(args))
    if base.schedule_note:
        print(f"note: {base.schedule_note}", file=sys.stderr)
    if (vae := _vae_path(getattr(args, "vae", None))) is not None:
        from pipelines.vae import use_vae

        use_vae(base, vae, args.allow_pickle)
    return AdapterStack(base, _library(args), allow_pickle=args.allow_pickle)


def _entries_into(stack, texts: list[str]):
    entries = []
    for text in texts:
        entry, path = _lora_entry(text)
        if path is not None:
            stack.load(entry.name, path)
        entries.append(entry)
    return entries


def cmd_loras_bake(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise _usage(f"bake: --out must be a .safetensors file, got '{out}'")
    smaller = args.rank is not None or args.keep is not None
    if args.checkpoint and smaller:
        raise _usage("bake: --rank and --keep make a smaller adapter file; a --checkpoint holds full weights")
    if smaller:
        from pipelines.resize import check_rank_keep

        check_rank_keep(args.rank, args.keep)
    stack = _stack_for(args)
    entries = _entries_into(stack, args.lora)
    t0 = time.time()
    stack.set_stack(entries)
    if args.checkpoint:
        path = stack.bake_checkpoint(out)
        what = f"full {stack.model.family} checkpoint"
    else:
        what = "adapter"
        if smaller:  # --out is written once, finished
            from pipelines.resize import bake_resized

            report = bake_resized(stack, out, entries, rank=args.rank, keep=args.keep)
            path = out
            what += f", {report.summary()}"
        else:
            path = stack.bake(out)
    for line in stack.interference().warnings if len(entries) > 1 else []:
        print(f"warning: {line}")
    tags = " ".join(e.tag() for e in entries)
    print(f"wrote {path} ({what}, {tags}) in {time.time() - t0:.1f}s")
    if args.checkpoint:
        from pipelines.weights_io import read_metadata

        for name in filter(None, read_metadata(path).get("lora_studio.embeddings_beside", "").split(", ")):
            print(f"wrote {path.with_name(name)} (a trained trigger word: a checkpoint holds no embedding; put it "
                  "into the embeddings folder of AUTOMATIC1111, ComfyUI or this app)")
    return 0


def cmd_loras_rename(args: argparse.Namespace) -> int:
    info = _library(args).rename(args.old, args.new)
    print(f"renamed {args.old} -> {info.name}")
    return 0


def cmd_loras_rm(args: argparse.Namespace) -> int:
    gone = _library(args).delete(args.name)
    print(f"deleted {', '.join(p.name for p in gone)}")
    return 0


def quiet_libraries() -> None:
    """Silence library progress bars and advisory warnings; our own output says what happened."""
    import logging
    import os
    import warnings

    # diffusers imports torchao (when installed) at start-up; it announces each optional CUDA kernel it
    # cannot load, and torch's pytree a deprecation of torchao's: before any import, or they print
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


_TRAIN_ARG_EXCLUDE = {"command", "func", "config", "num_processes", "queue"}


def _module_list(text: str) -> list[str]:
    """'to_q, to_k,conv1' -> ['to_q', 'to_k', 'conv1']."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected module names separated by commas, e.g. to_q,to_k,to_v,to_out.0")
    return names


def add_train_config_args(p: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, generated from the field's metadata (training/config.py): a new
    field is on the command line without a line here. Every default is None (= not given), so a --config
    file's values and the presets are overridden only by what was typed."""
    from training.config import PRESET_KEYS, train_options

    for o in train_options():
        help_ = o.help.replace("%", "%%")
        if o.default not in (None, "", []) and o.kind is not bool:
            shown = ",".join(o.default) if isinstance(o.default, list) else o.default
            also = "; a --preset other than custom sets its own" if o.name in PRESET_KEYS else ""
            help_ += f" (default: {shown}{also})" if "default" not in o.help else ""
        kw: dict = {"dest": o.name, "default": None, "help": help_}
        if o.name == "output_dir":
            kw["metavar"] = "LIBRARY"  # as every other command names it
        if o.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction if o.negatable else "store_true"
        elif o.kind is list:
            if o.name == "optimizer_args":  # as kohya's: --optimizer-args d_coef=2 "betas=0.9,0.99"
                kw.update(action="extend", nargs="+", metavar="KEY=VALUE")
            elif o.list_style == "lines":
                kw.update(action="append", metavar="TEXT")
            else:
                kw.update(type=_module_list, metavar="M1,M2,...")
        elif o.name in _SPELLINGS:  # several spellings of one choice (kohya's sampler names, 'v'): the config's
            kw.update(type=str, metavar=_SPELLINGS[o.name])  # own check names the choices
        else:
            kw["type"] = o.kind
            if o.choices is not None:
                kw["choices"] = list(o.choices)
        p.add_argument(*o.flags, **kw)


# train options that take other spellings of their choices (read by TrainConfig): their metavar
_SPELLINGS = {"sample_sampler": "SAMPLER", "prediction_type": "{auto,epsilon,v_prediction}"}


def train_config_from_args(args: argparse.Namespace):
    """argv -> TrainConfig; nothing reads the argparse namespace after this."""
    from training.config import TrainConfig

    given = {k: v for k, v in vars(args).items() if k not in _TRAIN_ARG_EXCLUDE and v is not None}
    if args.config:
        return TrainConfig.from_toml(args.config, overrides=given)
    return TrainConfig.from_dict(given, source="command line")


def parse_train_args(argv: list[str]):
    args = build_parser().parse_args(["train", *argv])
    return train_config_from_args(args)


def cmd_train(args: argparse.Namespace) -> int:
    import signal
    import threading

    from training.jobstore import RunStatus
    from training.trainer import run_dir_for, train

    cfg = train_config_from_args(args)
    if not cfg.images and not cfg.dataset_config:
        raise _usage("train: --images (or --dataset-config, or images = ... in --config) is required")
    if cfg.images and cfg.dataset_config:
        raise _usage("train: --images and --dataset-config both name the training images: give one of them")
    from training.dataset import kohya_trigger

    kohya_gui = bool(args.config) and Path(args.config).suffix.lower() == ".json"
    if kohya_gui:  # what of the kohya_ss config was taken, and what was not
        from training.kohya_gui import read_kohya_gui

        print(f"{args.config}: read as a kohya_ss config: rank {cfg.rank}, {cfg.optimizer}, lr {cfg.lr_unet:g}, "
              f"{cfg.max_steps} steps, batch {cfg.batch_size}")
        for line in read_kohya_gui(args.config).notes:
            print(f"note: {line}")
    if (args.trigger is None and (not args.config or kohya_gui) and cfg.images
            and cfg.trigger == kohya_trigger(cfg.images)):
        print(f"trigger word: {cfg.trigger} (from the kohya folder names in {cfg.images}; --trigger to choose "
              "another)")
    if args.num_processes is not None and args.num_processes < 1:
        raise _usage(f"train: --num-processes must be 1 or more, got {args.num_processes}")
    from training.trainer import check_name_free

    check_name_free(cfg)  # before the run folder, its progress.json and any process: a name in use is refused here
    if (args.num_processes or 1) > 1 and "WORLD_SIZE" not in os.environ:
        return launch_processes(cfg, args.num_processes)
    if args.queue:
        return queue_training(cfg, args.num_processes)
    main_process = os.environ.get("RANK", "0") == "0"
    stop = threading.Event()

    def _on_sigint(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)
        stop.set()

    old = signal.signal(signal.SIGINT, _on_sigint)
    bar = _ProgressBar()
    # the run folder's progress.json: what a UI or `lora-studio jobs` shows of this run (one process writes it)
    run_dir = run_dir_for(cfg)
    new_run = not run_dir.exists()
    status = RunStatus(run_dir) if main_process else None
    try:
        res = train(cfg, on_progress=bar if status is None else _Both(bar, status), stop=stop)
    except BaseException as e:
        if status is not None:
            status.failed(e)
            if new_run and {p.name for p in run_dir.iterdir()} <= {"progress.json"}:
                shutil.rmtree(run_dir, ignore_errors=True)  # refused before it began: no run to keep
        raise
    finally:
        signal.signal(signal.SIGINT, old)
        bar.close()
    if not main_process:
        return 0
    status.finished(res)
    if res.stopped:
        print(f"stopped at step {res.steps}; resume with: lora-studio train ... --name {cfg.name} --resume latest"
              f" (checkpoint: {res.checkpoint})")
        return 130
    print(f"wrote {res.adapter_path} in {res.seconds / 60:.1f} min; final loss {res.final_loss:.4f}")
    if cfg.textual_inversion:
        print(f"an embedding: write '{cfg.name}' in a prompt where '{cfg.trigger}' was (its model card: "
              f"{res.adapter_path.with_suffix('.md')})")
    print(f"run folder (samples, log.csv, checkpoints): {res.run_dir}")
    return 0


class _Both:
    """Two progress callbacks as one."""

    def __init__(self, *fns):
        self.fns = fns

    def __call__(self, p) -> None:
        for fn in self.fns:
            fn(p)


def queue_training(cfg, num_processes: int | None) -> int:
    """`train --queue`: a row in the home's jobs database; the app's worker or `lora-studio jobs run` trains it."""
    from training.jobs import JobQueue
    from training.trainer import check_name_free

    check_name_free(cfg)  # now, not when the job comes up
    q = JobQueue(_home(None), worker=False)
    job = q.submit(cfg, num_processes=num_processes)
    ahead = q.position(job)
    print(f"queued job {job.id} '{cfg.name}' ({ahead} ahead of it) in {q.store.path}")
    print("the app trains it when it is running; or train the queue here: lora-studio jobs run")
    return 0


def launch_processes(cfg, n: int) -> int:
    """Run this training as n processes with `accelerate launch` (torchrun underneath).

    The resolved configuration travels as a TOML file in the run folder, so every process trains
    exactly what this command line asked for. One process per GPU where there are several; on a
    CPU the processes talk over gloo.
    """
    import socket
    import subprocess

    from training.trainer import run_dir_for

    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    launch_cfg = run_dir / "launch.toml"
    launch_cfg.write_text(cfg.to_toml())
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
           "--num_machines", "1", "--mixed_precision", cfg.mixed_precision, "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "app.cli", "train", "--config", str(launch_cfg)]
    print(f"launching {n} processes: {' '.join(cmd[2:])}", file=sys.stderr)
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.call(cmd, env=env)


class _ProgressBar:
    """Renders training progress with tqdm: step, loss, learning rate, time left."""

    def __init__(self):
        self.bar = None

    def __call__(self, p) -> None:
        from tqdm import tqdm

        if p.message and p.loss is None:
            tqdm.write(p.message)
        if self.bar is None:
            self.bar = tqdm(total=p.total, initial=p.step, unit="step", dynamic_ncols=True)
        if p.step > self.bar.n:
            self.bar.update(p.step - self.bar.n)
        if p.loss is not None:
            self.bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.lr:.2e}" if p.lr else "-")
        for s in p.samples:
            tqdm.write(f"sample: {s}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _UsageError(Exception):
    pass


def _usage(msg: str) -> _UsageError:
    return _UsageError(msg)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["ui", *argv]  # `lora-studio --port 8000`: options of the app that `lora-studio` alone starts
    args = ap.parse_args(argv)
    if args.command is None:  # no command: start the browser app with its defaults
        args = ap.parse_args(["ui"])
    quiet_libraries()
    try:
        return args.func(args)
    except (LoraStudioError, FileNotFoundError, _UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
