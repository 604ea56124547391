"""Peak memory of making several images at once against a few at a time (A1111's Batch size), side by side.

    python bench/generate_memory.py [--arch toy|sd15|sdxl] [--resolution R] [--images N] [--steps S]
                                    [--batch-sizes 0,2,1] [--device cpu|cuda]

Each batch size runs in its own process on the same model (a random-weight model of the released architecture for
sd15/sdxl, bench/real_models.py: memory does not depend on the weights): it loads the model, makes one image to
warm up, then makes N images (CFG 7, DPM++ 2M Karras) with `batch_size` (0: all N in one batch). On the CPU the
figure is the peak resident set during that generation minus the resident set before it (VmHWM, reset through
/proc/self/clear_refs); on CUDA torch's peak allocation over the weights. The same seeds give the same images at
every batch size (tests/test_batches.py). Last line: `batch_size=GB` per setting and the ratio to all at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.real_models import ARCHS, NATIVE, model_folder  # noqa: E402
from bench.train_memory import _reset_peak, _status  # noqa: E402


def child(arch: str, resolution: int, images: int, steps: int, batch_size: int, device: str) -> dict:
    import gc

    import torch

    from pipelines.base_models import load_base
    from pipelines.generation import GenerationRequest, generate

    base = load_base(model_folder(arch), device=device)
    with torch.no_grad():  # the weights in this process's own memory (not pages of a mapped file)
        for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
            m = getattr(base.pipe, name, None)
            for t in ([] if m is None else [*m.parameters(), *m.buffers()]):
                t.data = t.data.clone()
    req = dict(prompt="a red circle on a white background", steps=steps, seed=1, width=resolution, height=resolution)
    generate(base, GenerationRequest(**req, num_images=1))  # warm-up: the allocator's first blocks
    gc.collect()
    t0 = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        generate(base, GenerationRequest(**req, num_images=images, batch_size=batch_size))
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    else:
        before = _status("VmRSS")
        _reset_peak()
        generate(base, GenerationRequest(**req, num_images=images, batch_size=batch_size))
        peak = _status("VmHWM") - before
    return {"batch_size": batch_size, "peak": peak, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=ARCHS, default="toy")
    ap.add_argument("--resolution", type=int, help="default: the model's native size")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-sizes", default="0,4,1", help="comma-separated; 0: all images in one batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    res = args.resolution or NATIVE[args.arch]
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.arch, res, args.images, args.steps, args.child, args.device)),
              flush=True)
        return
    sizes = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    model_folder(args.arch)
    print(f"{args.arch}, {res}px, {args.images} images, {args.steps} steps, CFG 7, on {args.device}; each batch size "
          f"in its own process; peak memory of the generation over what the process held before it", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
           "PYTHONPATH": str(ROOT)}
    rows = []
    for bs in sizes:
        out = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--resolution", str(res), "--images",
                              str(args.images), "--steps", str(args.steps), "--device", args.device,
                              "--child", str(bs)], env=env, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"  batch size {bs}: failed (exit {out.returncode})\n{out.stderr[-1500:]}", flush=True)
            continue
        r = json.loads(line[-1][len("RESULT "):])
        rows.append(r)
        label = "all at once" if bs == 0 else f"{bs} at a time"
        print(f"  batch size {bs} ({label}): peak {r['peak']:.3f} GB, {r['seconds']:.1f} s", flush=True)
    if not rows:
        raise SystemExit("no setting ran")
    ref = next((r["peak"] for r in rows if r["batch_size"] == 0), rows[0]["peak"])
    print(" ".join(f"batch_size={r['batch_size']}={r['peak']:.3f}GB(x{r['peak'] / ref:.2f})" for r in rows))


if __name__ == "__main__":
    main()
