"""What a shared adapter tells others: no absolute local paths, and kohya's model hash only when it is real."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

from pipelines.adapters import lora_metadata
from pipelines.weights_io import load_safetensors, sha256_file
from training.config import TrainConfig
from training.export import base_file_hash, shareable_path
from training.trainer import train


def test_shareable_path(tmp_path, monkeypatch):
    home = tmp_path / "home" / "alice"
    (home / "pics" / "star").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    assert shareable_path(str(home / "pics" / "star")) == "~/pics/star"
    assert shareable_path(str(tmp_path / "elsewhere" / "set")) == "set"  # outside the home: the name only
    assert shareable_path("org/model") == "org/model"  # a hub id is not a local path
    assert shareable_path(None) is None


def test_trained_adapter_and_its_toml_leak_no_local_path(star_images, tiny_sd1_dir, tmp_path, monkeypatch):
    home = tmp_path / "home" / "alice"
    images = home / "pictures" / "my star"
    shutil.copytree(star_images, images)
    monkeypatch.setenv("HOME", str(home))
    cfg = TrainConfig(images=str(images), base=str(tiny_sd1_dir), output_dir=str(home / "lib"), name="s",
                      max_steps=2, batch_size=2, rank=2, device="cpu", sample_steps=2, checkpoint_every=1)
    res = train(cfg)
    _, meta = load_safetensors(res.adapter_path)
    ck_meta = load_safetensors(res.checkpoint / "adapter.safetensors")[1]  # a run's step-1 file
    for text in [*meta.values(), *ck_meta.values(), (home / "lib" / "s.toml").read_text(),
                 (home / "lib" / "s.md").read_text()]:
        assert str(tmp_path) not in text and "alice" not in text
    shared = json.loads(meta["lora_studio.train_config"])
    assert shared["images"] == "~/pictures/my star" and shared["output_dir"] == "~/lib"
    assert shared["base"] == tiny_sd1_dir.name
    # the library's .toml runs again on this machine: '~' is the user's home
    again = TrainConfig.from_toml(home / "lib" / "s.toml")
    assert again.images == str(images) and again.output_dir == str(home / "lib")


def test_kohya_model_hash_is_the_base_file_hash_or_absent(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights")
    assert base_file_hash(SimpleNamespace(source=str(f))) == sha256_file(f)
    assert base_file_hash(SimpleNamespace(source=str(tmp_path))) is None  # a diffusers folder: no one file
    assert base_file_hash(SimpleNamespace(source="org/model")) is None  # a hub id
    assert "ss_new_sd_model_hash" not in lora_metadata(family="sd1", rank=4, alpha=4, base_hash="0123abcd")
    m = lora_metadata(family="sd1", rank=4, alpha=4, base_hash="0123abcd", model_file_hash=sha256_file(f))
    assert m["ss_new_sd_model_hash"] == sha256_file(f) and m["lora_studio.base_hash"] == "0123abcd"


def test_shared_toml_never_carries_overwrite(star_images, tiny_sd1_dir, tmp_path):
    cfg = TrainConfig(images=str(star_images), base=str(tiny_sd1_dir), output_dir=str(tmp_path / "lib"), name="o",
                      max_steps=1, batch_size=2, rank=2, device="cpu", sample_steps=2)
    train(cfg)
    res = train(cfg.replace(overwrite=True))  # retrained on purpose
    toml = (tmp_path / "lib" / "o.toml").read_text()
    assert "overwrite" not in toml and TrainConfig.from_toml(tmp_path / "lib" / "o.toml").overwrite is False
    assert "overwrite" not in json.loads(load_safetensors(res.adapter_path)[1]["lora_studio.train_config"])


def test_a_damaged_checkpoint_state_is_one_clear_error(star_images, tiny_sd1_dir, tmp_path):
    import pytest

    from pipelines.errors import TrainingError

    cfg = TrainConfig(images=str(star_images), base=str(tiny_sd1_dir), output_dir=str(tmp_path / "lib"), name="d",
                      max_steps=3, batch_size=2, rank=2, device="cpu", sample_steps=2, checkpoint_every=1)
    res = train(cfg)
    (res.checkpoint / "state.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(TrainingError, match=r"cannot resume from .*step-000002: its state.pt is damaged"):
        train(cfg.replace(resume="latest", max_steps=4, overwrite=True))


def test_a_symlinked_preview_beside_any_adapter_file_is_not_taken(tmp_path):
    from pipelines.adapters import preview_for

    secret = tmp_path / "private.png"
    secret.write_bytes(b"\x89PNG")
    (tmp_path / "a.png").symlink_to(secret)
    assert preview_for(tmp_path / "a.safetensors") is None
    (tmp_path / "a.preview.png").write_bytes(b"\x89PNG")
    assert preview_for(tmp_path / "a.safetensors") == tmp_path / "a.preview.png"
