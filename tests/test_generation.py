"""Generation: seeds, sizes, schedulers, and the A1111 `parameters` PNG chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M Karras", "DDIM", "LCM", "Euler SGM Uniform", "TCD",
                                  "DPM++ 2M SDE Karras", "DPM2 a"])
def test_schedulers_run_and_are_recorded(tiny, name):
    out = generate(tiny, GenerationRequest(prompt="a circle", steps=3, seed=1, scheduler=name))[0]
    assert f"Sampler: {name}" in out.parameters
    assert out.image.size == (32, 32)


def test_a_sampler_s_options_never_carry_over_into_the_next(tiny):
    """SDE, Karras and trailing timesteps belong to their sampler: after one, the plain sampler of the same class is
    the plain one again (the same picture as on a fresh pipeline)."""
    from pipelines.generation import set_scheduler

    pipe = tiny.pipe
    plain = generate(tiny, GenerationRequest(prompt="a circle", steps=4, seed=3, scheduler="DPM++ 2M"))[0]
    for other in ("DPM++ 2M SDE Karras", "DPM++ 2M SGM Uniform", "DPM++ 2M Karras"):
        set_scheduler(pipe, other)
        cfg = pipe.scheduler.config
        assert (cfg.algorithm_type == "sde-dpmsolver++") == ("SDE" in other)
        assert (cfg.timestep_spacing == "trailing") == ("SGM" in other)
        assert bool(cfg.use_karras_sigmas) == other.endswith("Karras")
        again = generate(tiny, GenerationRequest(prompt="a circle", steps=4, seed=3, scheduler="DPM++ 2M"))[0]
        assert np.array_equal(_arr(again), _arr(plain)), other
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++" and not pipe.scheduler.config.use_karras_sigmas
    # an A1111 image's sampler and schedule type read back as the same sampler
    from pipelines.recall import _sampler

    assert _sampler({"Sampler": "Euler", "Schedule type": "SGM Uniform"}, []) == "Euler SGM Uniform"
    assert _sampler({"Sampler": "LCM"}, []) == "LCM"
    assert _sampler({"Sampler": "DPM++ 2M SDE", "Schedule type": "Karras"}, []) == "DPM++ 2M SDE Karras"


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
    notes = []  # A1111 writes Clip skip on SD 2.x images but does not apply it there; this app's own images keep it
    assert for_family(got.request, "sd2", notes).clip_skip == 1 and "not apply it there" in notes[0]
    ours = recall("a cat\nSteps: 2, Sampler: Euler, Seed: 3, Size: 64x64, Model family: sd2, Clip skip: 2")
    assert not ours.a1111 and for_family(ours.request, "sd2", [], a1111=ours.a1111).clip_skip == 2


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_enlarges_draws_again_and_is_made_again_from_its_png(tiny, tmp_path, upscaler):
    """AUTOMATIC1111's Hires fix: made at the size asked, enlarged, drawn again at the denoising strength; the
    PNG records the first pass's Size and the Hires keys, so the same picture comes back from it."""
    steps: list[tuple[int, int]] = []
    req = GenerationRequest(prompt="a red circle", steps=4, seed=2, scheduler="Euler", num_images=2, hires_scale=1.5,
                            hires_steps=6, hires_upscaler=upscaler, denoising_strength=0.5)
    imgs = generate(tiny, req, on_progress=lambda d, t: steps.append((d, t)))
    assert [g.image.size for g in imgs] == [(48, 48)] * 2  # 32 px x 1.5
    assert steps[-1] == (4 + 6, 4 + 6)  # the first pass's 4, then the 6 hires steps (A1111 runs all of them)
    p = parse_parameters(imgs[0].parameters)
    assert p["Size"] == "32x32" and p["Hires upscale"] == "1.5" and p["Hires steps"] == "6"
    assert p["Hires upscaler"] == upscaler and p["Denoising strength"] == "0.5"
    first = generate(tiny, GenerationRequest(prompt="a red circle", steps=4, seed=2, scheduler="Euler"))[0]
    small = np.asarray(imgs[0].image.resize((32, 32)), dtype=np.int16)
    assert np.abs(small - _arr(first)).mean() < 40  # drawn again from the first picture, not anew
    alone = generate(tiny, GenerationRequest(**{**req.__dict__, "seed": 3, "num_images": 1}))[0]
    assert np.abs(_arr(alone) - _arr(imgs[1])).max() <= 1  # image i of a batch = seed + i alone
    again = generate(tiny, request_from_parameters(read_png_parameters(save_png(imgs[0], tmp_path / "h.png"))))[0]
    assert np.abs(_arr(again) - _arr(imgs[0])).max() <= 1  # alone, as image 0 of its batch


def test_img2img_starts_from_the_picture_at_the_strength_given(toy_base, tiny, tmp_path):
    """On the toy model (its VAE keeps a picture): its blue square on yellow, asked to become "a red circle on
    a white background", stays nearly as it was at a low strength and is drawn anew at strength 1."""
    start = tmp_path / "start.png"
    drawn = generate(toy_base, GenerationRequest(prompt="a blue square on a yellow background", steps=20, seed=1))[0]
    drawn.image.resize((50, 40)).save(start)  # stretched back to the size asked
    req = dict(prompt="a red circle on a white background", steps=20, seed=5, init_image=str(start))
    light = generate(toy_base, GenerationRequest(**req, denoising_strength=0.1))[0]
    heavy = generate(toy_base, GenerationRequest(**req, denoising_strength=1.0))[0]
    assert light.image.size == (64, 64)
    assert np.abs(_arr(light) - _arr(drawn)).mean() < 40 < 70 < np.abs(_arr(heavy) - _arr(drawn)).mean()
    assert parse_parameters(light.parameters)["Denoising strength"] == "0.1" and "Hires" not in light.parameters
    done: list[tuple[int, int]] = []  # A1111 runs int(20 x 0.1) + 1 = 3 steps; a tiny strength still runs one
    generate(toy_base, GenerationRequest(**{**req, "steps": 10}, denoising_strength=0.05),
             on_progress=lambda d, t: done.append((d, t)))
    assert done == [(1, 1)]
    two = generate(toy_base, GenerationRequest(**req, denoising_strength=0.1, num_images=2))
    assert np.abs(_arr(two[0]) - _arr(light)).max() <= 1 and two[1].seed == 6
    with pytest.raises(ConfigError, match="init_image: nope.png: no such file|init_image: .*nope.png: no such"):
        generate(tiny, GenerationRequest(prompt="x", steps=2, init_image=str(tmp_path / "nope.png")))
    (tmp_path / "bad.png").write_text("not a picture")
    with pytest.raises(ConfigError, match="init_image: bad.png: not an image"):
        generate(tiny, GenerationRequest(prompt="x", steps=2, init_image=str(tmp_path / "bad.png")))
    with pytest.raises(ConfigError, match="hires_scale: Hires fix enlarges an image made from the prompt"):
        GenerationRequest(prompt="x", init_image=str(start), hires_scale=2)


def test_inpainting_draws_anew_only_inside_the_mask(toy_base, tmp_path):
    """A1111's inpainting: white in the mask is drawn anew, black stays exactly as it was (the overlay), the
    mask's edge blurred by mask_blur; a painted PNG layer's transparency works as the mask too."""
    from PIL import Image

    drawn = generate(toy_base, GenerationRequest(prompt="a blue square on a yellow background", steps=20, seed=1))[0]
    start = np.asarray(drawn.image, dtype=np.int16)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half
    req = dict(prompt="a red circle on a white background", steps=12, seed=2, init_image=drawn.image,
               mask_image=mask, denoising_strength=0.9)
    out = generate(toy_base, GenerationRequest(**req, mask_blur=0))[0]
    got = np.asarray(out.image, dtype=np.int16)
    assert np.array_equal(got[:, 32:], start[:, 32:])  # outside the mask: the picture itself
    assert np.abs(got[:, :32] - start[:, :32]).mean() > 20  # inside: drawn anew
    assert parse_parameters(out.parameters)["Mask blur"] == "0"
    blurred = np.asarray(generate(toy_base, GenerationRequest(**req))[0].image, dtype=np.int16)  # blur 4
    assert np.array_equal(blurred[:, 44:], start[:, 44:]) and not np.array_equal(blurred[:, 32:36], got[:, 32:36])
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # a brush layer: its strokes are the mask
    layer.paste((255, 0, 0, 255), (0, 0, 32, 64))
    painted = generate(toy_base, GenerationRequest(**{**req, "mask_image": layer}, mask_blur=0))[0]
    assert np.array_equal(np.asarray(painted.image, dtype=np.int16), got)
    with pytest.raises(ConfigError, match="mask_image: a mask says where to draw anew on a starting picture"):
        GenerationRequest(prompt="x", mask_image=mask)
    with pytest.raises(ConfigError, match="mask_blur"):
        GenerationRequest(prompt="x", init_image=drawn.image, mask_image=mask, mask_blur=-1)
    with pytest.raises(ConfigError, match="mask_image: gone.png: no such file"):
        generate(toy_base, GenerationRequest(**{**req, "mask_image": str(tmp_path / "gone.png")}))


def test_an_inpainting_checkpoint_draws_through_its_mask_input(tiny_inpaint_dir, tmp_path):
    """sd-v1-5-inpainting and kin (a 9-channel UNet) make images from a prompt, from a picture, with a Hires fix and
    with a mask, as in A1111: every step the UNet sees the latents, the mask (all 1 where the whole picture is
    drawn) and the masked picture's latents (plain grey's where nothing is kept); single files of them load."""
    from PIL import Image

    from pipelines.generation import _latents_of, inpainting_model
    from pipelines.single_file import save_single_file

    model = load_base(tiny_inpaint_dir, device="cpu")
    assert inpainting_model(model)
    seen = []
    hook = model.pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        a = generate(model, GenerationRequest(prompt="a red circle", steps=3, seed=1, guidance=1.0))[0]
        assert a.image.size == (32, 32) and seen and all(x.shape[1] == 9 for x in seen)
        grey = _latents_of(model.pipe, [Image.new("RGB", (32, 32), (127, 127, 127))], model.device)
        for x in seen:
            assert bool((x[:, 4] == 1).all())  # the whole picture is drawn
            assert torch.allclose(x[:, 5:], grey.expand_as(x[:, 5:]))  # nothing kept: grey
        again = generate(model, GenerationRequest(prompt="a red circle", steps=3, seed=1, guidance=1.0))[0]
        assert np.array_equal(_arr(a), _arr(again))
        seen.clear()
        b = generate(model, GenerationRequest(prompt="a red circle", steps=4, seed=2, init_image=a.image,
                                              denoising_strength=0.5))[0]
        assert b.image.size == (32, 32) and len(seen) == 3 and all(x.shape[1] == 9 for x in seen)  # int(4·0.5)+1
        other = generate(model, GenerationRequest(prompt="a red circle", steps=4, seed=2, denoising_strength=0.5,
                                                  init_image=a.image.transpose(Image.FLIP_LEFT_RIGHT)))[0]
        assert not np.array_equal(_arr(b), _arr(other))  # it starts from the picture
        seen.clear()
        for upscaler in ("Latent", "Lanczos"):
            h = generate(model, GenerationRequest(prompt="a red circle", steps=3, seed=2, hires_scale=2,
                                                  hires_steps=2, hires_upscaler=upscaler))[0]
            assert h.image.size == (64, 64)
        assert seen and all(x.shape[1] == 9 and bool((x[:, 4] == 1).all()) for x in seen)
        seen.clear()
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 0, 16, 32))
        c = generate(model, GenerationRequest(prompt="a red circle", steps=3, seed=3, init_image=a.image,
                                              mask_image=mask, mask_blur=0, denoising_strength=1.0))[0]
        assert np.array_equal(_arr(c)[:, 16:], _arr(a)[:, 16:])  # outside the mask: as it was
        assert seen and all(bool((x[:, 4, :, :2] == 1).all()) and bool((x[:, 4, :, -2:] == 0).all()) for x in seen)
    finally:
        hook.remove()
    single = save_single_file(model.pipe, tmp_path / "inpainting.safetensors")
    again = load_base(single, device="cpu")
    assert inpainting_model(again)
    saved, loaded = model.pipe.unet.state_dict(), again.pipe.unet.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert generate(again, GenerationRequest(prompt="a red circle", steps=2, seed=1))[0].image.size == (32, 32)


def test_an_sdxl_inpainting_checkpoint_draws_from_a_prompt_and_a_mask(tmp_path):
    """SDXL's inpainting models (diffusers/stable-diffusion-xl-1.0-inpainting-0.1's 9-channel UNet): the same
    routes as SD 1.x's, through diffusers' SDXL inpainting pipeline."""
    from conftest import build_tiny_sdxl
    from PIL import Image

    from pipelines.generation import inpainting_model

    build_tiny_sdxl(tmp_path / "b", in_channels=9).save_pretrained(tmp_path / "xl", safe_serialization=True)
    model = load_base(tmp_path / "xl", device="cpu")
    assert model.family == "sdxl" and inpainting_model(model)
    seen = []
    hook = model.pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        a = generate(model, GenerationRequest(prompt="a red circle", steps=2, seed=1, width=32, height=32))[0]
        assert a.image.size == (32, 32) and seen and all(x.shape[1] == 9 and bool((x[:, 4] == 1).all()) for x in seen)
        seen.clear()
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 0, 16, 32))
        b = generate(model, GenerationRequest(prompt="a red circle", steps=2, seed=2, init_image=a.image,
                                              mask_image=mask, mask_blur=0, denoising_strength=1.0))[0]
        assert np.array_equal(_arr(b)[:, 16:], _arr(a)[:, 16:]) and seen and all(x.shape[1] == 9 for x in seen)
    finally:
        hook.remove()


def test_training_on_an_inpainting_checkpoint_is_refused(tiny_inpaint_dir, star_images, tmp_path):
    from pipelines.errors import TrainingError
    from training.config import TrainConfig
    from training.trainer import train

    cfg = TrainConfig(images=str(star_images), base=str(tiny_inpaint_dir), output_dir=str(tmp_path / "lib"),
                      max_steps=1, batch_size=2, device="cpu", name="inp", rank=4)
    with pytest.raises(TrainingError, match="base: .* is an inpainting model .* train on the model it was made from"):
        train(cfg)
    assert not (tmp_path / "lib" / "inp.safetensors").exists()


@pytest.mark.parametrize("kw,msg", [({"hires_scale": 5}, "hires_scale"), ({"hires_scale": 0.5}, "hires_scale"),
                                    ({"hires_steps": -1}, "hires_steps"), ({"denoising_strength": 0},
                                                                           "denoising_strength"),
                                    ({"hires_upscaler": "ESRGAN"}, "hires_upscaler: must be one of Latent, Lanczos")])
def test_bad_hires_settings_name_their_field(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        GenerationRequest(prompt="x", **kw)


def test_hires_fix_on_sdxl(tiny_sdxl_dir):
    xl = load_base(tiny_sdxl_dir, device="cpu")
    out = generate(xl, GenerationRequest(prompt="x", steps=2, seed=1, hires_scale=2, denoising_strength=0.5))[0]
    assert out.image.size == (2 * xl.native_resolution,) * 2


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
