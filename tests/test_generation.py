"""Generation: seeds, sizes, schedulers, and the A1111 `parameters` PNG chunk."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.base_models import load_base
from pipelines.errors import ConfigError
from pipelines.generation import (
    SCHEDULERS,
    GenerationRequest,
    generate,
    output_paths,
    parse_parameters,
    read_png_parameters,
    request_from_parameters,
    save_png,
    scheduler_name,
)


@pytest.fixture(scope="module")
def tiny(tiny_sd1_dir):
    return load_base(tiny_sd1_dir, device="cpu")


def _arr(img):
    return np.asarray(img.image if hasattr(img, "image") else img, dtype=np.int16)


def test_same_seed_same_image_and_different_seed_differs(tiny):
    req = dict(prompt="a red circle on a white background", steps=4, seed=11)
    a = generate(tiny, GenerationRequest(**req))[0]
    b = generate(tiny, GenerationRequest(**req))[0]
    c = generate(tiny, GenerationRequest(**{**req, "seed": 12}))[0]
    assert np.array_equal(_arr(a), _arr(b))
    assert np.abs(_arr(a) - _arr(c)).mean() > 1


def test_batch_image_i_equals_single_image_with_seed_plus_i(tiny):
    batch = generate(tiny, GenerationRequest(prompt="a blue square", steps=3, seed=5, num_images=3))
    assert [g.seed for g in batch] == [5, 6, 7]
    single = generate(tiny, GenerationRequest(prompt="a blue square", steps=3, seed=6))[0]
    assert np.abs(_arr(batch[1]) - _arr(single)).max() <= 1


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M Karras", "DDIM"])
def test_schedulers_run_and_are_recorded(tiny, name):
    out = generate(tiny, GenerationRequest(prompt="a circle", steps=3, seed=1, scheduler=name))[0]
    assert f"Sampler: {name}" in out.parameters
    assert out.image.size == (32, 32)


def test_scheduler_aliases():
    assert scheduler_name("euler_a") == "Euler a"
    assert scheduler_name("dpm++ 2m karras") == "DPM++ 2M Karras"
    assert scheduler_name("ddim") == "DDIM"
    with pytest.raises(ConfigError, match="scheduler"):
        scheduler_name("warp-drive")
    assert set(SCHEDULERS) >= {"Euler a", "DPM++ 2M Karras", "DDIM"}


def test_width_height_honoured(tiny):
    out = generate(tiny, GenerationRequest(prompt="x", steps=2, seed=1, width=48, height=32))[0]
    assert out.image.size == (48, 32)


@pytest.mark.parametrize("field,kw", [("steps", {"steps": 0}), ("width", {"width": 30}), ("guidance", {"guidance": -1}),
                                      ("num_images", {"num_images": 0})])
def test_bad_request_names_field(field, kw):
    with pytest.raises(ConfigError, match=field):
        GenerationRequest(prompt="x", **kw)


def test_png_parameters_round_trip_reproduces_image(tiny, tmp_path):
    req = GenerationRequest(prompt="a green triangle, on: a gray background", negative_prompt="blurry, lowres",
                            steps=4, guidance=5.5, seed=123, scheduler="Euler a")
    img = generate(tiny, req)[0]
    path = save_png(img, tmp_path / "x.png")
    text = read_png_parameters(path)
    p = parse_parameters(text)
    assert p["Prompt"] == req.prompt and p["Negative prompt"] == req.negative_prompt
    assert p["Steps"] == "4" and p["Seed"] == "123" and p["CFG scale"] == "5.5" and p["Size"] == "32x32"
    again = generate(tiny, request_from_parameters(text))[0]
    assert np.array_equal(_arr(again), _arr(img))


def test_clip_skip_takes_the_next_to_last_layer_for_both_prompts_and_is_recorded(tiny, tmp_path):
    """AUTOMATIC1111's Clip skip 2: the prompt and the negative prompt both through the text encoder's
    next-to-last layer (then its final norm); recorded in the PNG, so the image can be made again."""
    import torch

    req = GenerationRequest(prompt="a red circle", negative_prompt="blue", steps=3, guidance=5.0, seed=4,
                            scheduler="Euler", clip_skip=2)
    img = generate(tiny, req)[0]
    pipe = tiny.pipe

    def penultimate(text):
        ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            te = pipe.text_encoder
            return getattr(te, "text_model", te).final_layer_norm(hidden)  # transformers 5 has no text_model

    by_hand = pipe(prompt_embeds=penultimate("a red circle"), negative_prompt_embeds=penultimate("blue"),
                   num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(4)).images[0]
    assert np.array_equal(_arr(img), _arr(by_hand))
    last = generate(tiny, GenerationRequest(**{**req.__dict__, "clip_skip": 1}))[0]
    assert np.abs(_arr(img) - _arr(last)).mean() > 0.5  # the layer matters
    assert parse_parameters(img.parameters)["Clip skip"] == "2" and "Clip skip" not in last.parameters
    again = generate(tiny, request_from_parameters(read_png_parameters(save_png(img, tmp_path / "c.png"))))[0]
    assert np.array_equal(_arr(again), _arr(img))
    with pytest.raises(ConfigError, match="clip_skip: .*has 2 layers, so clip skip can be at most 2, got 3"):
        generate(tiny, GenerationRequest(prompt="x", steps=1, clip_skip=3))
    for bad in (0, 13, 1.5):
        with pytest.raises(ConfigError, match="clip_skip: must be a whole number between 1 and 12"):
            GenerationRequest(prompt="x", clip_skip=bad)


def test_clip_skip_on_sdxl_is_refused_and_dropped_from_a1111_parameters(tiny_sdxl_dir):
    from pipelines.recall import for_family, recall

    xl = load_base(tiny_sdxl_dir, device="cpu")
    with pytest.raises(ConfigError, match="clip_skip: SDXL models already take the text encoders' penultimate"):
        generate(xl, GenerationRequest(prompt="x", steps=1, clip_skip=2))
    got = recall("a cat\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 3, Size: 64x64, Clip skip: 2")
    notes: list[str] = []
    fitted = for_family(got.request, xl.family, notes)  # A1111 writes its global setting on SDXL images too
    assert fitted.clip_skip == 1 and "Clip skip 2 is left out" in notes[0]
    assert generate(xl, fitted)[0].image.size == (64, 64)  # made, at the recorded size
    assert for_family(got.request, "sd1", []).clip_skip == 2


def test_parse_a1111_text_with_lora_hashes():
    text = ('masterpiece, <lora:style:0.7> a cat\nNegative prompt: ugly\nSteps: 30, Sampler: DPM++ 2M Karras, '
            'CFG scale: 7, Seed: 42, Size: 512x768, Model hash: abc123, Lora hashes: "style: 0123456789ab"')
    p = parse_parameters(text)
    assert p["Prompt"] == "masterpiece, <lora:style:0.7> a cat"
    assert p["Negative prompt"] == "ugly"
    assert p["Lora hashes"] == "style: 0123456789ab"
    assert p["Size"] == "512x768"


def test_output_paths():
    assert [p.name for p in output_paths("c.png", 1)] == ["c.png"]
    assert [p.name for p in output_paths("c.png", 2)] == ["c-0.png", "c-1.png"]


def test_toy_model_draws_in_seconds(toy_base):
    out = generate(toy_base, GenerationRequest(prompt="a red circle on a white background", steps=20, seed=0))
    arr = np.asarray(out[0].image).astype(float)
    assert out[0].image.size == (64, 64)
    assert arr.std() > 10  # a picture, not a flat field
