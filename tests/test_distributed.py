"""Multi-process training with accelerate (2 gloo processes on the CPU) equals one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from pipelines.weights_io import load_safetensors
from training.config import TrainConfig
from training.trainer import train

ROOT = Path(__file__).resolve().parent.parent


COMMON = dict(max_steps=4, checkpoint_every=2, rank=4, seed=3, device="cpu", name="dist", sample_steps=2,
              train_text_encoder=True, lr_unet=2e-3, lr_text=1e-3)


def _launch(star_images, base, lib, *extra):
    cmd = [sys.executable, "-m", "app.cli", "train", "--images", str(star_images), "--base", str(base),
           "--output-dir", str(lib), "--num-processes", "2", "--batch-size", "1", "--steps", "4",
           "--checkpoint-every", "2", "--rank", "4", "--seed", "3", "--device", "cpu", "--name", "dist",
           "--sample-steps", "2", "--train-text-encoder", "--lr-unet", "2e-3", "--lr-text", "1e-3", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _assert_same(a_path, b_path):
    a, _ = load_safetensors(a_path)
    b, _ = load_safetensors(b_path)
    assert a.keys() == b.keys()
    assert any(k.startswith("lora_te_") for k in a) and any(k.startswith("lora_unet_") for k in a)
    moved = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
        moved += bool("lora_up" in k and a[k].abs().max() > 0)
    assert moved > 0  # the runs trained something, so agreeing means something


def test_two_processes_with_batch_1_equal_one_process_with_batch_2(star_images, tiny_sd1_dir, tmp_path):
    ref = train(TrainConfig(images=str(star_images), base=str(tiny_sd1_dir), output_dir=str(tmp_path / "one"),
                            batch_size=2, **COMMON))
    lib = tmp_path / "two"
    _launch(star_images, tiny_sd1_dir, lib)
    _assert_same(ref.adapter_path, lib / "dist.safetensors")
    run = lib / "runs" / "dist"
    # only the main process writes: one log line per step, one checkpoint, one final sample set
    assert (run / "log.csv").read_text().count("\n") == 1 + 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert len(list((run / "samples").glob("*.png"))) == 1
    assert sorted(p.name for p in lib.glob("dist*")) == ["dist.json", "dist.md", "dist.png", "dist.safetensors",
                                                        "dist.toml"]

    # resume works the same with two processes: from the step-2 checkpoint to the same end
    (lib / "dist.safetensors").unlink()
    _launch(star_images, tiny_sd1_dir, lib, "--resume", "latest")
    _assert_same(ref.adapter_path, lib / "dist.safetensors")


def test_num_processes_must_be_positive(star_images, tiny_sd1_dir, tmp_path, capsys):
    from app.cli import main

    rc = main(["train", "--images", str(star_images), "--base", str(tiny_sd1_dir), "--num-processes", "0",
               "--output-dir", str(tmp_path)])
    assert rc != 0
    assert "--num-processes" in capsys.readouterr().err


def test_pivotal_tuning_with_two_processes_equals_one(star_images, tiny_sd1_dir, tmp_path):
    """The trigger's vectors are averaged over processes like the LoRA's: two processes give the same file."""
    ref = train(TrainConfig(images=str(star_images), base=str(tiny_sd1_dir), output_dir=str(tmp_path / "one"),
                            batch_size=2, pivotal=True, lr_ti=5e-2, **COMMON))
    lib = tmp_path / "two"
    _launch(star_images, tiny_sd1_dir, lib, "--pivotal", "--lr-ti", "5e-2")
    _assert_same(ref.adapter_path, lib / "dist.safetensors")
    a, _ = load_safetensors(ref.adapter_path)
    assert a["bundle_emb.sks.string_to_param.*"].shape[0] == 2
