"""What an SD 1.5- or SDXL-sized LoRA training run needs on a GPU, counted without one; what fits in 8/12/16/24 GB.

    python bench/gpu_memory.py [--arch sdxl|sd15] [--resolution R] [--configs bf16,bf16+gc,bf16+gc+int8]
                               [--validate]

The UNet's training step (batch 1, UNet LoRA rank 16 on the attention projections, the SD presets; forward,
loss, backward, AdamW step) runs on fake tensors under torch's MemTracker: every tensor is created with its
real size, dtype and lifetime, nothing is computed, so no GPU and no model-sized RAM are needed (it is slow
all the same: SD 1.5's step takes about 3 minutes on a 2-core CPU; SDXL's ran 45 minutes without finishing). The frozen weights are 16-bit (as the trainer keeps them on a GPU:
fp16, or bf16 under bf16 mixed precision), LoRA weights and optimizer fp32, compute under bf16 autocast.
Around that step the trainer also holds the text encoder(s) and the VAE in 16 bits (their parameter bytes,
exact), and before it encodes the training images with the VAE in fp32 (its activations measured on this
CPU at the same resolution: the peak resident set of one encode). Each configuration's need is the larger
of the two phases plus 0.5 GB of CUDA context. Tokens, `+`-joined:

  bf16    the step under bf16 autocast (fp32: no autocast, fp32 weights: for --validate)
  gc      gradient checkpointing
  int8    the UNet's Linear weights int8 with a per-row scale (quantize_base = "int8"); activations as bf16

--validate also counts the fp32 step at SD 1.5 / 512 px, to be set beside what `bench/train_memory.py --arch
sd15 --configs fp32` measures for the real step (its step peak minus resident), so the count can be checked.
Last line: one `config=GB` per configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.real_models import NATIVE, VAE, model_folder  # noqa: E402
from bench.train_memory import _reset_peak, _status  # noqa: E402

GB = 2**30
CUDA_CONTEXT_GB = 0.5
SIZES_GB = (8, 12, 16, 24)
TOKENS = {"fp32", "bf16", "gc", "int8"}


def _parse(spec: str) -> set[str]:
    toks = {t.strip() for t in spec.split("+") if t.strip()}
    if not toks or toks - TOKENS or {"fp32", "bf16"} <= toks:
        raise SystemExit(f"config {spec!r}: tokens are {', '.join(sorted(TOKENS))} (fp32 or bf16), joined with +")
    return toks


def fake_step(arch: str, resolution: int, bf16: bool, checkpointing: bool) -> dict[str, float]:
    """Peak memory (GB) of one UNet LoRA training step, by MemTracker category, counted on fake tensors.
    Also "linear_weights": how many elements the UNet's Linear weights have (for the int8 figure)."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    class _NoHook:
        def remove(self) -> None:
            pass

    # MemTracker hooks every parameter's gradient; a frozen one has none to hook
    saved = {n: getattr(torch.Tensor, n) for n in ("register_hook", "register_post_accumulate_grad_hook")}
    for n, orig in saved.items():
        setattr(torch.Tensor, n, (lambda o: lambda self, hook: o(self, hook) if self.requires_grad else _NoHook())(orig))
    ucfg = UNet2DConditionModel.load_config(model_folder(arch) / "unet")
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(ucfg)
        unet.requires_grad_(False)
        linear = sum(m.weight.numel() for m in unet.modules() if isinstance(m, torch.nn.Linear))
        unet.add_adapter(LoraConfig(r=16, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        with FakeTensorMode():
            for m in unet.modules():  # fake CPU tensors in place of the meta ones
                for n, p in list(m._parameters.items()):
                    if p is not None:
                        dt = torch.float32 if p.requires_grad or not bf16 else torch.bfloat16
                        m._parameters[n] = torch.nn.Parameter(torch.empty(p.shape, dtype=dt),
                                                              requires_grad=p.requires_grad)
                for n, b in list(m._buffers.items()):
                    if b is not None:
                        m._buffers[n] = torch.empty(b.shape, dtype=b.dtype)
            if checkpointing:
                unet.enable_gradient_checkpointing()
            unet.train()
            opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
            h = resolution // 8
            x, t = torch.randn(1, 4, h, h), torch.tensor([500])
            cond = torch.randn(1, 77, ucfg["cross_attention_dim"])
            kw = {}
            if ucfg.get("addition_embed_type") == "text_time":
                kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, ucfg["projection_class_embeddings_input_dim"] - 6 * ucfg["addition_time_embed_dim"]),
                                           "time_ids": torch.randn(1, 6)}
            mt = MemTracker()
            mt.track_external(unet, opt)
            with mt:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    pred = unet(x, t, cond, **kw).sample
                    loss = torch.nn.functional.mse_loss(pred.float(), x)
                loss.backward()
                opt.step()
            peak = mt.get_tracker_snapshot("peak")
    finally:
        for n, orig in saved.items():
            setattr(torch.Tensor, n, orig)
    dev = next(iter(peak))
    out = {str(getattr(k, "value", k)): v / GB for k, v in peak[dev].items()}
    out["linear_weights"] = float(linear)
    return out


def component_bytes(arch: str) -> dict[str, float]:
    """16-bit bytes (GB) of the text encoder(s) and the VAE, from their configs (no weights loaded)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = model_folder(arch)
    out = {}
    with torch.device("meta"):
        for name in ("text_encoder", "text_encoder_2"):
            if (folder / name).is_dir():
                m = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / name))
                out[name] = sum(p.numel() for p in m.parameters()) * 2 / GB
                if name == "text_encoder_2":  # CLIPTextModelWithProjection: plus the projection
                    cfg = m.config
                    out[name] += cfg.hidden_size * cfg.projection_dim * 2 / GB
        vae = AutoencoderKL(**VAE)
        out["vae"] = sum(p.numel() for p in vae.parameters()) * 2 / GB
    return out


def vae_encode_peak(arch: str, resolution: int) -> float:
    """GB the VAE's fp32 encode of one image at `resolution` adds to this process's peak resident set (its
    activations, measured: the trainer encodes the training images once, in fp32, before the first step)."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_folder(arch) / "vae", torch_dtype=torch.float32)
    for p in vae.parameters():
        p.data = p.data.clone()  # weights in this process's own memory before the baseline is taken
    x = torch.randn(1, 3, resolution, resolution)
    with torch.no_grad():
        vae.encode(x[:, :, :64, :64])  # warm-up: one-off allocations
        before = _status("VmRSS")
        _reset_peak()
        vae.encode(x)
        return _status("VmHWM") - before


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("sd15", "sdxl"), default="sdxl")
    ap.add_argument("--resolution", type=int, help="default: native (SDXL 1024, SD 1.5 512)")
    ap.add_argument("--configs", default="bf16,bf16+gc,bf16+gc+int8")
    ap.add_argument("--validate", action="store_true",
                    help="also count an fp32 SD 1.5 step at 512 px, to set beside bench/train_memory.py's measurement")
    args = ap.parse_args(argv)
    res = args.resolution or NATIVE[args.arch]
    specs = [s.strip() for s in args.configs.split(",") if s.strip()]
    for s in specs:
        _parse(s)
    if args.validate:
        t0 = time.perf_counter()
        v = fake_step("sd15", 512, bf16=False, checkpointing=False)
        print(f"validation: SD 1.5, 512 px, fp32 step, counted: activations + temporaries "
              f"{v['Activation'] + v['Temp']:.2f} GB, weights {v['Parameter']:.2f} GB "
              f"({time.perf_counter() - t0:.0f}s); set beside bench/train_memory.py --arch sd15 --configs fp32 "
              f"(its step peak minus resident)", flush=True)
    comps = component_bytes(args.arch)
    vae_act = vae_encode_peak(args.arch, res)
    others = sum(comps.values())
    print(f"{args.arch}, {res}px, batch 1, UNet LoRA rank 16 (attention). Held beside the UNet in 16 bits: "
          + ", ".join(f"{k} {v:.2f}" for k, v in comps.items())
          + f" GB; the VAE's fp32 encode at {res}px adds {vae_act:.2f} GB (measured)", flush=True)
    rows = []
    counted: dict[tuple[bool, bool], dict[str, float]] = {}  # int8 changes the weights only: one count serves both
    for spec in specs:
        toks = _parse(spec)
        t0 = time.perf_counter()
        key = ("fp32" not in toks, "gc" in toks)
        if key not in counted:
            counted[key] = fake_step(args.arch, res, bf16=key[0], checkpointing=key[1])
        s = counted[key]
        params = s["Parameter"]
        if "int8" in toks:  # int8 data instead of 16-bit for every Linear weight (scales: one per row, negligible)
            params -= s["linear_weights"] * 1 / GB
        rest = s["Total"] - s["Parameter"]  # activations, temporaries, gradients, optimizer state
        step = params + rest + others
        caching = params + others + comps["vae"] + vae_act  # the VAE in fp32 meanwhile: twice its 16-bit bytes
        need = max(step, caching) + CUDA_CONTEXT_GB
        rows.append((spec, need))
        print(f"  {spec:<14} UNet weights {params:5.2f}, step activations/temporaries/grads/optimizer {rest:5.2f} -> "
              f"step {step + CUDA_CONTEXT_GB:5.2f}, caching {caching + CUDA_CONTEXT_GB:5.2f}: needs {need:5.2f} GB "
              f"(counted in {time.perf_counter() - t0:.0f}s)", flush=True)
    print(f"\nfits on a GPU of (the larger phase + {CUDA_CONTEXT_GB} GB CUDA context):")
    print("  config          " + "".join(f"{g:>6} GB" for g in SIZES_GB))
    for spec, need in rows:
        print(f"  {spec:<15} " + "".join(f"{'yes' if need <= g else 'no':>9}" for g in SIZES_GB))
    print(" ".join(f"{spec}={need:.2f}" for spec, need in rows))


if __name__ == "__main__":
    main()
