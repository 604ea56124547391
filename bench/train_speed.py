"""Training speed and peak memory of LoRA Studio, side by side with diffusers' DreamBooth LoRA script.

    python bench/train_speed.py [--peer PATH/TO/train_dreambooth_lora.py] [--steps 20 120] [--repeats 2] [--floor]

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


def measure(runners: dict[str, object], steps: tuple[int, int], repeats: int, env: dict) -> dict[str, tuple[float, float]]:
    """{name: (steps/s, peak RSS MB)}. Each trainer runs `steps[0]` and `steps[1]` steps, `repeats` times,
    the trainers interleaved; the fastest wall time of each length is kept (start-up and interference
    only ever add time), and steps/s is the step difference over the time difference."""
    walls: dict[str, dict[int, list[float]]] = {n: {s: [] for s in steps} for n in runners}
    peaks: dict[str, float] = {n: 0.0 for n in runners}
    for _ in range(repeats):
        for name, make in runners.items():
            for n in steps:
                wall, rss = run(make(n), env)
                walls[name][n].append(wall)
                peaks[name] = max(peaks[name], rss)
    out = {}
    for name in runners:
        t1, t2 = min(walls[name][steps[0]]), min(walls[name][steps[1]])
        sps = (steps[1] - steps[0]) / max(1e-9, t2 - t1)
        print(f"{name:>12}: {steps[0]} steps {t1:.1f}s, {steps[1]} steps {t2:.1f}s (best of {repeats}) -> "
              f"{sps:.2f} steps/s, peak RSS {peaks[name]:.0f} MB")
        out[name] = (sps, peaks[name])
    return out


def unet_step_floor(base: Path, threads: int, chunks: int = 6) -> float:
    """Steps/s of the bare UNet LoRA step (forward, loss, backward, AdamW) on fixed tensors in this
    process: no data loading, no VAE or text encoding, no logging. No trainer that does the same UNet
    math (same model, batch, resolution, rank) can run faster than this."""
    import torch
    import torch.nn.functional as F

    from pipelines.base_models import load_base
    from training import lora

    torch.set_num_threads(threads)
    b = load_base(str(base), device="cpu")
    pipe = b.pipe
    lora.attach(pipe, RANK, RANK, ["to_q", "to_k", "to_v", "to_out.0"], None)
    params = lora.trainable_params(pipe.unet)
    opt = torch.optim.AdamW(params, lr=LR)
    g = torch.Generator().manual_seed(0)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latents = torch.randn(BATCH, pipe.unet.config.in_channels, RES // f, RES // f, generator=g)  # (B, 4, h, w)
    with torch.no_grad():
        cond = pipe.encode_prompt(["a photo of sks"] * BATCH, "cpu", 1, False)[0]  # (B, 77, D)
    pipe.unet.train()

    def step() -> None:
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (BATCH,), generator=g)
        pred = pipe.unet(latents + noise, t, cond).sample
        F.mse_loss(pred, noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):  # warm-up
        step()
    best = float("inf")
    for _ in range(chunks):  # the fastest chunk counts, as with the trainers' runs
        t0 = time.perf_counter()
        for _ in range(10):
            step()
        best = min(best, time.perf_counter() - t0)
    return 10 / best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", type=Path, default=os.environ.get("DREAMBOOTH_LORA_SCRIPT"))
    ap.add_argument("--peer-python", default=sys.executable,
                    help="interpreter for the peer (it needs torchvision, which this project does not)")
    ap.add_argument("--ours-python", default=sys.executable,
                    help="interpreter for LoRA Studio (give both the same one to compare on equal torch builds)")
    ap.add_argument("--steps", type=int, nargs=2, default=(20, 120))
    ap.add_argument("--repeats", type=int, default=2, help="runs of each length per trainer; the fastest counts")
    ap.add_argument("--base", type=Path, default=BASE, help="base model folder (default: the toy model)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (1 is steadiest here)")
    ap.add_argument("--floor", action="store_true",
                    help="also time the bare UNet LoRA step in this process: the bound for any trainer doing the same math")
    args = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    print(f"toy model, {RES}px, batch {BATCH}, rank {RANK}, UNet LoRA, {args.threads} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        for png in sorted(IMAGES.glob("*.png")):  # the peer reads every file in the folder as an image
            shutil.copy(png, work / "images" / png.name)
        runners = {"lora-studio": lambda n: ours_cmd(args.ours_python, n, work, args.base)}
        if args.peer and Path(args.peer).is_file():
            runners["diffusers"] = lambda n: peer_cmd(args.peer_python, Path(args.peer), n, work, args.base)
        res = measure(runners, tuple(args.steps), args.repeats, env)
        sps, rss = res["lora-studio"]
        psps = None
        if "diffusers" in res:
            psps, prss = res["diffusers"]
            print(f"speed ratio (ours / diffusers) = {sps / psps:.2f}x; memory ratio = {rss / prss:.2f}")
        else:
            print("peer not measured: pass --peer PATH/TO/train_dreambooth_lora.py")
    if args.floor:
        # in a child on the same interpreter as ours, so both figures come from the same torch build
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from bench.train_speed import unet_step_floor; "
                "from pathlib import Path; print(unet_step_floor(Path(sys.argv[2]), int(sys.argv[3])))")
        floor = 0.0
        for _ in range(args.repeats):  # separate processes: the speed of one process varies from the next
            out = subprocess.run([args.ours_python, "-c", code, str(ROOT), str(args.base), str(args.threads)],
                                 env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"floor measurement failed:\n{out.stderr[-3000:]}")
            floor = max(floor, float(out.stdout.strip().splitlines()[-1]))
        line = f"{'floor':>12}: bare UNet LoRA step {floor:.2f} steps/s (best of {args.repeats}); ours runs at {sps / floor:.0%} of it"
        if psps:
            line += f"; the most any trainer doing the same UNet math could reach is {floor / psps:.2f}x the peer"
        print(line)
    print(f"steps_per_s={sps:.2f} peak_rss_mb={rss:.0f}")


if __name__ == "__main__":
    main()
