"""Peak memory of a LoRA training run on SD 1.5- and SDXL-sized models, per setting, and what fits in 8/12/16/24 GB.

    python bench/train_memory.py [--arch sdxl|sd15|toy] [--resolution R] [--batch-size B] [--steps N]
                                 [--configs fp32,bf16,bf16+gc,bf16+gc+int8,...]

Each configuration trains in its own process on a random-weight model of the released architecture (see
bench/real_models.py; memory does not depend on the weights), UNet LoRA rank 16 on the attention projections
(the SD presets), batch 1, and reports three figures from the kernel's peak resident set (VmHWM, reset between
phases through /proc/self/clear_refs):

  resident   the process after the trainer is built: weights as stored, LoRA, optimizer, cached latents
  caching    the peak while the training images are encoded to latents (VAE encoder at full resolution)
  step       the peak of the training steps (forward, backward, optimizer)

minus the process's own footprint before any model is loaded (Python, torch, diffusers: `libs`). These are
measured on this machine's CPU, where the trainer keeps fp32 weights and computes in fp32 (bf16 on a CPU
without bf16 units is ~37x slower: see the README).

A GPU keeps the frozen weights in 16 bits (fp16 by default, bf16 under bf16 mixed precision) and computes under
autocast. Its estimate, per phase, takes the 16-bit size of every weight (an int8 one keeps its size; LoRA stays
fp32), the measured VAE activations (the VAE encodes in fp32 on a GPU too), and the measured fp32 step
activations times their bf16/fp32 ratio, which `activation_ratio` counts with torch's MemTracker on fake tensors
(nothing computed; `--ratio-only` prints it; SD 1.5's UNet at 256 px: 0.58), plus 0.5 GB of CUDA context.
The larger phase is the GPU's need. Configurations are `+`-joined tokens:

  fp32 | bf16    the CPU run's precision: fp32, or mixed_precision = "bf16" (bf16 frozen weights, fp32 LoRA
                 and optimizer, autocast); only for CPUs with bf16 units
  gc             gradient checkpointing
  int8           the frozen UNet quantized to int8 (quantize_base = "int8", torchao weight-only)
  te             the text encoder(s) trained too (otherwise their outputs are cached)

Last line: one `config=GB` (the GPU estimate) per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.real_models import ARCHS, NATIVE, model_folder  # noqa: E402

TOKENS = {"fp32", "bf16", "gc", "int8", "te"}
CUDA_CONTEXT_GB = 0.5
SIZES_GB = (8, 12, 16, 24)


def _status(key: str) -> float:
    """A VmRSS/VmHWM figure of this process, GB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # 5: reset the peak resident set size to the current one
        f.write("5")


def _bytes(named) -> tuple[int, int]:
    """(bytes as stored now, bytes on a GPU with 16-bit frozen weights) of one named parameter; LoRA stays
    fp32, a quantized weight (torchao: int8 data + per-row scales) keeps its size."""
    name, p = named
    data = getattr(p, "qdata", None)
    if data is not None:
        now = data.numel() * data.element_size() + p.scale.numel() * p.scale.element_size()
        return now, now
    now = p.numel() * p.element_size()
    return now, (now if "lora_" in name else p.numel() * 2)


def parse(spec: str) -> set[str]:
    toks = {t.strip() for t in spec.split("+") if t.strip()}
    bad = toks - TOKENS
    if bad or not toks:
        raise SystemExit(f"config {spec!r}: tokens are {', '.join(sorted(TOKENS))}, joined with +")
    if {"fp32", "bf16"} <= toks:
        raise SystemExit(f"config {spec!r}: fp32 or bf16, not both")
    return toks


def child(arch: str, spec: str, resolution: int, batch: int, steps: int) -> dict:
    """Runs in a fresh process: build the trainer, run `steps` steps, return the phase figures (GB)."""
    import gc

    import torch

    import training.trainer as trainer_mod
    from training.config import TrainConfig

    toks = parse(spec)
    try:  # if a configuration does not fit in this machine's memory, the kernel kills this child, not the rest
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    gc.collect()
    libs = _status("VmRSS")
    phases: dict[str, float] = {}
    real_build = trainer_mod.build_examples

    def build_examples(*a, **kw):  # the first call encodes the training images: that is the caching phase
        if "caching" in phases:
            return real_build(*a, **kw)
        phases["caching_start"] = _status("VmRSS")
        _reset_peak()
        out = real_build(*a, **kw)
        phases["caching"] = _status("VmHWM")
        return out

    trainer_mod.build_examples = build_examples
    with tempfile.TemporaryDirectory(prefix="memory_") as tmp:
        images = Path(tmp) / "images"  # two images: the peaks don't depend on how many are cached
        images.mkdir()
        for f in sorted((ROOT / "sample_data" / "concept-star").glob("*.png"))[:2]:
            shutil.copy(f, images / f.name)
            if f.with_suffix(".txt").is_file():
                shutil.copy(f.with_suffix(".txt"), images / f.with_suffix(".txt").name)
        cfg = TrainConfig(images=str(images), trigger="sks", name="memory", output_dir=str(Path(tmp) / "lib"), base=str(model_folder(arch)), resolution=resolution, batch_size=batch,
                          rank=16, alpha=8.0, lr_unet=1e-4, lr_text=1e-5, train_text_encoder="te" in toks,
                          buckets=False, checkpoint_every=0, device="cpu", max_steps=1000, seed=0,
                          mixed_precision="bf16" if "bf16" in toks else "no",
                          gradient_checkpointing="gc" in toks, quantize_base="int8" if "int8" in toks else None,
                          weight_check=False)
        tr = trainer_mod.Trainer(cfg)
        t0 = time.perf_counter()
        tr.build()
        build_s = time.perf_counter() - t0
        gc.collect()
        resident = _status("VmRSS")
        tr.base.pipe.unet.train()
        _reset_peak()
        t0 = time.perf_counter()
        for k in range(steps):
            tr.train_step(k)
        step_s = (time.perf_counter() - t0) / steps
        step = _status("VmHWM")
    weights, weights16 = {}, {}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        m = getattr(tr.base.pipe, name, None)
        if m is not None:
            weights[name], weights16[name] = (sum(x) / 2**30 for x in zip(*map(_bytes, m.named_parameters())))
    return {"config": spec, "libs": libs, "resident": resident - libs, "caching": phases.get("caching", 0.0) - libs,
            "step": step - libs, "caching_start": phases.get("caching_start", 0.0) - libs,
            "weights16": weights16, "build_s": build_s, "step_s": step_s, "weights": weights,
            "threads": torch.get_num_threads()}


def activation_ratio(arch: str, resolution: int) -> dict[str, float]:
    """Activation memory of one UNet LoRA training step (rank 16, attention) in fp32 and under bf16 autocast with
    bf16 frozen weights, counted by torch's MemTracker on fake tensors (nothing is computed, so bf16 costs no
    time on a CPU without bf16 units). GB, and their ratio: how a measured fp32 figure carries over to a GPU."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    class _NoHook:
        def remove(self) -> None:
            pass

    # MemTracker hooks every parameter's gradient; frozen ones have none to hook
    saved = {n: getattr(torch.Tensor, n) for n in ("register_hook", "register_post_accumulate_grad_hook")}
    for n, orig in saved.items():
        setattr(torch.Tensor, n, (lambda o: lambda self, hook: o(self, hook) if self.requires_grad else _NoHook())(orig))
    ucfg = UNet2DConditionModel.load_config(model_folder(arch) / "unet")
    out = {}
    try:
        for prec in ("fp32", "bf16"):
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(ucfg)
            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=16, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
            with FakeTensorMode():
                for m in unet.modules():  # fake CPU tensors in place of the meta ones
                    for n, p in list(m._parameters.items()):
                        if p is not None:
                            dt = torch.float32 if p.requires_grad or prec == "fp32" else torch.bfloat16
                            m._parameters[n] = torch.nn.Parameter(torch.empty(p.shape, dtype=dt),
                                                                  requires_grad=p.requires_grad)
                    for n, b in list(m._buffers.items()):
                        if b is not None:
                            m._buffers[n] = torch.empty(b.shape, dtype=b.dtype)
                unet.train()
                opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
                h = resolution // 8
                x, t = torch.randn(1, 4, h, h), torch.tensor([500])
                cond = torch.randn(1, 77, ucfg["cross_attention_dim"])
                kw = {}
                if ucfg.get("addition_embed_type") == "text_time":
                    kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
                mt = MemTracker()
                mt.track_external(unet, opt)
                with mt:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                        pred = unet(x, t, cond, **kw).sample
                        loss = torch.nn.functional.mse_loss(pred.float(), x)
                    loss.backward()
                    opt.step()
                peak = mt.get_tracker_snapshot("peak")
                dev = next(iter(peak))
                out[prec] = sum(v for k, v in peak[dev].items()
                                if getattr(k, "value", k) in ("Activation", "Temp")) / 2**30
    finally:
        for n, orig in saved.items():
            setattr(torch.Tensor, n, orig)
    out["ratio"] = out["bf16"] / out["fp32"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=ARCHS, default="sdxl")
    ap.add_argument("--resolution", type=int, help="default: the model's native size (SDXL 1024, SD 1.5 512)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1, help="training steps per configuration (the peak repeats)")
    ap.add_argument("--configs", default="fp32,bf16,bf16+gc,bf16+gc+int8",
                    help="comma-separated configurations (see the module's help)")
    ap.add_argument("--act-ratio", type=float, default=None,
                    help="bf16/fp32 ratio of the step's activation memory for the GPU estimate (default: counted "
                         "with fake tensors on this architecture at --ratio-resolution)")
    ap.add_argument("--ratio-resolution", type=int, default=256)
    ap.add_argument("--ratio-only", action="store_true", help="only count the bf16/fp32 activation ratio")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    res = args.resolution or NATIVE[args.arch]
    if args.child:
        print("RESULT " + json.dumps(child(args.arch, args.child, res, args.batch_size, args.steps)), flush=True)
        return
    if args.act_ratio is None:
        t0 = time.perf_counter()
        r = activation_ratio(args.arch, args.ratio_resolution)
        args.act_ratio = r["ratio"]
        print(f"activation memory of a UNet LoRA step at {args.ratio_resolution}px (fake tensors, "
              f"{time.perf_counter() - t0:.0f}s): fp32 {r['fp32']:.3f} GB, bf16 autocast {r['bf16']:.3f} GB, "
              f"ratio {r['ratio']:.2f}", flush=True)
        if args.ratio_only:
            return
    specs = [s.strip() for s in args.configs.split(",") if s.strip()]
    for s in specs:
        parse(s)
    model_folder(args.arch)  # build the random-weight model once, before any timing
    print(f"{args.arch}, {res}px, batch {args.batch_size}, UNet LoRA rank 16 (attention), {args.steps} step(s) per "
          f"configuration, each in its own process; figures in GB, the process's libraries left out", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
           "PYTHONPATH": str(ROOT)}
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--resolution", str(res),
                              "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--child", spec],
                             env=env, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            killed = out.returncode in (-9, 137)
            print(f"  {spec}: failed (exit {out.returncode}{', killed: out of memory?' if killed else ''}) "
                  f"after {time.perf_counter() - t0:.0f}s\n{out.stderr[-1500:]}", flush=True)
            rows.append({"config": spec, "failed": True})
            continue
        r = json.loads(line[-1][len("RESULT "):])
        w, w16 = sum(r["weights"].values()), sum(r["weights16"].values())
        r["cpu"] = max(r["resident"], r["caching"], r["step"]) + r["libs"]
        # the GPU: 16-bit frozen weights; the VAE encodes in fp32 (its activations as measured, its weights twice
        # their 16-bit size meanwhile); the step's activations as measured in fp32 times the bf16/fp32 ratio
        caching = w16 + r["weights16"].get("vae", 0.0) + (r["caching"] - r["caching_start"])
        step = w16 + (r["resident"] - w) + (r["step"] - r["resident"]) * (1.0 if "bf16" in r["config"] else args.act_ratio)
        r["need"] = max(caching, step) + CUDA_CONTEXT_GB
        ws = ", ".join(f"{k} {v:.2f}" for k, v in r["weights"].items())
        print(f"  {spec:<14} measured on the CPU: resident {r['resident']:6.2f}, caching peak {r['caching']:6.2f}, "
              f"step peak {r['step']:6.2f} (+ libraries {r['libs']:.2f}: RAM {r['cpu']:.2f}); {r['step_s']:.0f} s/step "
              f"on {r['threads']} threads; weights as stored {ws}", flush=True)
        print(f"  {'':<14} GPU estimate (16-bit weights {w16:.2f}): caching {caching + CUDA_CONTEXT_GB:.2f}, step "
              f"{step + CUDA_CONTEXT_GB:.2f} -> {r['need']:.2f} GB", flush=True)
        rows.append(r)
    print(f"\nfits on a GPU of (estimate: the larger phase, 16-bit weights, activations x{args.act_ratio:.2f} of fp32, "
          f"+ {CUDA_CONTEXT_GB} GB CUDA context):")
    print("  config          " + "".join(f"{g:>6} GB" for g in SIZES_GB))
    for r in rows:
        if r.get("failed"):
            print(f"  {r['config']:<15} (failed)")
            continue
        print(f"  {r['config']:<15} " + "".join(f"{'yes' if r['need'] <= g else 'no':>9}" for g in SIZES_GB))
    print(" ".join(f"{r['config']}={r['need']:.2f}" for r in rows if not r.get("failed")))


if __name__ == "__main__":
    main()
