"""AUTOMATIC1111's Interrupt: generation stops after the current sampler step and keeps its images."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from pipelines.generation import GenerationRequest, generate, set_scheduler


@pytest.fixture(scope="module")
def toy(toy_base_dir):
    from pipelines.base_models import load_base

    return load_base(toy_base_dir, device="cpu")


def _calls(model):
    """Counts the UNet's calls; `remove()` the returned handle afterwards."""
    calls = []
    handle = model.pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


def test_an_interrupted_generation_stops_and_decodes_what_it_has(toy):
    req = GenerationRequest(prompt="a red circle on a white background", steps=10, seed=2, scheduler="Euler",
                            num_images=2)
    caught = {}

    def keep(p, i, t, kw):  # the pipeline's latents after 3 steps, as an independent reference
        if i == 2:
            caught["latents"] = kw["latents"].clone()
        return kw

    set_scheduler(toy.pipe, "Euler")
    with torch.inference_mode():
        toy.pipe(prompt=req.prompt, num_inference_steps=10, guidance_scale=req.guidance, num_images_per_prompt=2,
                 generator=[torch.Generator().manual_seed(s) for s in (2, 3)], callback_on_step_end=keep,
                 callback_on_step_end_tensor_inputs=["latents"], output_type="latent")
    calls, handle = _calls(toy)
    done = []
    try:
        images = generate(toy, req, on_progress=lambda d, n: done.append(d), interrupt=lambda: len(done) >= 3)
    finally:
        handle.remove()
    assert len(calls) == 3 and len(images) == 2 and all(img.interrupted == 3 for img in images)
    with torch.inference_mode():
        want = toy.pipe.image_processor.postprocess(
            toy.pipe.vae.decode(caught["latents"] / toy.pipe.vae.config.scaling_factor, return_dict=False)[0],
            output_type="pil")
    for got, ref in zip(images, want):  # the pictures as far as they got, not a finished one
        assert np.abs(np.asarray(got.image, dtype=np.int16) - np.asarray(ref, dtype=np.int16)).max() <= 1
    full = generate(toy, req)
    assert full[0].interrupted is None
    assert np.abs(np.asarray(full[0].image, dtype=np.int16) - np.asarray(images[0].image, dtype=np.int16)).mean() > 3


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_an_interrupt_in_the_first_pass_skips_the_hires_pass(toy, upscaler):
    req = GenerationRequest(prompt="a blue square", steps=6, seed=1, hires_scale=2, hires_steps=4,
                            hires_upscaler=upscaler)
    calls, handle = _calls(toy)
    try:
        images = generate(toy, req, interrupt=lambda: len(calls) >= 2)
    finally:
        handle.remove()
    assert len(calls) == 2 and images[0].interrupted == 2 and images[0].image.size == (64, 64)


def test_the_apps_interrupt_stops_the_running_generate_and_the_requests_after_it(tmp_path, toy_base_dir):
    from app.studio import Studio
    from training.jobs import JobQueue

    studio = Studio(home=tmp_path / "home", base=str(toy_base_dir), queue=JobQueue(worker=False), device="cpu")
    studio.interrupt_generation()  # pressed while nothing runs: the next Generate is not affected
    res = studio.generate(None, GenerationRequest(prompt="a red circle", steps=4, seed=1))
    assert res.interrupted is None and res.images[0].interrupted is None
    model = studio.model(None).base
    calls, handle = _calls(model)
    started = threading.Event()
    model.pipe.unet.register_forward_pre_hook(lambda *a: started.set())
    presser = threading.Thread(target=lambda: started.wait(60) and studio.interrupt_generation())
    presser.start()
    try:
        # three prompts drawn in turn (every combination), 200 steps each: the first is cut short, the rest skipped
        res = studio.generate(None, GenerationRequest(prompt="a {red|green|blue} circle", steps=200, seed=1,
                                                      num_images=3), combinatorial=True)
    finally:
        presser.join()
        handle.remove()
        model.pipe.unet._forward_pre_hooks.clear()
    assert len(res.images) == 1 and res.images[0].interrupted < 200 and len(calls) < 200
    assert res.interrupted.startswith(f"interrupted after {res.images[0].interrupted} of 200 sampler steps")
    assert res.interrupted.endswith("2 more were not started") and res.paths[0].is_file()


def test_interrupt_stops_a_comparison_grid_and_leaves_the_rest_blank(tmp_path, toy_base_dir):
    """The Generate tab's Interrupt acts on its Compare grid too: the tile being drawn stops, the tiles after it
    stay blank, and the page's status line and the grid's parameters say how far it got."""
    from app.studio import Studio
    from app.ui import StudioUI
    from pipelines.generation import parse_parameters, read_png_parameters
    from pipelines.grid import UNDRAWN
    from training.jobs import JobQueue

    studio = Studio(home=tmp_path / "home", base=str(toy_base_dir), queue=JobQueue(worker=False), device="cpu")
    model = studio.model(None).base
    started = threading.Event()
    handle = model.pipe.unet.register_forward_pre_hook(lambda *a: started.set())
    presser = threading.Thread(target=lambda: started.wait(60) and studio.interrupt_generation())
    presser.start()
    ui = StudioUI(studio)
    form = (None, "a red circle", "", 200, 7.0, 3, 0, 0, 1, "Euler", 1, 1.0, 0, "Latent", 0.7, None, 0.75, 4, None)
    slots = (None, True, 1.0, False, 1.0, False, 0, 0) * 4
    try:
        grid, _, _, status = ui.compare_shown("CFG scales", *form, None, "3, 5, 7", None, "none", "", False, 0,
                                              False, "none", "", *slots)
    finally:
        presser.join()
        handle.remove()
    p = parse_parameters(read_png_parameters(grid))
    assert p["Grid interrupted"] == "1 of 3 tiles drawn" and "1 of 3 tiles drawn" in status
    from PIL import Image

    img = np.asarray(Image.open(grid).convert("RGB"))
    assert (img == np.array(UNDRAWN, dtype=np.uint8)).all(axis=-1).sum() > 2 * 64 * 64  # two blank tiles at least
    # the next grid is not affected by the Interrupt before it
    grid, _, _, status = ui.compare_shown("CFG scales", *(form[:3] + (2,) + form[4:]), None, "3, 5", None, "none",
                                          "", False, 0, False, "none", "", *slots)
    assert status == "" and "Grid interrupted" not in read_png_parameters(grid)
