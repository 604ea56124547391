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
