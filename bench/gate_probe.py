"""Does the adapter's cost come from the noise levels it acts at? (issue #14; a probe, not an app option)

    python bench/gate_probe.py --gate 400 style --set max_timestep=400 [any bench/quality.py option]

Runs `bench/quality.py` unchanged, except that while images are generated with the trained adapter
attached, the adapter is switched on only for the UNet calls whose timestep is below `--gate` (the
sampler's last, low-noise steps) and off for the others. `--set max_timestep=N` (the trainer's own
option, kohya's --max_timestep) trains the adapter on timesteps below N only. Images without the adapter
(the base's own scores) are unaffected. Last line: quality.py's `fidelity=… preservation_drop=… minutes=…`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality  # noqa: E402


def gated(generate, cut: int):
    """`generate_for_prompts` with the base's peft adapters on only for UNet calls at timesteps < cut."""

    def run(base, prompts, args, cross_attention_kwargs=None, **kw):
        unet = base.pipe.unet
        handle = None
        if getattr(unet, "peft_config", None):
            def hook(module, args_, kwargs):
                t = kwargs.get("timestep", args_[1] if len(args_) > 1 else None)
                t = float(t.flatten()[0]) if torch.is_tensor(t) else float(t)
                (module.enable_adapters if t < cut else module.disable_adapters)()

            handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            return generate(base, prompts, args, cross_attention_kwargs, **kw)
        finally:
            if handle is not None:
                handle.remove()
                unet.enable_adapters()

    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    p.add_argument("--gate", type=int, required=True, help="adapter on only at timesteps below this (1000: always)")
    ours, rest = p.parse_known_args(argv)
    print(f"gate: the adapter acts at timesteps below {ours.gate}", flush=True)
    quality.generate_for_prompts = gated(quality.generate_for_prompts, ours.gate)
    return quality.main(rest)


if __name__ == "__main__":
    sys.exit(main())
