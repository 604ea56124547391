"""Peak memory of a real LoRA training run on this CPU, per setting and phase; what fits in 8/12/16/24 GB of RAM.

    python bench/train_memory.py [--arch sd15|sdxl|toy] [--resolution R] [--batch-size B] [--steps N]
                                 [--configs fp32,fp32+gc,...]

Each configuration trains in its own process (the trainer itself, `Trainer.build` and `train_step`) on a
random-weight model of the released architecture (see bench/real_models.py; memory does not depend on the
weights), UNet LoRA rank 16 on the attention projections (the SD presets), and reports three figures from the
kernel's peak resident set (VmHWM, reset between phases through /proc/self/clear_refs):

  resident   the process after the trainer is built: weights as stored, LoRA, cached latents and embeddings
  caching    the peak while the training images are encoded to latents (VAE encoder at full resolution)
  step       the peak of the training steps (forward, backward, optimizer)

minus the process's own footprint before any model is loaded (Python, torch, diffusers: `libs`). The weights
are copied into the process's memory as they load (a mapped file's pages would only count once touched), so
the run briefly holds them twice: SDXL in fp32 does not fit this way in 24 GB. With int8 the quantized UNet is
the process's own memory anyway and nothing is copied (the text encoders and VAE are counted once the trainer
has used them, before the step). What a GPU needs is counted by
bench/gpu_memory.py (which also checks its count against this measurement). Configurations are `+`-joined:

  fp32 | bf16    precision: fp32, or mixed_precision = "bf16" (bf16 frozen weights, fp32 LoRA and optimizer,
                 autocast); bf16 only on CPUs with bf16 units (elsewhere it is ~37x slower: see the README)
  gc             gradient checkpointing
  int8           the frozen UNet quantized to int8 (quantize_base = "int8", torchao weight-only)
  te             the text encoder(s) trained too (otherwise their outputs are cached)

Last line: one `config=GB` (the RAM the run needs) per configuration.
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
        _reset_peak()
        out = real_build(*a, **kw)
        phases["caching"] = _status("VmHWM")
        return out

    trainer_mod.build_examples = build_examples
    real_load = trainer_mod.load_base

    def load_base(*a, **kw):  # weights in this process's own memory, as a GPU holds them (not pages of the
        base = real_load(*a, **kw)  # mapped file, which the kernel counts only once they are touched)
        with torch.no_grad():
            for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
                m = getattr(base.pipe, name, None)
                if m is None:
                    continue
                for t in [*m.parameters(), *m.buffers()]:
                    t.data = t.data.clone()
        gc.collect()
        return base

    if "int8" not in toks:  # quantizing copies the UNet into process memory anyway; the rest is touched while
        trainer_mod.load_base = load_base  # the trainer encodes, and a copy of SDXL's fp32 UNet would not fit
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
    weights = {}
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        m = getattr(tr.base.pipe, name, None)
        if m is not None:  # a torchao int8 weight: its int8 data and per-row scales
            weights[name] = sum(getattr(p, "qdata", p).numel() * getattr(p, "qdata", p).element_size()
                                for p in m.parameters()) / 2**30
    return {"config": spec, "libs": libs, "resident": resident - libs, "caching": phases.get("caching", 0.0) - libs,
            "step": step - libs, "build_s": build_s, "step_s": step_s, "weights": weights,
            "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=ARCHS, default="sd15")
    ap.add_argument("--resolution", type=int, help="default: the model's native size (SDXL 1024, SD 1.5 512)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1, help="training steps per configuration (the peak repeats)")
    ap.add_argument("--configs", default="fp32,fp32+gc,fp32+gc+int8",
                    help="comma-separated configurations (see the module's help)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    res = args.resolution or NATIVE[args.arch]
    if args.child:
        print("RESULT " + json.dumps(child(args.arch, args.child, res, args.batch_size, args.steps)), flush=True)
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
        r["need"] = max(r["resident"], r["caching"], r["step"]) + r["libs"]
        ws = ", ".join(f"{k} {v:.2f}" for k, v in r["weights"].items())
        print(f"  {spec:<14} resident {r['resident']:6.2f}, caching peak {r['caching']:6.2f}, step peak "
              f"{r['step']:6.2f} (+ libraries {r['libs']:.2f}: RAM {r['need']:.2f} GB); {r['step_s']:.0f} s/step on "
              f"{r['threads']} threads; weights as stored {ws}", flush=True)
        rows.append(r)
    print("\nfits in the RAM of a machine with (the largest phase with the libraries; the OS and other programs need "
          "their share too):")
    print("  config          " + "".join(f"{g:>6} GB" for g in SIZES_GB))
    for r in rows:
        if r.get("failed"):
            print(f"  {r['config']:<15} (failed)")
            continue
        print(f"  {r['config']:<15} " + "".join(f"{'yes' if r['need'] <= g else 'no':>9}" for g in SIZES_GB))
    print(" ".join(f"{r['config']}={r['need']:.2f}" for r in rows if not r.get("failed")))


if __name__ == "__main__":
    main()
