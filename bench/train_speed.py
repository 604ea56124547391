"""Training speed and peak memory of LoRA Studio, side by side with diffusers' DreamBooth LoRA script.

    python bench/train_speed.py [--peer PATH/TO/train_dreambooth_lora.py] [--steps 20 60]

Both trainers run as subprocesses on the same toy model, images (sample_data/concept-star),
resolution, batch size and rank, UNet-only LoRA. Steps/s comes from the difference between a short
and a longer run (so model loading and start-up cancel out); peak RSS is the child's maximum
resident set. The peer script is not part of this project: pass its path (from a diffusers
checkout, `examples/dreambooth/train_dreambooth_lora.py`); without it only our figures are printed.
Last line: `steps_per_s=x.xx peak_rss_mb=xxx`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "sample_data" / "concept-star"
BASE = ROOT / "sample_data" / "toy-sd"
RES, BATCH, RANK, LR = 64, 4, 8, 1e-4


def run(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{out[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0


def ours_cmd(python: str, steps: int, work: Path, base: Path = BASE) -> list[str]:
    return [python, "-m", "app.cli", "train", "--images", str(work / "images"), "--trigger", "sks",
            "--name", f"speed{steps}", "--library", str(work / "lib"), "--base", str(base), "--steps", str(steps),
            "--rank", str(RANK), "--alpha", str(RANK), "--batch-size", str(BATCH), "--resolution", str(RES),
            "--lr-unet", str(LR), "--no-train-text-encoder", "--checkpoint-every", "0", "--sample-every", "0",
            "--device", "cpu", "--seed", "0", "--no-buckets"]


def peer_cmd(python: str, peer: Path, steps: int, work: Path, base: Path = BASE) -> list[str]:
    return [python, str(peer), f"--pretrained_model_name_or_path={base}", f"--instance_data_dir={work / 'images'}",
            "--instance_prompt=a photo of sks", f"--resolution={RES}", f"--train_batch_size={BATCH}",
            f"--max_train_steps={steps}", f"--rank={RANK}", f"--learning_rate={LR}", "--lr_scheduler=constant",
            "--lr_warmup_steps=0", f"--output_dir={work / f'peer{steps}'}", "--seed=0", "--center_crop",
            "--checkpointing_steps=100000", "--report_to=tensorboard", "--mixed_precision=no"]


def measure(name: str, make, steps: tuple[int, int], env: dict) -> tuple[float, float]:
    (t1, m1), (t2, m2) = run(make(steps[0]), env), run(make(steps[1]), env)
    sps = (steps[1] - steps[0]) / max(1e-9, t2 - t1)
    print(f"{name:>12}: {steps[0]} steps {t1:.1f}s, {steps[1]} steps {t2:.1f}s -> {sps:.2f} steps/s, "
          f"peak RSS {max(m1, m2):.0f} MB")
    return sps, max(m1, m2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", type=Path, default=os.environ.get("DREAMBOOTH_LORA_SCRIPT"))
    ap.add_argument("--peer-python", default=sys.executable,
                    help="interpreter for the peer (it needs torchvision, which this project does not)")
    ap.add_argument("--ours-python", default=sys.executable,
                    help="interpreter for LoRA Studio (give both the same one to compare on equal torch builds)")
    ap.add_argument("--steps", type=int, nargs=2, default=(20, 80))
    ap.add_argument("--base", type=Path, default=BASE, help="base model folder (default: the toy model)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (1 is steadiest here)")
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    print(f"toy model, {RES}px, batch {BATCH}, rank {RANK}, UNet LoRA, {args.threads} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        for png in sorted(IMAGES.glob("*.png")):  # the peer reads every file in the folder as an image
            shutil.copy(png, work / "images" / png.name)
        sps, rss = measure("lora-studio", lambda n: ours_cmd(args.ours_python, n, work, args.base), tuple(args.steps), env)
        if args.peer and Path(args.peer).is_file():
            psps, prss = measure("diffusers", lambda n: peer_cmd(args.peer_python, Path(args.peer), n, work, args.base), tuple(args.steps), env)
            print(f"speed ratio (ours / diffusers) = {sps / psps:.2f}x; memory ratio = {rss / prss:.2f}")
        else:
            print("peer not measured: pass --peer PATH/TO/train_dreambooth_lora.py")
    print(f"steps_per_s={sps:.2f} peak_rss_mb={rss:.0f}")


if __name__ == "__main__":
    main()
