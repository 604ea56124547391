"""AUTOMATIC1111's Tiling: pictures that wrap around their edges (seamless textures)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.generation import GenerationRequest, generate, read_png_parameters, set_scheduler, tiled
from pipelines.recall import recall

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def toy(toy_base_dir):
    from pipelines.base_models import load_base

    return load_base(toy_base_dir, device="cpu")


def test_tiling_puts_the_picture_on_a_torus(toy):
    """With Tiling the whole model (UNet and VAE) is shift-equivariant around the edges: starting noise rolled
    by k latent pixels gives the picture rolled by k times the VAE's factor, to the pixel. Without it, not."""
    pipe = toy.pipe
    set_scheduler(pipe, "Euler")
    f = pipe.vae_scale_factor
    noise = torch.randn(1, 4, 64 // f, 64 // f, generator=torch.Generator().manual_seed(0))

    def draw(latents, on):
        with torch.inference_mode(), tiled(pipe, on):
            out = pipe(prompt=PROMPT, num_inference_steps=6, latents=latents.clone(), output_type="pil")
        return np.asarray(out.images[0], dtype=np.int16)

    for on, close in ((True, True), (False, False)):
        a, b = draw(noise, on), draw(torch.roll(noise, shifts=(4, 8), dims=(2, 3)), on)
        diff = np.abs(np.roll(a, (4 * f, 8 * f), axis=(0, 1)) - b).max()
        assert (diff <= 1) == close, (on, diff)
    convs = [m for part in (pipe.unet, pipe.vae) for m in part.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {m.padding_mode for m in convs} == {"zeros"}  # put back after the block


def test_tiling_is_recorded_read_back_and_wraps_the_edges(toy, tmp_path):
    def pixels(tiling):
        img = generate(toy, GenerationRequest(prompt=PROMPT, steps=8, seed=3, tiling=tiling))[0]
        return img, np.asarray(img.image, dtype=np.int16)

    tiled_img, x = pixels(True)
    _, y = pixels(False)
    assert "Tiling: True" in tiled_img.parameters and recall(tiled_img.parameters).request.tiling
    assert not recall(tiled_img.parameters.replace(", Tiling: True", "")).request.tiling

    def seam(a):  # the step across the left/right edge against the steps between neighbouring columns
        return np.abs(a[:, 0] - a[:, -1]).mean() / np.abs(a[:, 1:] - a[:, :-1]).mean()

    assert seam(x) < 1.0 < 1.5 < seam(y)


def test_cli_and_app_take_tiling_and_make_it_again(toy_base_dir, tmp_path, monkeypatch):
    from app.cli import main
    from app.studio import Studio
    from app.ui import StudioUI

    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "home"))
    out = tmp_path / "t.png"
    assert main(["generate", "--base", str(toy_base_dir), "--device", "cpu", "--prompt", PROMPT, "--steps", "6",
                 "--seed", "5", "--tiling", "--out", str(out)]) == 0
    assert "Tiling: True" in read_png_parameters(out)
    again = tmp_path / "again.png"
    assert main(["generate", "--base", str(toy_base_dir), "--device", "cpu", "--from-png", str(out),
                 "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    ui = StudioUI(Studio(home=tmp_path / "home", base=str(toy_base_dir), device="cpu"))
    form = (PROMPT, "", 6, 7.0, 5, 0, 0, 1, "DPM++ 2M Karras", 1, 1.0, 0, "Latent", 0.7, None, 0.75, 4, None, False)
    slots = (None, True, 1.0, False, 1.0, False, 0, 0) * 4
    *_, paths, warn, info = ui.generate_event(ui.base_names()[0], *form, False, False, -1, 0, True, 0, False, 0,
                                                   *slots)
    text = read_png_parameters(paths[0])
    assert "Tiling: True" in text
    assert np.array_equal(np.asarray(Image.open(paths[0])), np.asarray(Image.open(out)))  # the CLI's picture
    assert ui.recall_form(text, ui.base_names()[0])[-5] is True  # the box is ticked again
