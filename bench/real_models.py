"""Random-weight base models with the exact published SD 1.5 and SDXL architectures, for speed and memory benches.

    python bench/real_models.py sd15|sdxl     (builds the folder once and prints its path)

Speed and memory do not depend on the weights, so a UNet, VAE and text encoder(s) built from the released
configs with random initialisation measure what users of the real models will see, with no download. Each is
written once as a diffusers folder (fp32 safetensors, as the trainers load on the CPU) under
~/.cache/lora-studio-bench/<arch> (or $LORA_STUDIO_BENCH_CACHE), not in the repository: SD 1.5 is about
4.3 GB, SDXL about 14 GB. The tokenizer is the toy model's (token ids don't change the cost; the vocabulary
size of the embedding table is CLIP's 49408). "toy" is the shipped toy model itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOY = ROOT / "sample_data" / "toy-sd"
ARCHS = ("toy", "sd15", "sdxl")
CACHE = Path(os.environ.get("LORA_STUDIO_BENCH_CACHE", Path.home() / ".cache" / "lora-studio-bench"))
NATIVE = {"toy": 64, "sd15": 512, "sdxl": 1024}

# the released VAEs: 4 blocks, 8x down-sampling; SDXL's differs only in its scaling factor (and sample size)
VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
       "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
       "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32, "act_fn": "silu"}
# CLIP ViT-L/14's text tower (SD 1.5, SDXL's first encoder) and OpenCLIP ViT-bigG's (SDXL's second)
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "hidden_act": "gelu", "projection_dim": 1280}
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "clip_sample": False, "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}


def _text_encoder(cls, conf: dict):
    from transformers import CLIPTextConfig

    # the toy tokenizer's special ids (its <|startoftext|>/<|endoftext|>), so pooling finds the end token
    cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=670, eos_token_id=671,
                         pad_token_id=671, **conf)
    return cls(cfg)


def build(arch: str, folder: Path) -> None:
    """Write the random-weight diffusers folder of `arch` (sd15 or sdxl) to `folder`, one component at a time."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from bench.adapter_size import UNETS

    torch.manual_seed(0)
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    xl = arch == "sdxl"
    unet_cfg = {**UNETS[arch], "sample_size": NATIVE[arch] // 8}
    parts = {
        "unet": lambda: UNet2DConditionModel(**unet_cfg),
        "vae": lambda: AutoencoderKL(**VAE, sample_size=NATIVE[arch], scaling_factor=0.13025 if xl else 0.18215,
                                     force_upcast=xl),
        "text_encoder": lambda: _text_encoder(CLIPTextModel, CLIP_L),
    }
    if xl:
        parts["text_encoder_2"] = lambda: _text_encoder(CLIPTextModelWithProjection, CLIP_G)
    for name, make in parts.items():
        if (tmp / name).is_dir():
            continue
        with torch.no_grad():
            model = make()
        model.save_pretrained(tmp / (name + ".partial"), safe_serialization=True, max_shard_size="20GB")
        os.replace(tmp / (name + ".partial"), tmp / name)
        del model
    tok = CLIPTokenizer.from_pretrained(TOY / "tokenizer")
    tok.save_pretrained(tmp / "tokenizer")
    if xl:
        tok.save_pretrained(tmp / "tokenizer_2")
    DDPMScheduler(**SCHEDULER).save_pretrained(tmp / "scheduler")
    import json

    from diffusers import __version__

    index = {"_diffusers_version": __version__,
             "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if xl:
        index.update({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"]})
    else:
        index.update({"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
                      "safety_checker": [None, None], "feature_extractor": [None, None]})
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    os.replace(tmp, folder)


def model_folder(arch: str) -> Path:
    """The diffusers folder of `arch`: the toy model, or the random-weight real-size one (built on first use)."""
    if arch not in ARCHS:
        raise ValueError(f"arch: one of {', '.join(ARCHS)}, got {arch!r}")
    if arch == "toy":
        return TOY
    folder = CACHE / arch
    if not (folder / "model_index.json").is_file():
        print(f"building the random-weight {arch} model in {folder} (once; minutes) ...", file=sys.stderr, flush=True)
        build(arch, folder)
    return folder


if __name__ == "__main__":
    print(model_folder(sys.argv[1] if len(sys.argv) > 1 else "sd15"))
