"""LyCORIS reading, LoRA resizing and LoRA extraction on the real architectures: time and size, side by side.

    python bench/lycoris_resize.py [--arch sd15|sdxl] [--dim 8] [--rank 64] [--to 16] [--extract-rank 32]

Builds the UNet and text encoder(s) of the released architecture with random weights (in memory, from the
published configs; speed and sizes do not depend on the weights) and measures, on the layers a kohya LoRA
adapts (every Linear and 1×1 convolution of the UNet's transformer blocks; the text encoders' attention and
MLP projections):

1. reading a LyCORIS file as exact LoRA factors (pipelines/lycoris.py): a LoHa of dim D and a LoKr (factor 8,
   low-rank w2 of dim D); the time to convert beside the time to read the same tensors from disk, and the
   converted rank and size beside the file's;
2. `loras resize`: a rank-R LoRA whose singular values fall off like 1/i (a trained LoRA's spectrum is steep;
   a random one would be flat) to rank T: time, size before and after, the least and mean share of each
   layer's ‖ΔW‖² kept;
3. `loras extract`: the UNet against a copy whose adapted layers moved by a rank-16 update, at rank E: time
   (one SVD per layer), and that the rank-16 change is found whole.

Last line: `lycoris_convert_s=… lycoris_read_s=… resize_s=… resize_kept=… extract_s=… extract_kept=…`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def build(arch: str):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.adapter_size import UNETS
    from bench.real_models import CLIP_G, CLIP_L

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNETS[arch]).eval().requires_grad_(False)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **CLIP_L)).eval()
    te.requires_grad_(False)
    te2 = None
    if arch == "sdxl":
        te2 = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **CLIP_G)).eval()
        te2.requires_grad_(False)
    return SimpleNamespace(unet=unet, text_encoder=te, text_encoder_2=te2)


def targets(pipe) -> dict[str, torch.nn.Module]:
    """Our module name -> layer, for the layers kohya's LoRA adapts."""
    from pipelines.adapters import base_modules
    from pipelines.resize import _extract_targets

    return {m: mod for m, mod in base_modules(pipe).items()
            if _extract_targets(m.partition(".")[0], m.partition(".")[2], mod, None)}


def _io(mod) -> tuple[int, int]:
    w = mod.weight
    return w.shape[0], w[0].numel()


def lycoris_file(layers, kind: str, dim: int, g) -> dict[str, torch.Tensor]:
    sd = {}
    for i, (name, mod) in enumerate(layers.items()):
        out, n = _io(mod)
        k = f"lora_unet_x_{i}"  # kohya naming (the layer itself does not matter here)
        if kind == "loha":
            sd.update({f"{k}.hada_w1_a": torch.randn(out, dim, generator=g),
                       f"{k}.hada_w1_b": torch.randn(dim, n, generator=g),
                       f"{k}.hada_w2_a": torch.randn(out, dim, generator=g),
                       f"{k}.hada_w2_b": torch.randn(dim, n, generator=g)})
        else:  # LoKr, factor 8: w1 (8 x 8) full, w2 (out/8 x n/8) of rank dim
            sd.update({f"{k}.lokr_w1": torch.randn(8, 8, generator=g),
                       f"{k}.lokr_w2_a": torch.randn(out // 8, dim, generator=g),
                       f"{k}.lokr_w2_b": torch.randn(dim, n // 8, generator=g)})
        sd[f"{k}.alpha"] = torch.tensor(float(dim) / 2)
    return {kk: (v.half() if v.ndim else v) for kk, v in sd.items()}  # civitai files are fp16


def size(sd) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values())


def steep_lora(layers, rank: int, g) -> tuple[dict, dict]:
    """Peft factors with singular values 1/i (orthonormal directions), alpha = rank."""
    sd, alphas = {}, {}
    for m, mod in layers.items():
        out, n = _io(mod)
        r = min(rank, out, n)
        u, _ = torch.linalg.qr(torch.randn(out, r, generator=g))
        v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
        s = 1.0 / torch.arange(1, r + 1, dtype=torch.float32)
        a, b = (s.sqrt()[:, None] * v.t()), u * s.sqrt()
        if mod.weight.ndim == 4:
            a, b = a.reshape(r, n, 1, 1), b.reshape(out, r, 1, 1)
        sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"] = a, b
        alphas[m] = float(r)
    return sd, alphas


def main(argv=None) -> int:
    from pipelines.lycoris import to_lora
    from pipelines.resize import FitReport, extract_lora, resize_factors
    from pipelines.weights_io import load_safetensors, save_safetensors

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--dim", type=int, default=8, help="LyCORIS dim (LoHa rank per factor; LoKr w2 rank)")
    p.add_argument("--rank", type=int, default=64, help="rank of the LoRA to resize")
    p.add_argument("--to", type=int, default=16, help="the rank to resize it to")
    p.add_argument("--extract-rank", type=int, default=32)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    pipe = build(args.arch)
    layers = targets(pipe)
    print(f"{args.arch}: {len(layers)} adapted layers; models built in {time.perf_counter() - t0:.0f}s", flush=True)

    # 1. LyCORIS as LoRA
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("loha", "lokr"):
            sd = lycoris_file(layers, kind, args.dim, g)
            path = save_safetensors(sd, Path(tmp) / f"{kind}.safetensors")
            t = time.perf_counter()
            read, _ = load_safetensors(path)
            t_read = time.perf_counter() - t
            t = time.perf_counter()
            conv = to_lora(read)
            t_conv = time.perf_counter() - t
            ranks = sorted({v.shape[0] for k, v in conv.state_dict.items() if k.endswith("lora_down.weight")})
            print(f"{kind} dim {args.dim}: file {path.stat().st_size / 2**20:.0f} MB (fp16); read {t_read:.2f}s, "
                  f"converted in {t_conv:.2f}s ({t_conv / max(t_read, 1e-9):.1f}x the read); LoRA ranks "
                  f"{ranks[0]}-{ranks[-1]}, {size(conv.state_dict) / 2**20:.0f} MB of factors "
                  f"({str(next(iter(conv.state_dict.values())).dtype).removeprefix('torch.')})", flush=True)
            figures[kind] = (t_conv, t_read)
            del sd, read, conv

    # 2. resize
    sd, alphas = steep_lora(layers, args.rank, g)
    rep = FitReport()
    t = time.perf_counter()
    small, _ = resize_factors(sd, alphas, args.to, None, rep)
    t_resize = time.perf_counter() - t
    print(f"resize rank {args.rank} -> {args.to}: {t_resize:.1f}s; {size(sd) / 2**20:.0f} MB -> "
          f"{size(small) / 2**20:.0f} MB (fp32); {rep.summary()}", flush=True)

    # 3. extract
    tuned = build(args.arch)
    moved = targets(tuned)
    with torch.no_grad():
        for m, mod in moved.items():
            if not m.startswith("unet."):
                continue
            out, n = _io(mod)
            delta = torch.randn(out, 16, generator=g) @ torch.randn(16, n, generator=g) * 1e-2
            mod.weight += delta.reshape(mod.weight.shape)
    t = time.perf_counter()
    _, _, xrep = extract_lora(SimpleNamespace(pipe=pipe, name="base"), SimpleNamespace(pipe=tuned, name="tuned"),
                              rank=args.extract_rank)
    t_extract = time.perf_counter() - t
    print(f"extract at rank {args.extract_rank}: {t_extract:.1f}s for {len(xrep.layers)} layers "
          f"({1000 * t_extract / max(1, len(xrep.layers)):.0f} ms a layer); {xrep.summary()}; left out: "
          f"{'; '.join(s for s in xrep.skipped if ' ' in s) or 'nothing'}", flush=True)
    print(f"lycoris_convert_s={figures['loha'][0]:.2f} lycoris_read_s={figures['loha'][1]:.2f} "
          f"resize_s={t_resize:.1f} resize_kept={rep.mean:.3f} extract_s={t_extract:.1f} "
          f"extract_kept={xrep.worst:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
