"""At which noise level is a drawing's colour lost? (issue #14; a probe, not an app option)

    LORA_STUDIO_TOY_WORLD=v1t python bench/sdedit_probe.py --base FOLDER [--draw framed] [--adapter style]

Draws ground-truth pictures of the base prompts in one style (`--draw`: framed, outline, solid, ...),
noises their latents to a strength s (img2img, as SDEdit) and lets the model denoise them with the prompt,
for s from 0.2 to 1.0 (1.0 is a picture from scratch). The evaluator reads colour, shape and the style drawn.
If the colour holds at low strengths and is lost at high ones, it is decided where the picture is composed
(high noise); if it is lost already at low strength, the low-noise steps that render fine lines lose it.
`--adapter style` first trains the style preset on sample_data/style-outline (as `bench/quality.py style`) and
keeps it attached at weight 1.0: then the prompts are the base prompts without the trigger, as in the
preservation half of quality.py. `--prompt-style` names the style word the prompt asks for (default: the
drawn style when the base knows it, else none). Prints one row per strength.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality  # noqa: E402
from training import toy_world as tw  # noqa: E402
from training.evaluator import load_evaluator, score  # noqa: E402
from training.trainer import encode_images  # noqa: E402


def ground_truth(prompts: list[str], style: str, seed: int):
    """One drawing per prompt, in `style`, at a random position and size (as the world draws them)."""
    rng = random.Random(seed)
    out = []
    for p in prompts:
        w = tw.parse_caption(p)
        spec = tw.sample_spec(rng, shapes=[w["shape"]], colors=[w["color"]], backgrounds=[w["background"]], style=style)
        out.append(tw.draw(spec))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--draw", default="framed", help="the style the ground-truth pictures are drawn in")
    p.add_argument("--prompt-style", default=None, help="the style word the prompts name ('' for none)")
    p.add_argument("--adapter", choices=["none", "style"], default="none")
    p.add_argument("--strengths", default="0.2,0.4,0.6,0.8,1.0")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=quality.OUT_DIR)
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    from pipelines.base_models import load_base

    quality._quiet_loading()
    base = load_base(args.base)
    evaluator = load_evaluator()
    pstyle = args.prompt_style
    if pstyle is None:
        pstyle = args.draw if args.draw in tw.BASE_STYLES else tw.BASE_STYLE
    prompts = quality.pick_prompts(tw.all_base_prompts(pstyle or tw.BASE_STYLE), args.prompts, seed=args.seed)
    truth = ground_truth(prompts, args.draw, args.seed)
    gt = score(evaluator, truth, prompts)
    print(f"ground truth ({args.draw}): {quality.summary_line(gt)} "
          f"style {args.draw}={sum(q['style'] == args.draw for q in gt['predictions']) / len(truth):.2f}", flush=True)

    with tempfile.TemporaryDirectory() as lib:
        if args.adapter == "style":
            from training.config import TrainConfig
            from training.trainer import train

            folder, trigger, preset, *_ = quality.LORA_SETS["style"]
            cfg = TrainConfig.from_dict({"images": str(quality.ROOT / "sample_data" / folder), "trigger": trigger,
                                         "preset": preset, "name": "probe", "output_dir": lib, "base": args.base})
            train(cfg, base=base)  # stays attached at weight 1.0
            base.pipe.unet.eval()
        pipe = StableDiffusionImg2ImgPipeline(**base.pipe.components)
        # DDIM: DPM++ 2M Karras leaves noise in img2img at low strength (its Karras sigmas do not match the
        # noise added at the truncated start); from scratch the bench reads framed pictures the same with both
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        # the toy VAE's posterior has unit variance (latent_dist.sample() is as noisy as the latent itself), and the
        # base was trained on its means: hand img2img the latents the LoRA trainer encodes (scaled means)
        pixels = [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1.0 for im in truth]
        init_latents = encode_images(base, pixels)
        rows = []
        for s in [float(v) for v in args.strengths.split(",")]:
            images = []
            for i, (prompt, init) in enumerate(zip(prompts, init_latents)):
                g = torch.Generator().manual_seed(args.seed + 1000 * i)
                # img2img runs int(steps * s) steps: keep about `steps` denoising steps at every strength
                n = max(args.steps, int(round(args.steps / s)))
                images.append(pipe(prompt, image=init[None].to(base.device, base.pipe.unet.dtype), strength=s, num_inference_steps=n,
                                   guidance_scale=args.guidance, generator=g).images[0])
            r = score(evaluator, images, prompts)
            kept = sum(q["style"] == args.draw for q in r["predictions"]) / len(images)
            rows.append((s, r, kept))
            print(f"strength {s:.1f}: {quality.summary_line(r)} drawn {args.draw}={kept:.2f}", flush=True)
            quality.contact_sheet(images, prompts, r["predictions"],
                                  args.out_dir / f"sdedit_{args.draw}_{args.adapter}_{int(s * 10)}.png",
                                  f"{args.draw} -> img2img strength {s} ({args.adapter})")
    print("\nstrength | colour | shape | background | drawn " + args.draw)
    for s, r, kept in rows:
        print(f"{s:.1f} | {r['color']:.2f} | {r['shape']:.2f} | {r['background']:.2f} | {kept:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
