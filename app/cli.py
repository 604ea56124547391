"""The `lora-studio` command line: a thin adapter from argv to the domain functions."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipelines.errors import LoraStudioError


def _add_base_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=None,
                   help="base model: a diffusers folder, a single-file .safetensors checkpoint, or a hub id "
                        "(default: the embedded toy model in sample_data/toy-sd)")
    p.add_argument("--base-config", default=None,
                   help="diffusers config folder for a single-file checkpoint with a non-standard layout")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt/.pt/.bin files (they can run code when loaded: only for files you trust)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="lora-studio",
        description="Train LoRA adapters for Stable Diffusion and generate images with them.",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images from a prompt")
    _add_base_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=7.0, help="classifier-free guidance (CFG) scale")
    g.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed (recorded in the PNG)")
    g.add_argument("--width", type=int, default=None, help="default: the model's native size")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--scheduler", default="DPM++ 2M Karras",
                   help="Euler a, Euler, DPM++ 2M, DPM++ 2M Karras, DPM++ SDE Karras, DDIM, UniPC, Heun, LMS, PNDM")
    g.add_argument("--out", default="out.png", help="output PNG (several images: name-0.png, name-1.png, ...)")
    g.set_defaults(func=cmd_generate)
    return ap


def cmd_generate(args: argparse.Namespace) -> int:
    from pipelines.base_models import load_base
    from pipelines.generation import GenerationRequest, generate, output_paths, save_png

    req = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
        seed=args.seed, width=args.width, height=args.height, num_images=args.num_images,
        scheduler=args.scheduler,
    )
    t0 = time.time()
    base = load_base(args.base, allow_pickle=args.allow_pickle, device=args.device, config=args.base_config)
    t1 = time.time()
    images = generate(base, req)
    t2 = time.time()
    for img, path in zip(images, output_paths(args.out, len(images))):
        save_png(img, path)
        print(f"wrote {path} (seed {img.seed})")
    print(f"{base.name} ({base.family}) loaded in {t1 - t0:.1f}s; {len(images)} image(s) in {t2 - t1:.1f}s")
    return 0


def quiet_libraries() -> None:
    """Silence library progress bars and advisory warnings; our own output says what happened."""
    import os
    import warnings

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


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 0
    quiet_libraries()
    try:
        return args.func(args)
    except (LoraStudioError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
