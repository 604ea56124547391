"""Base-model loading: folders, family detection, refusals with clear messages."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipelines.base_models import detect_family, load_base
from pipelines.errors import LoraStudioError, ModelLoadError, PickleRefusedError


@pytest.mark.parametrize("fixture,family", [("tiny_sd1_dir", "sd1"), ("tiny_sd2_dir", "sd2"), ("tiny_sdxl_dir", "sdxl")])
def test_folder_loads_with_family_detected(request, fixture, family):
    folder = request.getfixturevalue(fixture)
    base = load_base(folder, device="cpu")
    assert base.family == family
    assert detect_family(base.pipe) == family
    assert base.native_resolution == 32


def test_family_comes_from_shapes_not_the_name(tiny_sdxl_dir, tmp_path):
    renamed = tmp_path / "sd15-not-really"
    shutil.copytree(tiny_sdxl_dir, renamed)
    assert load_base(renamed, device="cpu").family == "sdxl"


def test_toy_base_is_a_real_sd1_pipeline(toy_base_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(toy_base_dir)  # loads unchanged, as users would
    names = {n for n, _ in pipe.unet.named_modules()}
    assert {"to_q", "to_k", "to_v", "to_out.0"} <= {n.split("attn1.")[-1] for n in names if "attn1." in n}
    assert (toy_base_dir / "tokenizer" / "vocab.json").is_file()
    assert (toy_base_dir / "tokenizer" / "merges.txt").is_file()
    assert not list(toy_base_dir.rglob("*.bin")), "weights must be safetensors"
    size = sum(f.stat().st_size for f in toy_base_dir.rglob("*") if f.is_file())
    assert size <= 25 * 1024 * 1024
    assert load_base(toy_base_dir, device="cpu").family == "sd1"


def test_missing_path_names_it(tmp_path):
    with pytest.raises(ModelLoadError, match="nope"):
        load_base(tmp_path / "nope", device="cpu")


def test_folder_without_model_index_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_base(tmp_path, device="cpu")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_checkpoint_refused_without_allow_pickle(tmp_path, suffix):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"x": Evil()}}, path)
    with pytest.raises(PickleRefusedError, match="allow-pickle"):
        load_base(path, device="cpu")
    assert not marker.exists()


def test_pickle_only_folder_refused(tiny_sd1_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_sd1_dir, folder)
    for f in folder.rglob("*.safetensors"):
        f.rename(f.with_name(f.name.replace(".safetensors", ".bin")))
    with pytest.raises(PickleRefusedError):
        load_base(folder, device="cpu")


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json"])
def test_corrupt_single_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoraStudioError, match="broken.safetensors"):
        load_base(path, device="cpu")


def test_unsupported_architecture_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "llm.safetensors"
    save_file({"model.layers.0.mlp.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match="llm.safetensors"):
        load_base(path, device="cpu")


def test_invalid_unet_config_names_file(tiny_sd1_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_sd1_dir, folder)
    (folder / "unet" / "config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_base(folder, device="cpu")


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="someone/some-model"):
        load_base("someone/some-model", device="cpu")


def test_model_index_is_json(toy_base_dir):
    idx = json.loads((toy_base_dir / "model_index.json").read_text())
    assert idx["_class_name"] == "StableDiffusionPipeline"


def test_single_file_export_of_toy_model_loads_and_draws_the_same(toy_base, tmp_path):
    import numpy as np

    from pipelines.generation import GenerationRequest, generate
    from pipelines.single_file import save_single_file

    path = save_single_file(toy_base.pipe, tmp_path / "toy.safetensors")
    single = load_base(path, device="cpu")
    assert single.family == "sd1"
    req = dict(prompt="a red circle on a white background", steps=4, seed=1)
    a = np.asarray(generate(toy_base, GenerationRequest(**req))[0].image, dtype=np.int16)
    b = np.asarray(generate(single, GenerationRequest(**req))[0].image, dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_single_file_sdxl_fixture_loads_with_config(tiny_sdxl_dir, tmp_path):
    from pipelines.single_file import save_single_file

    base = load_base(tiny_sdxl_dir, device="cpu")
    path = save_single_file(base.pipe, tmp_path / "xl.safetensors")
    again = load_base(path, device="cpu", config=str(tiny_sdxl_dir))
    assert again.family == "sdxl"
