"""Making an image again from its parameters (AUTOMATIC1111's PNG Info → Send to txt2img): the text of a PNG
made here or elsewhere becomes the request and the adapters, and what cannot be the same is said."""

from __future__ import annotations

import numpy as np
import pytest
from lora_helpers import make_lora
from PIL import Image

from app.cli import main
from pipelines.adapters import lora_metadata, save_adapter
from pipelines.base_models import load_base
from pipelines.errors import ConfigError
from pipelines.generation import parse_parameters, read_png_parameters
from pipelines.library import AdapterLibrary
from pipelines.recall import read_parameters, recall
from pipelines.stack import StackEntry

A1111 = ("a red square, in ohwx style <lora:alpha:0.8:start=10> <lora:gone:0.5> <lora:beta:0.3:0.9>\n"
         "Negative prompt: blurry, lowres\n"
         "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, "
         "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Denoising strength: 0.45, "
         "Hires upscale: 1.5, Hires upscaler: R-ESRGAN 4x+, VAE: vae-ft-mse-840000.safetensors, ENSD: 31337, "
         'Lora hashes: "alpha: 000000000000, beta: {beta}, gone: 123456789abc", Version: v1.10.1')


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir):
    return load_base(tiny_sd1_dir, device="cpu")


@pytest.fixture(scope="module")
def lib(sd1, tmp_path_factory):
    root = tmp_path_factory.mktemp("recall_lib")
    for name, seed in (("alpha", 1), ("beta", 2)):
        save_adapter(make_lora(sd1.pipe, rank=4, seed=seed, std=1.0), root / f"{name}.safetensors",
                     lora_metadata(family="sd1", rank=4, alpha=4, name=name))
    return AdapterLibrary(root)


def test_a1111_parameters_become_a_request_adapters_and_notes(lib):
    beta_hash = lib.info("beta").short_hash
    got = recall(A1111.format(beta=beta_hash), lib)
    r = got.request
    assert (r.prompt, r.negative_prompt) == ("a red square, in ohwx style", "blurry, lowres")
    assert (r.steps, r.guidance, r.seed, r.width, r.height) == (25, 6.5, 1234, 512, 768)
    assert r.scheduler == "DPM++ 2M Karras"  # A1111 1.9+ writes the schedule apart
    assert got.entries == [StackEntry("alpha", 0.8, 0.8, 10), StackEntry("gone", 0.5, 0.5),
                           StackEntry("beta", 0.9, 0.3)]  # A1111's <lora:name:te:unet>
    assert got.model == "v1-5-pruned-emaonly"
    notes = "\n".join(got.notes)
    assert r.clip_skip == 2 and "Clip skip" not in notes  # applied here as A1111 does
    assert (r.hires_scale, r.hires_steps, r.denoising_strength) == (1.5, 0, 0.45)  # A1111's Hires fix
    assert r.hires_upscaler == "Lanczos" and "Hires upscaler 'R-ESRGAN 4x+' is not available here" in notes
    assert got.vae == "vae-ft-mse-840000.safetensors"  # the caller looks for it in the VAE folder
    assert "ENSD 31337" in notes  # an option this app does not have is named, not dropped silently
    assert "'gone' is not in the library" in notes
    assert "'alpha': the image was made with file hash 000000000000" in notes  # another version of the file
    assert "'beta'" not in notes  # the same file: nothing to say
    assert got.tagged_prompt.endswith("<lora:alpha:0.8:start=10> <lora:gone:0.5> <lora:beta:0.3:0.9>")
    # an unknown sampler: said, and the default used
    odd = recall("a cat\nSteps: 4, Sampler: Restart, CFG scale: 5, Seed: 3, Size: 64x64")
    assert odd.request.scheduler == "DPM++ 2M Karras" and "sampler 'Restart' is not available" in odd.notes[0]
    for bad in ("", "just a prompt with no settings"):
        with pytest.raises(ConfigError, match="parameters"):
            recall(bad)
    # the sampler is here, its schedule is not: the sampler is kept, and said
    sched = recall("a cat\nSteps: 4, Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 5, Seed: 3")
    assert sched.request.scheduler == "Euler a" and "schedule 'SGM Uniform' is not available" in sched.notes[0]
    # an img2img image: its starting picture is not in the parameters, so it is made from the prompt, and said
    i2i = recall("a cat\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 3, Size: 64x64, Denoising strength: 0.6")
    assert i2i.request.hires_scale == 1 and i2i.request.init_image is None
    assert i2i.request.denoising_strength == 0.6  # for when the picture is given again
    assert "made from another picture (img2img, denoising strength 0.6)" in i2i.notes[0]
    inpainted = recall("a cat\nSteps: 4, Sampler: Euler, Seed: 3, Size: 64x64, Denoising strength: 0.6, Mask blur: 8")
    assert "inpainting with a mask (mask blur 8)" in inpainted.notes[0] and "and the mask" in inpainted.notes[0]
    assert inpainted.request.mask_blur == 8
    # A1111's "resize to" form of the Hires fix: the scale from the sizes
    resized = recall("a cat\nSteps: 4, Sampler: Euler, Seed: 3, Size: 64x64, Denoising strength: 0.3, "
                     "Hires resize: 96x96, Hires steps: 5, Hires upscaler: Latent (nearest)")
    r2 = resized.request
    assert (r2.hires_scale, r2.hires_steps, r2.hires_upscaler, r2.denoising_strength) == (1.5, 5, "Latent", 0.3)
    assert "'Latent (nearest)' is not available here: Latent is used" in resized.notes[0]
    # an adapter tagged twice is used once (a stack holds it once); a name no library file can have is a note
    twice = recall("a cat <lora:alpha:0.5> <lora:alpha:0.3> <lora:style|v2:1>\nSteps: 4, Sampler: Euler, Seed: 3", lib)
    assert [e.name for e in twice.entries] == ["alpha", "style|v2"]
    assert any("'alpha' is tagged more than once: only its first tag, <lora:alpha:0.5>" in n for n in twice.notes)
    assert any("'style|v2': not a name a library file can have" in n for n in twice.notes)
    # a value that is no number names its field
    with pytest.raises(ConfigError, match="Steps 'abc' is not a whole number"):
        recall("a cat\nSteps: abc, Sampler: Euler, Seed: 3")
    with pytest.raises(ConfigError, match="Seed '5.5' is not a whole number"):
        recall("a cat\nSteps: 4, Sampler: Euler, Seed: 5.5")


def test_parameters_are_read_from_png_text_and_from_a1111_jpeg_exif(tmp_path):
    png = tmp_path / "made.png"
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 3, Size: 64x64")
    Image.new("RGB", (8, 8)).save(png, pnginfo=info)
    assert read_parameters(png).startswith("a cat\nSteps: 4")
    # AUTOMATIC1111 saves JPEG/WebP parameters as an EXIF UserComment: 'UNICODE\0' + UTF-16 (big-endian)
    jpg = tmp_path / "made.jpg"
    exif = Image.Exif()
    text = "a dog <lora:alpha:1>\nSteps: 9, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 64x64"
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    Image.new("RGB", (8, 8)).save(jpg, exif=exif)
    assert read_parameters(jpg) == text
    assert recall(read_parameters(jpg)).request.scheduler == "Euler a"
    exif.get_ifd(0x8769)[0x9286] = b"\0" * 8 + text.encode()  # the "undefined" character code: the text as is
    Image.new("RGB", (8, 8)).save(jpg, exif=exif)
    assert read_parameters(jpg) == text
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(ConfigError, match="plain.png: the image carries no generation parameters"):
        read_parameters(plain)
    with pytest.raises(ConfigError, match="nope.png: no such file"):
        read_parameters(tmp_path / "nope.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ConfigError, match="junk.png: not an image") as err:
        read_parameters(junk)
    assert str(tmp_path) not in str(err.value)  # an upload's server-side folder is not shown


def test_cli_from_png_makes_the_same_image_and_options_override(tiny_sd1_dir, lib, tmp_path, capsys):
    common = ["generate", "--base", str(tiny_sd1_dir), "--device", "cpu", "--library", str(lib.root)]
    first = tmp_path / "first.png"
    assert main(common + ["--prompt", "a blue square <lora:beta:0.6>", "--lora", "alpha:0.7:start=1",
                          "--negative-prompt", "red", "--steps", "3", "--guidance", "5", "--seed", "5",
                          "--scheduler", "ddim", "--out", str(first)]) == 0
    again = tmp_path / "again.png"
    assert main(common + ["--from-png", str(first), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert parse_parameters(read_png_parameters(again)) == parse_parameters(read_png_parameters(first))
    capsys.readouterr()
    other = tmp_path / "other.png"  # an option given as well wins over the recorded one
    assert main(common + ["--from-png", str(first), "--seed", "6", "--out", str(other)]) == 0
    p = parse_parameters(read_png_parameters(other))
    assert p["Seed"] == "6" and p["Steps"] == "3" and p["Negative prompt"] == "red"
    assert "<lora:alpha:0.7:start=1>" in p["Prompt"]
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(other)))
    # another base model's image: made, and said
    foreign = tmp_path / "foreign.png"
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 3, Size: 32x32, "
                                "Model: sd_xl_base_1.0, Clip skip: 2, VAE: sdxl_vae")
    Image.new("RGB", (8, 8)).save(foreign, pnginfo=info)
    assert main(common + ["--from-png", str(foreign), "--out", str(tmp_path / "f.png")]) == 0
    out = capsys.readouterr().out
    assert "decoded with the VAE 'sdxl_vae', which is not in" in out and "base model 'sd_xl_base_1.0'" in out
    assert parse_parameters(read_png_parameters(tmp_path / "f.png"))["Clip skip"] == "2"  # SD 1.x: applied
    assert main(common + ["--out", str(tmp_path / "x.png")]) == 2
    assert "--prompt TEXT, or --from-png IMAGE" in capsys.readouterr().err
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert main(common + ["--from-png", str(plain)]) == 2
    assert "plain.png: the image carries no generation parameters" in capsys.readouterr().err


def test_cli_hires_fix_and_img2img(tiny_sd1_dir, lib, tmp_path, capsys):
    """`generate --hires-scale 2` makes a picture twice the size that --from-png makes again; --init-image
    starts from a picture; a missing one is named."""
    common = ["generate", "--base", str(tiny_sd1_dir), "--device", "cpu", "--library", str(lib.root)]
    big = tmp_path / "big.png"
    assert main(common + ["--prompt", "a blue square <lora:alpha:0.5>", "--steps", "3", "--seed", "4",
                          "--hires-scale", "2", "--hires-steps", "4", "--denoising-strength", "0.5",
                          "--hires-upscaler", "Lanczos", "--clip-skip", "2", "--out", str(big)]) == 0
    p = parse_parameters(read_png_parameters(big))
    assert Image.open(big).size == (64, 64) and p["Size"] == "32x32" and p["Hires upscale"] == "2"
    assert (p["Hires steps"], p["Hires upscaler"], p["Denoising strength"], p["Clip skip"]) == ("4", "Lanczos", "0.5",
                                                                                                "2")
    again = tmp_path / "again.png"
    assert main(common + ["--from-png", str(big), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(big)), np.asarray(Image.open(again)))
    off = tmp_path / "off.png"  # an option given as well wins: the Hires fix off
    assert main(common + ["--from-png", str(big), "--hires-scale", "1", "--out", str(off)]) == 0
    assert Image.open(off).size == (32, 32) and "Hires" not in read_png_parameters(off)
    grid = tmp_path / "cfg-grid.png"  # the X/Y plot's settings axes on the CLI
    assert main(["grid", "--base", str(tiny_sd1_dir), "--device", "cpu", "--library", str(lib.root), "--prompt",
                 "a cat <lora:alpha:0.5>", "--steps", "2", "--seed", "1", "--cfgs", "3,6", "--out", str(grid)]) == 0
    assert parse_parameters(read_png_parameters(grid))["Grid settings"] == "CFG scale 3 | CFG scale 6"
    moved = tmp_path / "moved.png"
    assert main(common + ["--prompt", "a red circle", "--steps", "4", "--init-image", str(big),
                          "--denoising-strength", "0.5", "--out", str(moved)]) == 0
    assert Image.open(moved).size == (32, 32)  # stretched to the model's size
    assert parse_parameters(read_png_parameters(moved))["Denoising strength"] == "0.5"
    mask = tmp_path / "mask.png"
    Image.new("L", (32, 32), 0).save(mask)  # nothing to draw anew: the picture comes back as it went in
    kept = tmp_path / "kept.png"
    assert main(common + ["--prompt", "a red circle", "--steps", "4", "--init-image", str(moved), "--mask", str(mask),
                          "--mask-blur", "0", "--out", str(kept)]) == 0
    assert np.array_equal(np.asarray(Image.open(kept)), np.asarray(Image.open(moved)))
    assert parse_parameters(read_png_parameters(kept))["Mask blur"] == "0"
    capsys.readouterr()
    assert main(common + ["--prompt", "x", "--mask", str(mask)]) == 2
    assert "mask_image: a mask says where to draw anew" in capsys.readouterr().err
    assert main(common + ["--prompt", "x", "--init-image", str(tmp_path / "nope.png")]) == 2
    assert "init_image: " in capsys.readouterr().err
    assert main(common + ["--prompt", "x", "--init-image", str(big), "--hires-scale", "2"]) == 2
    assert "hires_scale: Hires fix enlarges an image made from the prompt" in capsys.readouterr().err
