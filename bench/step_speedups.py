"""What each step speed-up gives, as a ratio against today's training step, measured in one process.

    python bench/step_speedups.py --arch toy|sd15|sdxl [--resolution R] [--batch-size B] [--rounds N]
                                  [--variants bf16,bf16w,channels_last,...] [--threads T]

One `Trainer` is built on the model (the shipped toy model, or a random-weight SD 1.5 / SDXL of the released
architecture, see bench/real_models.py) with UNet LoRA (rank 8, attention), and its own `train_step` is timed:
the base step as configured today (fp32, diffusers' default SDPA attention processor, torch's default AdamW),
then each variant with one thing changed. Rounds interleave the base and every variant (a rotating order);
each variant's figure is the median over rounds of base time / variant time in the same round, so load from
other work on the machine cancels out as far as it can. Variants:

  bf16            autocast to bfloat16 (CPU: AMX/AVX-512 bf16 matmuls), frozen weights kept in fp32
  bf16w           autocast to bfloat16 with the frozen base weights stored in bf16 (LoRA weights stay fp32)
  channels_last   the UNet's weights (and so its convolutions' outputs) in channels-last memory format
  adamw_fused     torch.optim.AdamW(fused=True)
  adamw_foreach   torch.optim.AdamW(foreach=True)
  attn_classic    diffusers' classic AttnProcessor (explicit softmax(QK^T)V) instead of SDPA: SDPA's gain is 1/this
  compile         torch.compile of the UNet (its compile time is printed; slow to compile on a small CPU)

Last line: `name=ratio ...` (above 1: faster than today's step).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.real_models import ARCHS, model_folder  # noqa: E402

DEFAULTS = {"toy": (64, 4, 10), "sd15": (256, 1, 1), "sdxl": (256, 1, 1)}  # resolution, batch, steps per timing
VARIANTS = ("bf16", "bf16w", "channels_last", "adamw_fused", "adamw_foreach", "attn_classic", "compile")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Bench:
    def __init__(self, arch: str, resolution: int, batch: int, tmp: Path):
        from training.config import TrainConfig
        from training.trainer import Trainer

        cfg = TrainConfig(images=str(ROOT / "sample_data" / "concept-star"), trigger="sks", name="speedups",
                          output_dir=str(tmp), base=str(model_folder(arch)), resolution=resolution,
                          batch_size=batch, rank=8, lr_unet=1e-4, train_text_encoder=False, buckets=False,
                          checkpoint_every=0, device="cpu", max_steps=10_000, seed=0)
        self.trainer = Trainer(cfg)
        self.trainer.build()
        self.trainer.base.pipe.unet.train()
        self.unet = self.trainer.base.pipe.unet
        self.step_no = 0
        self.base_opt = self.trainer.optimizer
        self.opts = {}

    def step(self, n: int) -> tuple[float, float]:
        """(wall, CPU) seconds per step. CPU time (all of this process's threads) leaves out waiting for a core
        that other work holds; with one thread it is the steadiest clock on a shared machine."""
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            self.trainer.train_step(self.step_no)
            self.step_no += 1
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n

    # each variant: a context that applies one change and undoes it
    @contextlib.contextmanager
    def variant(self, name: str):
        tr, unet = self.trainer, self.unet
        if name == "base":
            yield
        elif name in ("bf16", "bf16w"):
            frozen = [p for p in unet.parameters() if not p.requires_grad] if name == "bf16w" else []
            for p in frozen:
                p.data = p.data.to(torch.bfloat16)
            tr.unet_dtype = torch.bfloat16 if frozen else torch.float32
            tr.accelerator.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
            try:
                yield
            finally:
                del tr.accelerator.autocast
                for p in frozen:
                    p.data = p.data.float()
                tr.unet_dtype = torch.float32
        elif name == "channels_last":
            unet.to(memory_format=torch.channels_last)
            try:
                yield
            finally:
                unet.to(memory_format=torch.contiguous_format)
        elif name in ("adamw_fused", "adamw_foreach"):
            if name not in self.opts:
                groups = [{"params": g["params"], "lr": g["lr"]} for g in self.base_opt.param_groups]
                kw = {"fused": True} if name == "adamw_fused" else {"foreach": True}
                self.opts[name] = torch.optim.AdamW(groups, weight_decay=tr.cfg.weight_decay, **kw)
            tr.optimizer = self.opts[name]
            try:
                yield
            finally:
                tr.optimizer = self.base_opt
        elif name == "attn_classic":
            from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

            unet.set_attn_processor(AttnProcessor())
            try:
                yield
            finally:
                unet.set_attn_processor(AttnProcessor2_0())
        elif name == "compile":
            pipe = tr.base.pipe
            object.__setattr__(pipe, "unet", self.compiled)
            try:
                yield
            finally:
                object.__setattr__(pipe, "unet", unet)
        else:
            raise ValueError(name)


def bf16_matmul_ratio(n: int = 1024, reps: int = 3) -> tuple[float, float]:
    """(fp32, bf16) seconds of an n x n matmul on this CPU: whether it has bf16 units (AMX, AVX512-BF16) or
    torch emulates bf16, which decides whether bf16 autocast can pay here at all."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = []
    for dt in (torch.float32, torch.bfloat16):
        x, y = a.to(dt), b.to(dt)
        x @ y
        t0 = time.perf_counter()
        for _ in range(reps):
            x @ y
        out.append((time.perf_counter() - t0) / reps)
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=ARCHS, default="toy")
    ap.add_argument("--resolution", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--steps", type=int, help="steps per timing (default: 10 on the toy model, 1 otherwise)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="steps of each variant before the rounds")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "compile"),
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="what the ratios use: wall time, or this process's CPU time (steadier while other work "
                         "runs; meaningful with --threads 1)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res0, batch0, steps0 = DEFAULTS[args.arch]
    res, batch, n = args.resolution or res0, args.batch_size or batch0, args.steps or steps0
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = set(names) - set(VARIANTS)
    if bad:
        sys.exit(f"unknown variants: {', '.join(sorted(bad))}")
    f32, b16 = bf16_matmul_ratio()
    print(f"this CPU: a 1024x1024 matmul takes {f32 * 1e3:.1f} ms in fp32, {b16 * 1e3:.1f} ms in bf16 "
          f"(bf16 x{f32 / b16:.3f}{': emulated, no bf16 units' if b16 > 2 * f32 else ''})", flush=True)
    with tempfile.TemporaryDirectory(prefix="speedups_") as tmp:
        t0 = time.perf_counter()
        b = Bench(args.arch, res, batch, Path(tmp))
        print(f"{args.arch}: {res}px, batch {batch}, UNet LoRA rank 8; built in {time.perf_counter() - t0:.0f}s; "
              f"torch threads {torch.get_num_threads()}; RSS {rss_mb():.0f} MB", flush=True)
        configs = ["base", *names]
        if "compile" in names:
            b.compiled = torch.compile(b.unet)
            t0 = time.perf_counter()
            with b.variant("compile"):
                b.step(1)
            print(f"compile: first step (compiling forward and backward) {time.perf_counter() - t0:.1f}s", flush=True)
        for cfg in configs:
            with b.variant(cfg):
                b.step(args.warmup)
        walls: dict[str, list[float]] = {c: [] for c in configs}
        cpus: dict[str, list[float]] = {c: [] for c in configs}
        for r in range(args.rounds):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            for cfg in order:
                with b.variant(cfg):
                    w, c = b.step(n)
                walls[cfg].append(w)
                cpus[cfg].append(c)
            print(f"  round {r + 1} (wall/cpu s): " + "  ".join(f"{c} {walls[c][-1]:.3f}/{cpus[c][-1]:.3f}"
                                                           for c in configs), flush=True)
    times = cpus if args.clock == "cpu" else walls
    ratio = {c: statistics.median(tb / tc for tb, tc in zip(times["base"], times[c])) for c in configs}
    print(f"median step time and speed ratio against today's step (median of per-round {args.clock}-time ratios, "
          f"{args.rounds} rounds):")
    for c in configs:
        print(f"  {c:<14} wall {statistics.median(walls[c]):8.3f} s/step   cpu {statistics.median(cpus[c]):8.3f} s/step"
              f"   x{ratio[c]:.2f}")
    print(" ".join(f"{c}={ratio[c]:.2f}" for c in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
