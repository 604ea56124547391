"""A small classifier that scores whether generated toy-world images show what their prompt asked.

The toy base model's world is procedural (`training/toy_world.py`), so its ground truth can be drawn
on demand. This module trains a small CNN with four heads (foreground colour, shape, background
colour, style) on freshly drawn images of the whole world, including the concept (star) and the
style (outline) the base model never saw, with augmentations (blur, noise, colour jitter,
brightness) that make it robust to the softness and colour drift of generated images.
`score()` then reports, for images generated from prompts, the share whose colour, shape and
background match what the prompt asked for.

    python -m training.evaluator          # train, save sample_data/evaluator.safetensors, report
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from pipelines.errors import CorruptWeightsError
from pipelines.weights_io import load_safetensors, save_safetensors

from . import toy_world as tw

ROOT = Path(__file__).resolve().parent.parent
# the toy world's evaluator; world v2 (LORA_STUDIO_TOY_WORLD=v2: more base shapes) has its own
DEFAULT_PATH = ROOT / "sample_data" / ("evaluator.safetensors" if tw.WORLD == "v1" else f"evaluator-{tw.WORLD}.safetensors")
FORMAT = "lora-studio-toy-evaluator"
FORMAT_VERSION = "1"

# head name -> the labels it predicts, in index order
HEADS: dict[str, list[str]] = {
    "color": list(tw.FG_COLORS),
    "shape": list(tw.SHAPES),
    "background": list(tw.BG_COLORS),
    "style": list(tw.STYLES),
}
PROMPT_FIELDS = ("color", "shape", "background")  # what toy_world.parse_caption can read
WIDTHS = (24, 32, 64, 64)
DEFAULT_STEPS = 800
DEFAULT_POOL = 6000
DEFAULT_EVAL_SEED = 1_000_003  # never used for training data


class EvaluatorNet(nn.Module):
    """Four strided conv blocks, global average + max pooling, one linear head per attribute."""

    def __init__(self, widths: Sequence[int] = WIDTHS, heads: dict[str, list[str]] = HEADS) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        self.labels = {k: list(v) for k, v in heads.items()}
        layers: list[nn.Module] = []
        c_in = 3
        for i, w in enumerate(self.widths):
            stride = 2 if i < 3 else 1  # 64 -> 32 -> 16 -> 8 -> 8
            layers += [nn.Conv2d(c_in, w, 3, stride, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(2 * c_in, len(v)) for k, v in self.labels.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # x: (B, 3, 64, 64) in [0, 1]
        h = self.features((x - 0.5) / 0.25)  # (B, C, 8, 8)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 2C)
        return {k: head(pooled) for k, head in self.heads.items()}


# ---------------------------------------------------------------- ground truth


def sample_ground_truth(rng: random.Random) -> tw.ShapeSpec:
    """One spec from the whole world: every shape (incl. the concept) and both styles."""
    return tw.sample_spec(rng, shapes=tw.SHAPES, style=rng.choice(tw.STYLES))


def draw_dataset(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Draw n ground-truth images: (uint8 images (n, 3, 64, 64), {head: int64 labels (n,)})."""
    rng = random.Random(seed)
    specs = [sample_ground_truth(rng) for _ in range(n)]
    imgs = np.stack([np.asarray(tw.draw(s), dtype=np.uint8) for s in specs])  # (n, 64, 64, 3)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()  # (n, 3, 64, 64)
    labels = {k: torch.tensor([v.index(getattr(s, k)) for s in specs]) for k, v in HEADS.items()}
    return x, labels


# ---------------------------------------------------------------- augmentation


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample separable gaussian blur; x (B, 3, H, W), sigma (B,) in pixels (0 = none)."""
    b, c, h, w = x.shape
    r = 2
    t = torch.arange(-r, r + 1, dtype=x.dtype)  # (5,)
    s = sigma.clamp_min(1e-3)[:, None]  # (B, 1)
    k = torch.exp(-0.5 * (t[None, :] / s) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (B, 5)
    k = k.repeat_interleave(c, dim=0)  # (B*3, 5)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)  # horizontal
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)  # vertical
    return y.reshape(b, c, h, w)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Make clean drawings look like generated ones: blur, colour/brightness drift, noise, flips.

    x: (B, 3, H, W) float in [0, 1]. Colour jitter is kept well below the distance between any
    two palette colours, so the colour labels stay true.
    """
    b = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, *shape, generator=g)

    flip = torch.rand(b, generator=g) < 0.5  # every shape is left-right symmetric
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    blurred = torch.rand(b, generator=g) < 0.7
    x = _blur(x, torch.where(blurred, u(0.3, 1.2), torch.zeros(b)))
    x = x * u(0.92, 1.08, 3, 1, 1) + u(-0.04, 0.04, 3, 1, 1)  # per-channel colour jitter
    x = x + u(-0.07, 0.07, 1, 1, 1)  # brightness
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(0.9, 1.1, 1, 1, 1) + mean  # contrast
    x = x + torch.randn(x.shape, generator=g) * u(0.0, 0.05, 1, 1, 1)  # noise
    return x.clamp(0.0, 1.0)


# ---------------------------------------------------------------- training


def train_evaluator(
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int = 64,
    pool_size: int = DEFAULT_POOL,
    lr: float = 3e-3,
    on_progress: Callable[[int, int, float], None] | None = None,
) -> EvaluatorNet:
    """Train the evaluator on a freshly drawn, augmented pool of ground truth (deterministic)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = draw_dataset(pool_size, seed)
    model = EvaluatorNet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, pool_size, (batch_size,), generator=g)
        x = augment(images[idx].float() / 255.0, g)  # (B, 3, 64, 64)
        out = model(x)
        loss = sum(F.cross_entropy(out[k], labels[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_progress is not None and (step % 100 == 0 or step == steps):
            on_progress(step, steps, float(loss.detach()))
    model.eval()
    return model


# ---------------------------------------------------------------- inference


def _to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    res = tw.RESOLUTION
    arrs = []
    for im in images:
        im = getattr(im, "image", im)  # accept pipelines.generation.GeneratedImage too
        im = im.convert("RGB")
        if im.size != (res, res):
            im = im.resize((res, res), Image.LANCZOS)
        arrs.append(np.asarray(im, dtype=np.uint8))
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)  # (B, 3, 64, 64)
    return x.float() / 255.0


@torch.no_grad()
def _predict(model: EvaluatorNet, x: torch.Tensor, chunk: int = 256) -> dict[str, torch.Tensor]:
    """Predicted label indices per head for x (N, 3, 64, 64) in [0, 1]."""
    model.eval()
    preds: dict[str, list[torch.Tensor]] = {k: [] for k in model.labels}
    for i in range(0, x.shape[0], chunk):
        out = model(x[i : i + chunk])
        for k in preds:
            preds[k].append(out[k].argmax(dim=1))
    return {k: torch.cat(v) for k, v in preds.items()}


def classify(model: EvaluatorNet, images: Sequence[Image.Image]) -> list[dict[str, str]]:
    """Predicted {"color", "shape", "background", "style"} labels for each image."""
    if len(images) == 0:
        return []
    preds = _predict(model, _to_tensor(images))
    return [{k: model.labels[k][int(preds[k][i])] for k in model.labels} for i in range(len(images))]


def score(model: EvaluatorNet, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict:
    """Share of images that show what their prompt asked for.

    For each of colour, shape and background: the share of images whose prediction matches, over
    the images whose prompt names that field (None when no prompt does). "all": the share whose
    every named field matches. Also returns "n" and the per-image "predictions".
    """
    if len(images) != len(prompts):
        raise ValueError(f"score: {len(images)} images but {len(prompts)} prompts")
    preds = classify(model, images)
    hits = {k: 0 for k in PROMPT_FIELDS}
    asked = {k: 0 for k in PROMPT_FIELDS}
    all_ok = 0
    for pred, prompt in zip(preds, prompts):
        want = tw.parse_caption(prompt)
        ok = True
        for k in PROMPT_FIELDS:
            if want[k] is None:
                continue
            asked[k] += 1
            if pred[k] == want[k]:
                hits[k] += 1
            else:
                ok = False
        all_ok += ok
    n = len(images)
    result: dict = {k: (hits[k] / asked[k] if asked[k] else None) for k in PROMPT_FIELDS}
    result["all"] = all_ok / n if n else None
    result["n"] = n
    result["predictions"] = preds
    return result


def evaluate_accuracy(
    model: EvaluatorNet, n: int = 2000, seed: int = DEFAULT_EVAL_SEED, augmented: bool = False
) -> dict[str, float]:
    """Per-head accuracy on n fresh ground-truth drawings (optionally augmented)."""
    x, labels = draw_dataset(n, seed)
    xf = x.float() / 255.0
    if augmented:
        xf = augment(xf, torch.Generator().manual_seed(seed))
    preds = _predict(model, xf)
    return {k: float((preds[k] == labels[k]).float().mean()) for k in model.labels}


# ---------------------------------------------------------------- weights


def save_evaluator(model: EvaluatorNet, path: str | Path = DEFAULT_PATH, info: dict | None = None) -> Path:
    """Write the weights (safetensors, atomically) with the labels and architecture as metadata."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "widths": json.dumps(list(model.widths)),
        "labels": json.dumps(model.labels),
    }
    for k, v in (info or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return save_safetensors(model.state_dict(), path, meta)


def load_evaluator(path: str | Path = DEFAULT_PATH, train_if_missing: bool = True) -> EvaluatorNet:
    """Load the evaluator; if the file is missing, train it and save it there first."""
    path = Path(path)
    if not path.is_file() and train_if_missing:
        model = train_evaluator()
        save_evaluator(model, path, {"accuracy": evaluate_accuracy(model)})
        return model
    sd, meta = load_safetensors(path)
    if meta.get("format") != FORMAT:
        raise CorruptWeightsError(f"{path}: not a LoRA Studio evaluator file (format={meta.get('format')!r})")
    try:
        widths = json.loads(meta["widths"])
        labels = json.loads(meta["labels"])
    except (KeyError, json.JSONDecodeError):
        raise CorruptWeightsError(f"{path}: evaluator metadata lacks 'widths' or 'labels'") from None
    if labels != HEADS:
        raise CorruptWeightsError(
            f"{path}: evaluator was trained on other labels than the current toy world; "
            "retrain it with `python -m training.evaluator`"
        )
    model = EvaluatorNet(widths, labels)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CorruptWeightsError(f"{path}: evaluator weights do not fit its architecture ({e})") from None
    model.eval()
    return model


# ---------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.evaluator", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=DEFAULT_POOL, help="ground-truth images drawn for training")
    p.add_argument("--out", type=Path, default=DEFAULT_PATH)
    p.add_argument("--eval-n", type=int, default=2000)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()

    def report(step: int, total: int, loss: float) -> None:
        print(f"step {step}/{total} loss {loss:.4f} ({time.time() - t0:.0f}s)", flush=True)

    model = train_evaluator(steps=args.steps, seed=args.seed, pool_size=args.pool, on_progress=report)
    train_s = time.time() - t0
    acc = evaluate_accuracy(model, n=args.eval_n)
    acc_aug = evaluate_accuracy(model, n=args.eval_n, augmented=True)
    path = save_evaluator(
        model, args.out,
        {"steps": args.steps, "seed": args.seed, "pool": args.pool, "accuracy": acc, "accuracy_augmented": acc_aug},
    )
    print(f"trained in {train_s:.0f}s; saved {path} ({path.stat().st_size / 1024:.0f} KiB)")
    print("augmented: " + " ".join(f"{k}={v:.4f}" for k, v in acc_aug.items()))
    print("accuracy on fresh ground truth: " + " ".join(f"{k}={v:.4f}" for k, v in acc.items()))
    worst = min(acc.values())
    return 0 if worst >= 0.97 else 1


if __name__ == "__main__":
    raise SystemExit(main())
