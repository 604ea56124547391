"""Training speed and peak memory of LoRA Studio, side by side with diffusers' DreamBooth LoRA example.

    python bench/train_speed.py [--arch toy|sd15|sdxl] [--resolution R] [--batch-size B] [--train-text-encoder]
                                [--mixed-precision no|bf16] [--gradient-checkpointing] [--quantize-base int8]
                                [--peer PATH/TO/train_dreambooth_lora.py] [--steps S1 S2] [--repeats N] [--floor]
                                [--networks loha,lokr,dora,pivotal]

Both trainers run as subprocesses on the same model, images (sample_data/concept-star), resolution, batch size
and rank, UNet LoRA (with --train-text-encoder: text-encoder LoRA too), each with its own default recipe
otherwise. `--arch sd15|sdxl` trains on a random-weight model of the exact released architecture (built once
into ~/.cache/lora-studio-bench by bench/real_models.py; no download: speed and memory don't depend on the
weights). The peer is diffusers' `examples/dreambooth/train_dreambooth_lora.py` (SDXL:
`train_dreambooth_lora_sdxl.py`), not part of this project: pass its path, or put it in
~/.cache/lora-studio-bench/peer/; it runs through bench/peer_shim.py (torchvision stand-in, see there).

Steps/s comes from the difference between a short and a longer run (so loading, latent caching and the final
save cancel out), from wall time and from the child's CPU time (steadier while other work shares the machine;
meaningful with one thread). Runs are interleaved and the fastest of --repeats counts. Peak RSS is the child's
maximum resident set (file-backed weight pages included, as diffusers maps safetensors files), and each one's
peak when training ends (bench/ours_shim.py, bench/peer_shim.py), before our end-of-run sample and weight check
and before the example loads a second pipeline for its final inference: rss_ratio compares those two.
Last line: `steps_per_s=x.xx peak_rss_mb=xxx [speed_ratio=x.xx rss_ratio=x.xx]`.
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.real_models import ARCHS, CACHE, model_folder  # noqa: E402

IMAGES = ROOT / "sample_data" / "concept-star"
BASE = ROOT / "sample_data" / "toy-sd"
SHIM = ROOT / "bench" / "peer_shim.py"
RANK, LR = 8, 1e-4
# per architecture: resolution, batch size, (short, long) run lengths in steps, torch threads
DEFAULTS = {"toy": (64, 4, (20, 120), 1), "sd15": (256, 1, (2, 22), 2), "sdxl": (256, 1, (1, 6), 2)}
PEER_SCRIPT = {"toy": "train_dreambooth_lora.py", "sd15": "train_dreambooth_lora.py",
               "sdxl": "train_dreambooth_lora_sdxl.py"}


def run(cmd: list[str], env: dict, peak_file: Path | None = None) -> dict[str, float]:
    """wall and CPU seconds, peak RSS MB of one child process (and the peer's training-phase peak)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env={**env, "LORA_STUDIO_BENCH_PEAK": str(peak_file or "")}, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            sys.exit(f"command failed: {' '.join(cmd)}\n{log.read()[-3000:]}")
    out = {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024.0}
    if peak_file is not None and peak_file.is_file() and peak_file.read_text().strip():
        out["rss_train"] = float(peak_file.read_text()) / 1024.0
        peak_file.unlink()
    return out


def ours_cmd(python: str, steps: int, work: Path, base: Path, a: argparse.Namespace) -> list[str]:
    c = [python, str(ROOT / "bench" / "ours_shim.py"), "train", "--images", str(work / "images"), "--trigger", "sks",
         "--name", f"speed{steps}", "--library", str(work / "lib"), "--base", str(base), "--steps", str(steps),
         "--rank", str(RANK), "--alpha", str(RANK), "--batch-size", str(a.batch_size), "--resolution",
         str(a.resolution), "--lr-unet", str(LR), "--checkpoint-every", "0", "--sample-every", "0",
         "--sample-steps", "1", "--device", "cpu", "--seed", "0", "--no-buckets", "--overwrite",
         "--mixed-precision", a.mixed_precision]
    c += ["--train-text-encoder", "--lr-text", str(LR)] if a.train_text_encoder else ["--no-train-text-encoder"]
    if a.gradient_checkpointing:
        c.append("--gradient-checkpointing")
    if a.quantize_base:
        c += ["--quantize-base", a.quantize_base]
    return c + list(a.ours_arg)


def peer_cmd(python: str, peer: Path, steps: int, work: Path, base: Path, a: argparse.Namespace) -> list[str]:
    c = [python, str(SHIM), str(peer), f"--pretrained_model_name_or_path={base}",
         f"--instance_data_dir={work / 'images'}", "--instance_prompt=a photo of sks", f"--resolution={a.resolution}",
         f"--train_batch_size={a.batch_size}", f"--max_train_steps={steps}", f"--rank={RANK}",
         f"--learning_rate={LR}", "--lr_scheduler=constant", "--lr_warmup_steps=0",
         f"--output_dir={work / f'peer{steps}'}", "--seed=0", "--center_crop", "--checkpointing_steps=100000",
         "--report_to=tensorboard", f"--mixed_precision={a.mixed_precision}"]
    if a.train_text_encoder:
        c.append("--train_text_encoder")
    if a.gradient_checkpointing:
        c.append("--gradient_checkpointing")
    return c


def measure(runners: dict[str, object], steps: tuple[int, int], repeats: int, env: dict,
            peak_dir: Path | None = None) -> dict[str, dict[str, float]]:
    """{name: {"sps", "sps_cpu", "rss", ["rss_train"]}}. Each trainer runs `steps[0]` and `steps[1]` steps,
    `repeats` times, the trainers interleaved; the fastest wall (and CPU) time of each length is kept
    (start-up and interference only ever add time), and steps/s is the step difference over the time
    difference."""
    res: dict[str, dict[int, list[dict[str, float]]]] = {n: {s: [] for s in steps} for n in runners}
    for _ in range(repeats):
        for name, make in runners.items():
            for n in steps:
                peak = (peak_dir / f"{name}.peak") if peak_dir else None
                res[name][n].append(run(make(n), env, peak))
    out = {}
    for name in runners:
        fig: dict[str, float] = {}
        for clock in ("wall", "cpu"):
            t1 = min(r[clock] for r in res[name][steps[0]])
            t2 = min(r[clock] for r in res[name][steps[1]])
            fig["sps" if clock == "wall" else "sps_cpu"] = (steps[1] - steps[0]) / max(1e-9, t2 - t1)
            fig[f"t1_{clock}"], fig[f"t2_{clock}"] = t1, t2
        runs = [r for n in steps for r in res[name][n]]
        fig["rss"] = max(r["rss"] for r in runs)
        if any("rss_train" in r for r in runs):
            fig["rss_train"] = max(r.get("rss_train", 0.0) for r in runs)
        extra = f", peak RSS when training ends {fig['rss_train']:.0f} MB" if "rss_train" in fig else ""
        print(f"{name:>12}: {steps[0]} steps {fig['t1_wall']:.1f}s, {steps[1]} steps {fig['t2_wall']:.1f}s "
              f"(best of {repeats}) -> {fig['sps']:.3f} steps/s wall, {fig['sps_cpu']:.3f} steps/s of CPU time; "
              f"peak RSS {fig['rss']:.0f} MB{extra}", flush=True)
        out[name] = fig
    return out


def unet_step_floor(base: Path, threads: int, chunks: int = 6, resolution: int = 64, batch: int = 4,
                    per_chunk: int = 10, mixed_precision: str = "no") -> float:
    """Steps/s of the bare UNet LoRA step (forward, loss, backward, AdamW) on fixed tensors in this
    process: no data loading, no VAE or text encoding, no logging. No trainer that does the same UNet
    math (same model, batch, resolution, rank, precision) can run faster than this. bf16/fp16: frozen
    weights stored in that dtype, fp32 LoRA weights, autocast (as both trainers do)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from pipelines.base_models import load_base
    from training import lora

    torch.set_num_threads(threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    b = load_base(str(base), device="cpu", dtype=dtype)
    pipe = b.pipe
    lora.attach(pipe, RANK, RANK, ["to_q", "to_k", "to_v", "to_out.0"], None)
    params = lora.trainable_params(pipe.unet)  # fp32 (attach casts them)
    opt = torch.optim.AdamW(params, lr=LR)
    autocast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    g = torch.Generator().manual_seed(0)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    latents = torch.randn(batch, pipe.unet.config.in_channels, resolution // f, resolution // f, generator=g)  # (B, 4, h, w)
    with torch.no_grad():
        cond = pipe.encode_prompt(["a photo of sks"] * batch, "cpu", 1, False)[0]  # (B, 77, D)
    pipe.unet.train()

    def step() -> None:
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        with autocast:
            pred = pipe.unet((latents + noise).to(pipe.unet.dtype), t, cond.to(pipe.unet.dtype)).sample
        F.mse_loss(pred.float(), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2 if per_chunk < 10 else 5):  # warm-up
        step()
    best = float("inf")
    for _ in range(chunks):  # the fastest chunk counts, as with the trainers' runs
        t0 = time.perf_counter()
        for _ in range(per_chunk):
            step()
        best = min(best, time.perf_counter() - t0)
    return per_chunk / best


def default_peer(arch: str) -> Path | None:
    env = os.environ.get("DREAMBOOTH_LORA_SDXL_SCRIPT" if arch == "sdxl" else "DREAMBOOTH_LORA_SCRIPT")
    if env:
        return Path(env)
    cached = CACHE / "peer" / PEER_SCRIPT[arch]
    return cached if cached.is_file() else None


# --networks variants that are LoRA with an option rather than a network type; pivotal's vectors train at every step
# of the measured runs (its cost while they train; afterwards a run costs what LoRA does)
VARIANTS = {"dora": ["--dora"], "pivotal": ["--pivotal", "--ti-frac", "1"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=ARCHS, default="toy",
                    help="toy: the shipped model; sd15/sdxl: random weights, released architecture")
    ap.add_argument("--resolution", type=int, help="default: 64 (toy), 256 (sd15, sdxl)")
    ap.add_argument("--batch-size", type=int, help="default: 4 (toy), 1 (sd15, sdxl)")
    ap.add_argument("--train-text-encoder", action="store_true", help="text-encoder LoRA too, on both sides")
    ap.add_argument("--mixed-precision", choices=["no", "bf16"], default="no", help="both sides")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="both sides")
    ap.add_argument("--quantize-base", choices=["int8"], default=None, help="ours only (the example has no such option)")
    ap.add_argument("--ours-arg", action="append", default=[], help="one more argument for our trainer (repeatable)")
    ap.add_argument("--peer", type=Path, default=None,
                    help="the example script (default: $DREAMBOOTH_LORA_SCRIPT / $DREAMBOOTH_LORA_SDXL_SCRIPT, or "
                         "~/.cache/lora-studio-bench/peer/<script>)")
    ap.add_argument("--no-peer", action="store_true", help="only our figures")
    ap.add_argument("--networks", default="", metavar="loha,lokr,dora,pivotal",
                    help="also our trainer with these network types (LyCORIS LoHa / LoKr, LoRA with DoRA, or LoRA with "
                         "pivotal tuning, its vectors training at every step), side by side with its LoRA")
    ap.add_argument("--peer-python", default=sys.executable, help="interpreter for the peer")
    ap.add_argument("--ours-python", default=sys.executable,
                    help="interpreter for LoRA Studio (give both the same one to compare on equal torch builds)")
    ap.add_argument("--steps", type=int, nargs=2, help="short and long run lengths (default per arch)")
    ap.add_argument("--repeats", type=int, default=None, help="runs of each length per trainer; the fastest counts "
                                                              "(default 2; 1 for sdxl)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: 1 toy, 2 otherwise)")
    ap.add_argument("--floor", action="store_true",
                    help="also time the bare UNet LoRA step in this process: the bound for any trainer doing the same math")
    args = ap.parse_args(argv)
    res0, batch0, steps0, threads0 = DEFAULTS[args.arch]
    args.resolution = args.resolution or res0
    args.batch_size = args.batch_size or batch0
    steps = tuple(args.steps or steps0)
    threads = args.threads or threads0
    repeats = args.repeats or (1 if args.arch == "sdxl" else 2)
    base = model_folder(args.arch)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    what = "UNet + text-encoder LoRA" if args.train_text_encoder else "UNet LoRA"
    opts = [f"mixed precision {args.mixed_precision}"] + (["gradient checkpointing"] if args.gradient_checkpointing else []) \
        + ([f"ours on a {args.quantize_base} base"] if args.quantize_base else [])
    print(f"{args.arch} model ({base}), {args.resolution}px, batch {args.batch_size}, rank {RANK}, {what}, "
          f"{', '.join(opts)}; {threads} thread(s); CPU", flush=True)
    peer = None if args.no_peer else (args.peer or default_peer(args.arch))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        for png in sorted(IMAGES.glob("*.png")):  # the peer reads every file in the folder as an image
            shutil.copy(png, work / "images" / png.name)
        runners = {"lora-studio": lambda n: ours_cmd(args.ours_python, n, work, base, args)}
        networks = [x.strip() for x in args.networks.split(",") if x.strip()]
        for net in networks:
            runners[f"ours-{net}"] = (lambda net: lambda n: ours_cmd(args.ours_python, n, work, base, args)
                                      + VARIANTS.get(net, ["--network", net]))(net)
        if peer and Path(peer).is_file():
            runners["diffusers"] = lambda n: peer_cmd(args.peer_python, Path(peer), n, work, base, args)
        res = measure(runners, steps, repeats, env, peak_dir=work)
    ours = res["lora-studio"]
    last = f"steps_per_s={ours['sps']:.3f} peak_rss_mb={ours['rss']:.0f}"
    for net in networks:
        r = res[f"ours-{net}"]
        print(f"{net} / LoRA, same run: speed {r['sps'] / ours['sps']:.2f}x wall, {r['sps_cpu'] / ours['sps_cpu']:.2f}x "
              f"CPU time; peak RSS when training ends {r.get('rss_train', r['rss']) / ours.get('rss_train', ours['rss']):.2f}x")
    if "diffusers" in res:
        p = res["diffusers"]
        ratio, ratio_cpu = ours["sps"] / p["sps"], ours["sps_cpu"] / p["sps_cpu"]
        # like with like: both peaks when training ends (before either's end-of-run inference), and whole runs
        rss_ratio = ours.get("rss_train", ours["rss"]) / p.get("rss_train", p["rss"])
        print(f"speed ratio (ours / diffusers) = {ratio:.2f}x wall, {ratio_cpu:.2f}x CPU time; memory ratio = "
              f"{rss_ratio:.2f} (peaks when training ends; {ours['rss'] / p['rss']:.2f} of whole runs, ours with "
              f"its end-of-run sample and weight check)")
        if (args.arch, args.resolution, args.batch_size, args.train_text_encoder) == ("sd15", 256, 1, False):
            print(f"target (SD 1.5-sized, 256 px, batch 1, UNet LoRA, CPU): >= 1.5x at <= its peak RSS: "
                  f"{'met' if ratio >= 1.5 and rss_ratio <= 1 else 'MISSED'}")
        elif args.arch == "toy" and not args.train_text_encoder:
            print(f"target (toy model): >= 2x: {'met' if ratio >= 2 else 'MISSED'}")
        last += f" speed_ratio={ratio:.2f} rss_ratio={rss_ratio:.2f}"
    else:
        print("peer not measured: pass --peer PATH/TO/train_dreambooth_lora.py (from a diffusers checkout, "
              f"examples/dreambooth/), or put it in {CACHE / 'peer'}")
    if args.floor:
        # in a child on the same interpreter as ours, so both figures come from the same torch build
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from bench.train_speed import unet_step_floor; "
                "from pathlib import Path; print(unet_step_floor(Path(sys.argv[2]), int(sys.argv[3]), "
                "resolution=int(sys.argv[4]), batch=int(sys.argv[5]), chunks=int(sys.argv[6]), per_chunk=int(sys.argv[7]), "
                "mixed_precision=sys.argv[8]))")
        small = args.arch != "toy"
        floor = 0.0
        for _ in range(repeats):  # separate processes: the speed of one process varies from the next
            out = subprocess.run([args.ours_python, "-c", code, str(ROOT), str(base), str(threads), str(args.resolution),
                                  str(args.batch_size), "3" if small else "6", "2" if small else "10",
                                  args.mixed_precision],
                                 env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"floor measurement failed:\n{out.stderr[-3000:]}")
            floor = max(floor, float(out.stdout.strip().splitlines()[-1]))
        line = f"{'floor':>12}: bare UNet LoRA step {floor:.3f} steps/s (best of {repeats}); ours runs at {ours['sps'] / floor:.0%} of it"
        if "diffusers" in res:
            line += f"; the most any trainer doing the same UNet math could reach is {floor / res['diffusers']['sps']:.2f}x the peer"
        print(line)
    print(last)


if __name__ == "__main__":
    main()
