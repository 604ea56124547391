"""How large is an adapter file for a real base model? Counts the LoRA weights each preset puts on the
UNet and text encoder(s) of SD 1.5, SD 2.x and SDXL, built from their published architecture configs on
PyTorch's meta device (no weights, no download, a few seconds), and prints the file size at fp32 (how
LoRA Studio trains and saves) and fp16.

    python bench/adapter_size.py [--rank R] [--network lora,loha,lokr]   (default: each preset's own rank)

Per layer, as peft builds it: a Linear(in, out) gets A (r x in) and B (out x r); a Conv2d(in, out, k x k)
gets a k x k down convolution (r x in x k x k) and a 1 x 1 up convolution (out x r). Alphas and the
safetensors header add a few kB, not counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training.lora import targeted  # noqa: E402  (peft's suffix match, as training applies it)

# The UNet configs of the released models (their unet/config.json), as far as they change the layer shapes.
_SD_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
}
UNETS = {
    "sd15": {**_SD_BLOCKS, "cross_attention_dim": 768, "attention_head_dim": 8},
    "sd2": {**_SD_BLOCKS, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True},
    "sdxl": {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
             "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
             "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816},
}
# text encoders: (hidden size, layers); CLIP ViT-L/14 for SD 1.5, OpenCLIP ViT-H for SD 2, both for SDXL
TEXT = {"sd15": [(768, 12)], "sd2": [(1024, 23)], "sdxl": [(768, 12), (1280, 32)]}
NAMES = {"sd15": "SD 1.5", "sd2": "SD 2.x", "sdxl": "SDXL"}


def unet_lora_params(unet: torch.nn.Module, targets: list[str], rank: int,
                     conv_rank: int | None = None) -> tuple[int, int]:
    """(LoRA parameters, layers) for the modules whose name ends with a target (peft's suffix match);
    3x3 convolutions at `conv_rank` (default: rank)."""
    total = layers = 0
    for name, mod in unet.named_modules():
        if not targeted(name, targets):
            continue
        if isinstance(mod, torch.nn.Linear):
            total += rank * (mod.in_features + mod.out_features)
        elif isinstance(mod, torch.nn.Conv2d):
            kh, kw = mod.kernel_size
            r = (conv_rank or rank) if (kh, kw) != (1, 1) else rank
            total += r * mod.in_channels * kh * kw + mod.out_channels * r
        else:
            continue
        layers += 1
    return total, layers


def text_lora_params(family: str, targets: list[str], rank: int, network: str = "lora") -> int:
    # q, k, v, out: square (hidden x hidden) projections in every layer
    per = {"q_proj", "k_proj", "v_proj", "out_proj"} & set(targets)
    if network == "lora":
        return sum(layers * len(per) * rank * 2 * hidden for hidden, layers in TEXT[family])
    total = 0
    for hidden, layers in TEXT[family]:
        with torch.device("meta"):
            one = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(hidden, hidden)})
        total += layers * len(per) * injected_params(one, ["q_proj"], rank, network)
    return total


def injected_params(model: torch.nn.Module, targets: list[str], rank: int, network: str,
                    conv_rank: int | None = None) -> int:
    """The adapter parameters peft puts on `model` (on the meta device: shapes only) for LoHa / LoKr, as
    training builds them (training.lora.lora_config); LoKr's full-factor layers included."""
    from peft import inject_adapter_in_model

    from training.lora import PARAM_MARKERS, lora_config, spatial_convs

    convs = spatial_convs(model, targets) if conv_rank else []
    cfg = lora_config(rank, rank, targets, 0.0, rank_pattern={n: conv_rank for n in convs} if conv_rank else None,
                      network=network)
    inject_adapter_in_model(cfg, model, adapter_name="default")
    return sum(p.numel() for n, p in model.named_parameters() if any(m in n for m in PARAM_MARKERS))


def main(argv=None) -> int:
    from diffusers import UNet2DConditionModel

    from training.config import ATTENTION_TARGETS, PRESETS, TrainConfig

    p = argparse.ArgumentParser(prog="python bench/adapter_size.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=None, help="one rank for every preset (default: the preset's)")
    p.add_argument("--conv-rank", type=int, default=None,
                   help="rank of the 3x3 convolutions (default: the preset's conv_rank, else its rank)")
    p.add_argument("--network", default="lora", help="lora, loha, lokr or several, comma-separated "
                                                       "(LyCORIS' LoHa / LoKr as peft builds them)")
    args = p.parse_args(argv)
    networks = [n.strip() for n in args.network.split(",") if n.strip()]
    bad = [n for n in networks if n not in ("lora", "loha", "lokr")]
    if bad:
        p.error(f"--network: {', '.join(bad)}: not one of lora, loha, lokr")
    text_targets = TrainConfig().text_targets
    print(f"{'base':7} {'preset':8} {'network':7} {'rank':>4} {'UNet layers':>11} {'UNet params':>12} "
          f"{'TE params':>10} {'fp32 MB':>8} {'fp16 MB':>8}")
    for family, conf in UNETS.items():
        for preset in ("style", "concept"):
            vals = PRESETS[preset]
            rank = args.rank or vals["rank"]
            targets = vals.get("unet_targets", ATTENTION_TARGETS)
            conv_rank = args.conv_rank or vals.get("conv_rank")
            for network in networks:
                with torch.device("meta"):
                    unet = UNet2DConditionModel(**conf)
                n_unet, layers = unet_lora_params(unet, targets, rank, conv_rank)
                if network != "lora":
                    n_unet = injected_params(unet, targets, rank, network, conv_rank)
                n_text = text_lora_params(family, text_targets, rank, network) if vals["train_text_encoder"] else 0
                n = n_unet + n_text
                print(f"{NAMES[family]:7} {preset:8} {network:7} {rank:>4} {layers:>11} {n_unet:>12,} "
                      f"{n_text:>10,} {n * 4 / 1e6:>8.1f} {n * 2 / 1e6:>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
