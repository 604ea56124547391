"""The samplers by AUTOMATIC1111's names and the diffusers scheduler each one is (no torch import: the training
config's sampler choices come from here)."""

from __future__ import annotations

import re

from .errors import ConfigError

# A1111 sampler name -> (diffusers scheduler class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ SDE Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": True}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    # the few-step LoRAs' samplers: LCM-LoRA's (A1111's and ComfyUI's "LCM"); SDXL-Lightning's Euler with
    # A1111's "SGM Uniform" schedule (diffusers' trailing timesteps, as its model card gives it); TCD-LoRA's and
    # Hyper-SD's TCD
    "LCM": ("LCMScheduler", {}),
    "Euler SGM Uniform": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}),
    "DPM++ 2M SGM Uniform": ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    "TCD": ("TCDScheduler", {}),
}
_SCHEDULER_ALIASES = {re.sub(r"[^a-z0-9]", "", k.lower()): k for k in SCHEDULERS}
_SCHEDULER_ALIASES.update({"eulerancestral": "Euler a", "dpmpp2mkarras": "DPM++ 2M Karras", "dpmpp2m": "DPM++ 2M"})


def scheduler_name(name: str) -> str:
    """Canonical A1111 sampler name for a user-typed one ('euler_a', 'dpm++ 2m karras', ...)."""
    key = re.sub(r"[^a-z0-9]", "", name.lower().replace("+", "p"))
    canon = _SCHEDULER_ALIASES.get(key) or _SCHEDULER_ALIASES.get(re.sub(r"[^a-z0-9]", "", name.lower()))
    if canon is None:
        raise ConfigError(f"scheduler: unknown '{name}'; choose one of: {', '.join(SCHEDULERS)}")
    return canon
