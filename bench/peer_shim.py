"""Runs one of diffusers' DreamBooth LoRA example scripts here: `python bench/peer_shim.py SCRIPT [ARGS...]`.

The examples import torchvision for five PIL transforms, and PyPI's torchvision does not import beside
this machine's CPU build of torch. This puts a small stand-in module in its place (the same PIL operations
torchvision applies to PIL images: resize of the shorter side, centre/random crop, flip, to-tensor,
normalize), tells transformers that torchvision is absent (so it does not import the rest of it), and
runs the script as `__main__`. Nothing of the script is changed; step for step it does the same work.
Where peft is older than transformers 5's `add_adapter` demands (PyPI's newest is), the text encoder's
adapter goes in through peft's own `inject_adapter_in_model`, as `add_adapter` itself would do. With
$LORA_STUDIO_BENCH_PEAK set, the peak RSS when training ends is written there (see record_peak_at_save).
"""

from __future__ import annotations

import enum
import random
import runpy
import sys
import types

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "box": Image.BOX,
        "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class Compose:
    def __init__(self, ts):
        self.ts = ts

    def __call__(self, x):
        for t in self.ts:
            x = t(x)
        return x


class Resize:
    """An int size: the shorter side to it, as torchvision does for PIL images."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
        self.size, self.interp = size, _PIL[interpolation.value]

    def __call__(self, img):
        w, h = img.size
        if isinstance(self.size, int):
            ow, oh = (self.size, int(self.size * h / w)) if w <= h else (int(self.size * w / h), self.size)
        else:
            oh, ow = self.size
        return img.resize((ow, oh), self.interp)


def crop(img, top, left, height, width):
    return img.crop((left, top, left + width, top + height))


class CenterCrop:
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, img):
        (th, tw), (w, h) = self.size, img.size
        return crop(img, int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)), th, tw)


class RandomCrop:
    def __init__(self, size):
        self.size = _pair(size)

    @staticmethod
    def get_params(img, output_size):
        (w, h), (th, tw) = img.size, output_size
        return random.randint(0, h - th), random.randint(0, w - tw), th, tw

    def __call__(self, img):
        return crop(img, *self.get_params(img, self.size))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        return img.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < self.p else img


class ToTensor:
    def __call__(self, img):
        return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div(255)  # (C, H, W)


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, t):
        mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
        return (t - mean) / std


def peak_kb() -> str:
    """This process's peak resident set, kB (VmHWM), as the text written to $LORA_STUDIO_BENCH_PEAK."""
    with open("/proc/self/status") as f:
        return next(line.split()[1] for line in f if line.startswith("VmHWM:"))


def record_peak_at_save() -> None:
    """With $LORA_STUDIO_BENCH_PEAK set: write this process's peak RSS (kB) to that file when the script saves
    its LoRA weights, i.e. when training ends (the examples then load a second pipeline for a final inference)."""
    import os

    path = os.environ.get("LORA_STUDIO_BENCH_PEAK")
    if not path:
        return
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    for cls in (StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin):
        original = cls.__dict__["save_lora_weights"].__func__

        def save(c, *a, _original=original, **k):
            if not os.path.exists(path) or not open(path).read().strip():
                with open(path, "w") as f:
                    f.write(peak_kb())
            return _original(c, *a, **k)

        cls.save_lora_weights = classmethod(save)


def install() -> None:
    import diffusers  # noqa: F401  (its own check runs now, and finds no torchvision)
    import transformers.utils
    import transformers.utils.import_utils as iu

    record_peak_at_save()
    try:
        import torchvision  # noqa: F401
        has_torchvision = True
    except Exception:  # noqa: BLE001 - absent, or PyPI's build that fails to import beside this torch
        has_torchvision = False
    if not has_torchvision:
        _stand_in(iu)
    _text_encoder_adapter()


def _stand_in(iu) -> None:
    """torchvision's place taken by the classes above; transformers told it is absent."""
    original = iu.is_torchvision_available
    for mod in list(sys.modules.values()):  # every module that imported the check by name
        if getattr(mod, "__name__", "").startswith("transformers") and getattr(mod, "is_torchvision_available", None) is original:
            mod.is_torchvision_available = lambda: False
    tv = types.ModuleType("torchvision")
    tr = types.ModuleType("torchvision.transforms")
    fn = types.ModuleType("torchvision.transforms.functional")
    for name in ("InterpolationMode", "Compose", "Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip",
                 "ToTensor", "Normalize"):
        setattr(tr, name, globals()[name])
    fn.crop = crop
    tr.functional, tv.transforms, tv.__version__ = fn, tr, "0.0+lora-studio-bench-stand-in"
    sys.modules.update({"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": fn})


def _text_encoder_adapter() -> None:
    # transformers 5's add_adapter insists on a peft newer than PyPI's newest (0.21): the text encoder's LoRA
    # goes in with peft's own injection instead, which is what add_adapter does once its version check passes
    import peft
    from packaging.version import Version
    from peft import inject_adapter_in_model
    from transformers import PreTrainedModel
    from transformers.integrations.peft import MIN_PEFT_VERSION

    if Version(peft.__version__) >= Version(MIN_PEFT_VERSION):
        return

    def add_adapter(self, adapter_config, adapter_name="default"):
        inject_adapter_in_model(adapter_config, self, adapter_name=adapter_name)
        self.peft_config = {**(getattr(self, "peft_config", None) or {}), adapter_name: adapter_config}
        self._hf_peft_config_loaded = True

    PreTrainedModel.add_adapter = add_adapter


if __name__ == "__main__":
    install()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
