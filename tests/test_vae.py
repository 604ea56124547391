"""A separate VAE (AUTOMATIC1111's SD VAE, ComfyUI's Load VAE): loading every common layout, using it, going back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipelines.base_models import load_base
from pipelines.errors import LoraStudioError
from pipelines.generation import GenerationRequest, generate, parse_parameters, read_png_parameters
from pipelines.single_file import VAE_PREFIX, vae_to_ldm
from pipelines.vae import AUTOMATIC, load_vae, use_vae, vae_files

REQ = GenerationRequest(prompt="a red circle on a white background", steps=6, seed=1)


@pytest.fixture(scope="module")
def toy(toy_base_dir):
    return load_base(toy_base_dir, device="cpu")  # a copy of its own: the tests swap its VAE


@pytest.fixture(scope="module")
def vae_dir(toy, tmp_path_factory):
    """The toy VAE as A1111 users get VAE files: LDM names with and without the checkpoint prefix, diffusers
    names, and a 'warm' one whose decoder shifts red up and green down."""
    d = tmp_path_factory.mktemp("VAE")
    ldm = {k: v.clone().contiguous() for k, v in vae_to_ldm(toy.pipe.vae).items()}
    save_file({VAE_PREFIX + k: v for k, v in ldm.items()}, d / "same-prefixed.safetensors")
    save_file(ldm, d / "same.safetensors")
    save_file({k: v.clone().contiguous() for k, v in toy.pipe.vae.state_dict().items()}, d / "same-diffusers.safetensors")
    toy.pipe.vae.save_pretrained(d / "diffusers-folder")  # a diffusers VAE folder whose config says otherwise:
    cfg = (d / "diffusers-folder" / "config.json").read_text().replace('"scaling_factor"', '"scaling_factor_x"')
    (d / "diffusers-folder" / "config.json").write_text(cfg.replace("{", '{"scaling_factor": 9.9, ', 1))
    warm = dict(ldm)
    warm["decoder.conv_out.bias"] = warm["decoder.conv_out.bias"] + torch.tensor([0.4, -0.4, 0.0])
    save_file(warm, d / "warm.safetensors")
    return d


def _img(model, req=REQ):
    return np.asarray(generate(model, req)[0].image, dtype=np.int16)


def test_a_vae_file_in_any_layout_decodes_as_its_weights_say_and_the_own_one_comes_back(toy, vae_dir):
    own = _img(toy)
    for name in ("same.safetensors", "same-prefixed.safetensors", "same-diffusers.safetensors", "diffusers-folder"):
        use_vae(toy, vae_dir / name)
        out = generate(toy, REQ)[0]
        assert np.array_equal(np.asarray(out.image, dtype=np.int16), own), name  # the same weights: the same image
        assert parse_parameters(out.parameters)["VAE"] == name  # recorded as A1111 does
    use_vae(toy, vae_dir / "warm.safetensors")
    shift = (_img(toy) - own).mean(axis=(0, 1))
    assert shift[0] > 10 and shift[1] < -10 and abs(shift[2]) < 3  # its decoder's own colours
    use_vae(toy, None)
    back = generate(toy, REQ)[0]
    assert np.array_equal(np.asarray(back.image, dtype=np.int16), own) and "VAE" not in back.parameters
    # img2img encodes with it too
    use_vae(toy, vae_dir / "warm.safetensors")
    assert toy.pipe.vae is not toy._vaes[None]
    start = Image.fromarray(own.astype(np.uint8))
    moved = generate(toy, GenerationRequest(prompt=REQ.prompt, steps=6, seed=1, init_image=start,
                                            denoising_strength=0.3))[0]
    assert parse_parameters(moved.parameters)["VAE"] == "warm.safetensors"
    use_vae(toy, None)


def test_a_vae_that_does_not_fit_is_refused_naming_the_file(toy, vae_dir, tmp_path):
    like = toy._vaes[None] if hasattr(toy, "_vaes") else toy.pipe.vae
    ldm = {k: v.clone().contiguous() for k, v in vae_to_ldm(like).items()}
    half = dict(list(ldm.items())[: len(ldm) // 2])
    save_file(half, tmp_path / "half.safetensors")
    with pytest.raises(LoraStudioError, match=r"half.safetensors: not a VAE this model can use: \d+ of its \d+ weights"):
        load_vae(tmp_path / "half.safetensors", like)
    wide = dict(ldm)
    wide["decoder.conv_out.weight"] = torch.zeros(3, 7, 3, 3)
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(LoraStudioError, match="wide.safetensors: weight 'decoder.conv_out.weight' has shape"):
        load_vae(tmp_path / "wide.safetensors", like)
    bad = dict(ldm)
    bad["decoder.conv_out.bias"] = torch.tensor([float("nan"), 0.0, 0.0])
    save_file(bad, tmp_path / "nan.safetensors")
    with pytest.raises(LoraStudioError, match="nan.safetensors"):
        load_vae(tmp_path / "nan.safetensors", like)
    torch.save(ldm, tmp_path / "old.pt")
    with pytest.raises(LoraStudioError, match="pickles"):
        load_vae(tmp_path / "old.pt", like)
    assert load_vae(tmp_path / "old.pt", like, allow_pickle=True) is not like  # allowed: it loads
    with pytest.raises(LoraStudioError, match="no such file"):
        load_vae(tmp_path / "gone.safetensors", like)
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "empty-folder" / "config.json").write_text("{}")
    with pytest.raises(LoraStudioError, match="empty-folder: a VAE folder without its weights"):
        load_vae(tmp_path / "empty-folder", like)
    use_vae(toy, None)


def test_studio_picks_vaes_from_the_models_vae_folder_and_recall_brings_them_back(toy_base_dir, vae_dir, tmp_path):
    from app.studio import Studio
    from app.ui import StudioUI

    studio = Studio(home=tmp_path / "home", device="cpu")
    assert studio.vae_choices() == [AUTOMATIC]
    (studio.vae_dir / "warm.safetensors").write_bytes((vae_dir / "warm.safetensors").read_bytes())
    (studio.vae_dir / "notes.txt").write_text("not a VAE")
    assert studio.vae_choices() == [AUTOMATIC, "warm.safetensors"] == [AUTOMATIC, *vae_files(studio.vae_dir)]
    own = studio.generate(None, REQ).paths[0]
    warm = studio.generate(None, REQ, vae="warm.safetensors").paths[0]
    again = studio.generate(None, REQ, vae=AUTOMATIC).paths[0]
    arr = [np.asarray(Image.open(p), dtype=np.int16) for p in (own, warm, again)]
    assert np.array_equal(arr[0], arr[2]) and (arr[1] - arr[0]).mean(axis=(0, 1))[0] > 10
    assert parse_parameters(read_png_parameters(warm))["VAE"] == "warm.safetensors"
    with pytest.raises(LoraStudioError, match="vae: 'other.safetensors' is not in"):
        studio.generate(None, REQ, vae="other.safetensors")
    ui = StudioUI(studio)
    base = ui.base_names()[0]
    out = ui.recall_form(read_png_parameters(warm), base)
    assert out[14] == "warm.safetensors"  # the VAE picker
    text = read_png_parameters(warm).replace("warm.safetensors", "elsewhere.safetensors")
    with pytest.warns(UserWarning):
        out = ui.recall_form(text, base)
    assert out[14] == AUTOMATIC and "VAE 'elsewhere.safetensors', which is not in" in out[-1]
    assert ui.refresh_vaes("warm.safetensors")["value"] == "warm.safetensors"
    (studio.vae_dir / "warm.safetensors").unlink()
    assert ui.refresh_vaes("warm.safetensors") == {"__type__": "update", "choices": [AUTOMATIC],
                                                   "value": AUTOMATIC}


def test_cli_vae_by_file_or_name_and_from_png(toy_base_dir, vae_dir, tmp_path, monkeypatch, capsys):
    from app.cli import main

    home = tmp_path / "home"
    (home / "models" / "VAE").mkdir(parents=True)
    (home / "models" / "VAE" / "warm.safetensors").write_bytes((vae_dir / "warm.safetensors").read_bytes())
    monkeypatch.setenv("LORA_STUDIO_HOME", str(home))
    common = ["generate", "--base", str(toy_base_dir), "--device", "cpu", "--steps", "4", "--seed", "2"]
    by_file, by_name, plain = tmp_path / "f.png", tmp_path / "n.png", tmp_path / "p.png"
    assert main(common + ["--prompt", "a red circle", "--vae", str(vae_dir / "warm.safetensors"),
                          "--out", str(by_file)]) == 0
    assert main(common + ["--prompt", "a red circle", "--vae", "warm.safetensors", "--out", str(by_name)]) == 0
    assert main(common + ["--prompt", "a red circle", "--out", str(plain)]) == 0
    assert Image.open(by_file).tobytes() == Image.open(by_name).tobytes() != Image.open(plain).tobytes()
    again = tmp_path / "again.png"  # --from-png finds the recorded VAE in the VAE folder
    assert main(["generate", "--base", str(toy_base_dir), "--device", "cpu", "--from-png", str(by_name),
                 "--out", str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(by_name).tobytes()
    capsys.readouterr()
    assert main(common + ["--prompt", "x", "--vae", "nowhere.safetensors"]) == 2
    assert "--vae: no file 'nowhere.safetensors', and no VAE of that name in" in capsys.readouterr().err


def test_training_encodes_with_the_vae_given_and_records_it(star_images, tiny_sd1_dir, tmp_path, monkeypatch):
    """kohya's --vae: the images are encoded with it, the samples decoded with it, the file names it."""
    from pipelines.weights_io import load_safetensors
    from training import trainer as tr
    from training.config import TrainConfig

    like = load_base(tiny_sd1_dir, device="cpu").pipe.vae
    ldm = {k: v.clone().contiguous() for k, v in vae_to_ldm(like).items()}
    ldm["encoder.conv_out.bias"] = ldm["encoder.conv_out.bias"] + 0.5
    save_file(ldm, tmp_path / "shifted.safetensors")
    seen = []
    real = tr.encode_images
    monkeypatch.setattr(tr, "encode_images", lambda base, images: seen.append(base.pipe.vae) or real(base, images))
    cfg = TrainConfig(images=str(star_images), base=str(tiny_sd1_dir), output_dir=str(tmp_path / "lib"), max_steps=2,
                      batch_size=2, checkpoint_every=0, device="cpu", sample_steps=2, name="v", rank=4,
                      vae=str(tmp_path / "shifted.safetensors"))
    res = tr.train(cfg)
    assert seen and all(torch.equal(v.encoder.conv_out.bias, like.encoder.conv_out.bias + 0.5) for v in seen)
    _, meta = load_safetensors(res.adapter_path)
    assert meta["ss_vae_name"] == "shifted.safetensors"
    samples = sorted((tmp_path / "lib" / "runs" / "v" / "samples").glob("*.png"))
    assert samples and parse_parameters(read_png_parameters(samples[-1]))["VAE"] == "shifted.safetensors"
    with pytest.raises(LoraStudioError, match="gone.safetensors: no such file"):
        tr.train(cfg.replace(vae=str(tmp_path / "gone.safetensors"), name="v2"))
