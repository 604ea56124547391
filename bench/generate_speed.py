"""Generation speed with stacked adapters, measured side by side in one run.

    python bench/generate_speed.py [--arch toy|sd15|sdxl | --base FOLDER] [--repeats 7] [--steps 20] [--size 64]
                                   [--no-public] [--dora]

Prints the latency of one generation (fixed prompt, seed, steps and size; one image) for: the base
model alone (no adapter ever loaded), the same model with 1 and with 3 adapters active (unfused),
and with the 3 fused; then the time to change the weights of the loaded 3-adapter stack and the time
to load one adapter file. `--arch sd15|sdxl` runs on a random-weight model of the released architecture
(bench/real_models.py). Unless --no-public, the same is measured through diffusers' own public path on a
second copy of the model (`load_lora_weights(adapter_name=...)`, `set_adapters`, `fuse_lora`), which is what
LoRA Studio's stack would do without its own speed path (pipelines/stack.py: one combined slot per layer,
a short inference forward, fused layers put back in place of their wrappers, and adding a file to existing
LoRA layers). The adapters are made on the fly (random rank-8 LoRA on the UNet and text
encoder attention projections, written with `pipelines.adapters.save_adapter` into a temporary
library). Configurations are interleaved (a rotating order in every round); each ratio is the median over
rounds of the configuration's time over the base's time in the same round, so background load on a small
machine cancels out as far as it can. Goals (issue 4): fused within 3%
of base, 3 unfused at most 1.25x base, weight change < 50 ms, load < 200 ms.
With --dora, three DoRA files (the same random factors plus per-input `dora_scale` lengths, as A1111/ComfyUI
files from LyCORIS hold them) are measured in the same rounds: 1 and 3 unfused, 3 fused, and the load of one
(which measures the base weights' columns), each beside its plain-LoRA counterpart.
Last line: `fused_ratio=x.xx unfused3_ratio=x.xx weight_change_ms=x load_ms=x`.
"""

from __future__ import annotations

import argparse
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

from pipelines.adapters import lora_metadata, save_adapter  # noqa: E402
from pipelines.base_models import load_base  # noqa: E402
from pipelines.generation import GenerationRequest, generate  # noqa: E402
from pipelines.library import AdapterLibrary  # noqa: E402
from pipelines.stack import AdapterStack  # noqa: E402
from pipelines.weights_io import save_safetensors  # noqa: E402
from bench.real_models import ARCHS, model_folder  # noqa: E402

RANK = 8
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
PROMPT = "a red circle on a blue background"


def random_lora(pipe, seed: int, rank: int = RANK, std: float = 0.3) -> dict[str, torch.Tensor]:
    """Random LoRA factors (our key format) for every attention projection of the UNet and text encoder."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for comp, targets in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        for name, mod in getattr(pipe, comp).named_modules():
            if not isinstance(mod, torch.nn.Linear) or not name.endswith(targets):
                continue
            key = f"unet.{name}" if comp == "unet" else f"text_encoder.text_model.{name.removeprefix('text_model.')}"
            sd[f"{key}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * std / mod.in_features ** 0.5
            sd[f"{key}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * std / rank ** 0.5
    return sd


def with_dora(pipe, sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """`sd` plus a per-input-channel DoRA length for each module: the base column norms of W + ΔW, moved 5%."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = dict(sd)
    mods = {}
    for comp in ("unet", "text_encoder"):
        for name, mod in getattr(pipe, comp).named_modules():
            mods[f"{comp}.{name}" if comp == "unet" else f"text_encoder.text_model.{name.removeprefix('text_model.')}"] = mod
    for key in sd:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            w = mods[module].weight.detach().float() + sd[f"{module}.lora_B.weight"] @ sd[key]
            norm = w.norm(dim=0)  # (in,)
            out[f"{module}.dora_scale"] = (norm * (1 + 0.05 * torch.randn(norm.shape, generator=g)))[None, :]
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed2(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds). CPU time leaves out waiting for a core when another process
    holds it; it still includes slow-down from shared caches and memory bandwidth."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="base model folder (default: the model of --arch)")
    ap.add_argument("--arch", choices=ARCHS, default="toy",
                    help="toy: the embedded toy model; sd15/sdxl: random weights, released architecture")
    ap.add_argument("--no-public", action="store_true", help="skip diffusers' public set_adapters/fuse_lora path")
    ap.add_argument("--repeats", type=int, default=7, help="rounds of generation per configuration")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=None, help="image side (default: 64 toy, 256 otherwise)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="what the ratios on the last line use: wall time (default), or this process's CPU time "
                         "(leaves out waiting for a busy core; meaningful with OMP_NUM_THREADS=1)")
    ap.add_argument("--dora", action="store_true",
                    help="also DoRA files (per-input dora_scale) beside the plain ones, in the same rounds")
    ap.add_argument("--per-adapter", action="store_true",
                    help="for comparison: run stacks through peft's per-adapter path (no combined slot)")
    args = ap.parse_args(argv)
    args.base = args.base or str(model_folder(args.arch))
    args.size = args.size or (64 if args.arch == "toy" else 256)
    if args.per_adapter:
        import pipelines.stack

        pipelines.stack._combinable = lambda layer, adapters: False
    if not (Path(args.base) / "model_index.json").is_file():
        sys.exit(f"no base model at {args.base} (train it with `python -m training.toy_base`, or pass --base)")

    req = GenerationRequest(prompt=PROMPT, steps=args.steps, seed=1, width=args.size, height=args.size,
                            num_images=1, scheduler="DPM++ 2M Karras")
    plain = load_base(args.base, device=args.device)  # never gets an adapter: the true base
    model = load_base(args.base, device=args.device)
    with tempfile.TemporaryDirectory(prefix="genspeed_") as tmp:
        lib = AdapterLibrary(Path(tmp) / "loras")
        lib.root.mkdir()
        for i, name in enumerate(("a", "b", "c")):
            save_adapter(random_lora(model.pipe, seed=i), lib.root / f"{name}.safetensors",
                         lora_metadata(family=model.family, rank=RANK, alpha=RANK, name=name))
            if args.dora:  # the same factors with DoRA lengths: d, e, f
                save_safetensors(with_dora(model.pipe, random_lora(model.pipe, seed=i), i),  # peft keys + dora_scale
                                 lib.root / f"{'def'[i]}.safetensors",
                                 lora_metadata(family=model.family, rank=RANK, alpha=RANK, name="def"[i]))
        stack = AdapterStack(model, lib)
        three = [("a", 0.8), ("b", 0.5), ("c", -0.4)]
        three_dora = [("d", 0.8), ("e", 0.5), ("f", -0.4)]
        if args.dora:
            stack.set_stack(three_dora)
        stack.set_stack(three)  # loads the three files once
        pub = None if args.no_public else load_base(args.base, device=args.device)
        names = [n for n, _ in three]
        if pub is not None:  # diffusers' public API on its own copy of the model
            for n in names:
                pub.pipe.load_lora_weights(str(lib.path_for(n)), adapter_name=n)
            pub.pipe.set_adapters(names, adapter_weights=[w for _, w in three])
        pub_fused = [False]

        def pub_setup(fused: bool) -> None:
            if pub_fused[0] and not fused:
                pub.pipe.unfuse_lora()
            elif fused and not pub_fused[0]:
                pub.pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
            pub_fused[0] = fused

        # configuration -> (the stack it runs, fused or not); the 1-adapter rows leave a fused stack as it is
        stacks = {"1 unfused": ([("a", 0.8)], None), "3 unfused": (three, False), "3 fused": (three, True),
                  "1 DoRA unfused": ([("d", 0.8)], None), "3 DoRA unfused": (three_dora, False),
                  "3 DoRA fused": (three_dora, True)}

        def setup(cfg: str) -> None:
            if cfg in stacks:
                entries, fused = stacks[cfg]
                stack.set_stack(entries)
                if fused is True:
                    stack.fuse()
                elif fused is False:
                    stack.unfuse()
            elif cfg.startswith("diffusers"):
                pub_setup(cfg.endswith("fused") and "unfused" not in cfg)

        def run(cfg: str) -> tuple[float, float]:
            if cfg == "base":
                return timed2(lambda: generate(plain, req))
            if cfg.startswith("diffusers"):
                return timed2(lambda: generate(pub, req))
            return timed2(lambda: stack.generate(req, stack.stack))

        configs = ["base", "1 unfused", "3 unfused", "3 fused"]
        if args.dora:
            configs += ["1 DoRA unfused", "3 DoRA unfused", "3 DoRA fused"]
        if pub is not None:
            configs += ["diffusers 3 unfused", "diffusers 3 fused"]
        for cfg in configs:  # warm-up (allocator, scheduler set-up, first-call costs)
            setup(cfg)
            run(cfg)
        times: dict[str, list[float]] = {c: [] for c in configs}
        cpu: dict[str, list[float]] = {c: [] for c in configs}
        for r in range(args.repeats):
            order = configs[r % len(configs):] + configs[: r % len(configs)]
            for cfg in order:
                setup(cfg)
                wall, used = run(cfg)
                times[cfg].append(wall)
                cpu[cfg].append(used)
        med_wall = {c: statistics.median(v) for c, v in times.items()}
        med_cpu = {c: statistics.median(v) for c, v in cpu.items()}
        # each configuration against the base run of the same round (seconds apart): a burst of other work on
        # the machine that spans a round cancels out of the ratio
        src = cpu if args.clock == "cpu" else times
        ratio = {c: statistics.median(t / b for t, b in zip(src[c], src["base"])) for c in configs}

        # weight changes of the loaded, unfused 3-adapter stack (no file read, no base reload)
        stack.unfuse()
        reads = stack.reads
        change = []
        for i in range(max(20, args.repeats)):
            w = 0.1 + (i % 10) / 10
            change.append(timed(lambda: stack.set_stack([("a", w), ("b", -w / 2), ("c", 1 - w)])))
        assert stack.reads == reads, "changing weights re-read an adapter file"
        select = []  # changing the selection (3 adapters <-> 2): every LoRA layer is re-activated
        for i in range(max(10, args.repeats)):
            select.append(timed(lambda: stack.set_stack(three[: 2 + (i % 2)])))

        # loading one adapter file into the model (which already holds the three)
        load = []
        path = lib.path_for("a")
        for i in range(max(5, args.repeats)):
            load.append(timed(lambda: stack.load(f"extra{i}", path)))
            stack.unload([f"extra{i}"])
        size_mb = path.stat().st_size / 1e6
        load_dora = []
        if args.dora:
            for i in range(max(5, args.repeats)):
                load_dora.append(timed(lambda: stack.load(f"extra_d{i}", lib.path_for("d"))))
                stack.unload([f"extra_d{i}"])
        stack.unload()
        pub_change, pub_load = [], []
        if pub is not None:  # the same through diffusers' public API
            pub_setup(False)
            for i in range(max(20, args.repeats)):
                w = 0.1 + (i % 10) / 10
                pub_change.append(timed(lambda: pub.pipe.set_adapters(names, adapter_weights=[w, -w / 2, 1 - w])))
            for i in range(max(5, args.repeats)):
                pub_load.append(timed(lambda: pub.pipe.load_lora_weights(str(path), adapter_name=f"extra{i}")))
                pub.pipe.delete_adapters([f"extra{i}"])

    print(f"base model {Path(args.base).name} ({model.family}), {args.steps} steps, {args.size}x{args.size}, 1 image, "
          f"median of {args.repeats} interleaved rounds; torch threads {torch.get_num_threads()}; "
          f"ratios use {args.clock}")
    for cfg in configs:
        spread = f"wall min {min(times[cfg]) * 1e3:.0f} / max {max(times[cfg]) * 1e3:.0f}"
        print(f"  {cfg:<10} wall {med_wall[cfg] * 1e3:7.1f} ms   cpu {med_cpu[cfg] * 1e3:7.1f} ms   "
              f"x{ratio[cfg]:.3f} of base (median of per-round ratios)   ({spread})")
    weight_ms = statistics.median(change) * 1e3
    load_ms = statistics.median(load) * 1e3
    if args.dora:
        print("  DoRA / plain LoRA, same rounds (time ratio): "
              + ", ".join(f"{n} x{statistics.median(t / b for t, b in zip(src[f'{n.split()[0]} DoRA {n.split()[1]}'], src[n])):.3f}"
                          for n in ("1 unfused", "3 unfused", "3 fused"))
              + f"; load one file x{statistics.median(load_dora) / statistics.median(load):.2f} "
                f"({statistics.median(load_dora) * 1e3:.1f} ms)")
    print(f"  change the weights of the 3-adapter stack: {weight_ms:.1f} ms (median of {len(change)})")
    print(f"  change the selection (3 <-> 2 adapters): {statistics.median(select) * 1e3:.1f} ms "
          f"(median of {len(select)})")
    print(f"  load one adapter file ({size_mb:.2f} MB): {load_ms:.1f} ms (median of {len(load)})")
    if pub_change:
        print(f"  diffusers' public path: change the weights (set_adapters) {statistics.median(pub_change) * 1e3:.1f} ms, "
              f"load one file (load_lora_weights) {statistics.median(pub_load) * 1e3:.1f} ms")
        print(f"  ours against diffusers' public path (time ratio, below 1: ours faster): 3 unfused "
              f"x{ratio['3 unfused'] / ratio['diffusers 3 unfused']:.3f}, 3 fused x{ratio['3 fused'] / ratio['diffusers 3 fused']:.3f}, "
              f"weight change x{statistics.median(change) / statistics.median(pub_change):.3f}, "
              f"load x{statistics.median(load) / statistics.median(pub_load):.3f}")
    goals = {
        "fused within 3% of base": ratio["3 fused"] <= 1.03,
        "3 unfused <= 1.25x base": ratio["3 unfused"] <= 1.25,
        "weight change < 50 ms": weight_ms < 50,
        "load < 200 ms": load_ms < 200,
    }
    print("  goals: " + ", ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in goals.items()))
    print(f"fused_ratio={ratio['3 fused']:.2f} unfused3_ratio={ratio['3 unfused']:.2f} "
          f"weight_change_ms={weight_ms:.0f} load_ms={load_ms:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
