"""The `lora-studio` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from PIL import Image

from app.cli import main
from pipelines.generation import parse_parameters


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True, check=True)
    assert "generate" in out.stdout


def test_generate_writes_png_with_parameters(tiny_sd1_dir, tmp_path, capsys):
    out = tmp_path / "circle.png"
    rc = main(["generate", "--base", str(tiny_sd1_dir), "--prompt", "a red circle", "--steps", "3", "--seed", "9",
               "--scheduler", "ddim", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    with Image.open(out) as im:
        p = parse_parameters(im.info["parameters"])
    assert p["Seed"] == "9" and p["Sampler"] == "DDIM" and p["Prompt"] == "a red circle"


def test_generate_missing_base_is_a_clear_error(tmp_path, capsys):
    rc = main(["generate", "--base", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert rc == 2
    assert "missing" in capsys.readouterr().err


def test_commands_print_no_library_noise(tmp_path):
    """diffusers imports torchao (an optional extra) at start-up, which logs each CUDA kernel it cannot load
    on this machine; a user running a command sees only what the command says."""
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "LORA_STUDIO_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "app.cli", "loras"], capture_output=True, text=True, cwd=root,
                         env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("no adapters in")
    assert out.stderr == ""
