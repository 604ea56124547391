"""QLoRA on the CPU: training on an int8-quantized frozen base against the full-precision base.

    python bench/quantized_train.py [--steps 20 60] [--repeats 2] [--quantize int8] [--quality]

Both runs train the same UNet + text-encoder LoRA (the concept preset's targets) on the toy model
and sample_data/concept-star, as subprocesses (fresh processes, so peak RSS is the run's own).
Steps/s comes from the difference between a short and a longer run, so loading cancels out. Also
printed: how many bytes the quantized Linear weights take against float32.
With --quality, `bench/quality.py concept` runs for both bases (several minutes each) and the
fidelity / preservation of both adapters are printed side by side.
Last line: `quant_speed_ratio=x.xx quant_rss_ratio=x.xx linear_bytes_ratio=x.xx`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from train_speed import BASE, IMAGES, measure  # noqa: E402

RES, BATCH, RANK = 64, 4, 8


def cmd(steps: int, work: Path, quant: str | None) -> list[str]:
    c = [sys.executable, "-m", "app.cli", "train", "--images", str(work / "images"), "--trigger", "sks",
         "--name", f"q{steps}", "--library", str(work / "lib"), "--base", str(BASE), "--steps", str(steps),
         "--rank", str(RANK), "--batch-size", str(BATCH), "--resolution", str(RES), "--train-text-encoder",
         "--checkpoint-every", "0", "--sample-every", "0", "--device", "cpu", "--seed", "0", "--no-buckets"]
    return c + (["--quantize-base", quant] if quant else [])


def linear_bytes(quant: str) -> tuple[int, int]:
    from pipelines.base_models import load_base
    from pipelines.quantize import quantize_frozen, quantized_bytes

    base = load_base(BASE, device="cpu")
    quantize_frozen(base.pipe, quant, ("unet",))
    return quantized_bytes(base.pipe.unet)


def quality(quant: str | None, env: dict) -> str:
    c = [sys.executable, str(ROOT / "bench" / "quality.py"), "concept"] + (["--quantize-base", quant] if quant else [])
    out = subprocess.run(c, env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"quality run failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    last = [ln for ln in out.stdout.splitlines() if ln.startswith("fidelity=")]
    return last[-1] if last else "?"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs=2, default=(20, 60))
    ap.add_argument("--quantize", default="int8", choices=["int8", "nf4"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each length per base; the fastest counts")
    ap.add_argument("--quality", action="store_true", help="also run bench/quality.py concept on both bases")
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    print(f"toy model, {RES}px, batch {BATCH}, rank {RANK}, UNet + text-encoder LoRA, {args.threads} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        for f in sorted(IMAGES.iterdir()):
            if f.suffix in (".png", ".txt"):
                shutil.copy(f, work / "images" / f.name)
        res = measure({"fp32 base": lambda n: cmd(n, work, None),
                       f"{args.quantize} base": lambda n: cmd(n, work, args.quantize)},
                      tuple(args.steps), args.repeats, env)
        full, quant = res["fp32 base"], res[f"{args.quantize} base"]
        (full_sps, full_rss), (q_sps, q_rss) = (full["sps"], full["rss"]), (quant["sps"], quant["rss"])
    now, full = linear_bytes(args.quantize)
    print(f"UNet Linear weights: {full / 1e6:.2f} MB in fp32 -> {now / 1e6:.2f} MB in {args.quantize}")
    if args.quality:
        print(f"quality, fp32 base:            {quality(None, env)}", flush=True)
        print(f"quality, {args.quantize} base (QLoRA): {quality(args.quantize, env)}", flush=True)
    print(f"quant_speed_ratio={q_sps / full_sps:.2f} quant_rss_ratio={q_rss / full_rss:.2f} "
          f"linear_bytes_ratio={now / full:.2f}")


if __name__ == "__main__":
    main()
