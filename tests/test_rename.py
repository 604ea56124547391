"""A rename moves everything that carries the adapter's name: files, metadata, card, config, run folder."""

from __future__ import annotations

import json

import pytest

from pipelines.errors import ConfigError
from pipelines.library import AdapterLibrary
from pipelines.weights_io import load_safetensors, read_metadata
from training.config import TrainConfig
from training.trainer import train


@pytest.fixture
def trained(star_images, tiny_sd1_dir, tmp_path):
    lib = tmp_path / "lib"
    cfg = TrainConfig(images=str(star_images), base=str(tiny_sd1_dir), output_dir=str(lib), name="star",
                      max_steps=2, batch_size=2, rank=2, device="cpu", sample_steps=2, checkpoint_every=1)
    res = train(cfg)
    return AdapterLibrary(lib), res


def test_rename_moves_the_name_everywhere(trained):
    lib, res = trained
    before, _ = load_safetensors(res.adapter_path)
    info = lib.rename("star", "comet")
    root = lib.root
    assert info.name == "comet" and not (root / "star.safetensors").exists()
    assert {p.name for p in root.glob("comet*")} == {"comet.safetensors", "comet.png", "comet.md", "comet.toml",
                                                      "comet.json"}
    assert not list(root.glob("star*"))
    meta = read_metadata(root / "comet.safetensors")
    assert meta["lora_studio.name"] == meta["ss_output_name"] == meta["modelspec.title"] == "comet"
    after, _ = load_safetensors(root / "comet.safetensors")
    assert after.keys() == before.keys() and all((after[k] == before[k]).all() for k in before)  # same weights
    card = (root / "comet.md").read_text()
    assert card.startswith("# comet\n") and '--lora "comet:1' in card and "star:" not in card
    assert "`comet.json`" in card and "star.json" not in card
    assert json.loads((root / "comet.json").read_text())["activation text"] == "sks"
    assert 'name = "comet"' in (root / "comet.toml").read_text()
    assert TrainConfig.from_toml(root / "comet.toml").name == "comet"
    # a name with a space: the card's command still reads as one --lora value in a shell
    import shlex

    lib.rename("comet", "my comet")
    [cmd] = [ln for ln in (root / "my comet.md").read_text().splitlines() if "lora-studio generate" in ln]
    argv = shlex.split(cmd)
    assert argv[argv.index("--lora") + 1] == "my comet:1" and "sks" in argv[argv.index("--prompt") + 1]
    lib.rename("my comet", "comet")
    # the run folder (checkpoints, samples, log) follows, so its checkpoints and final adapter go together
    assert not (root / "runs" / "star").exists()
    assert (root / "runs" / "comet" / "checkpoints" / "step-000001" / "adapter.safetensors").is_file()
    assert (root / "runs" / "comet" / "log.csv").is_file()


def test_rename_onto_an_existing_run_folder_is_refused_and_changes_nothing(trained):
    lib, _ = trained
    (lib.root / "runs" / "comet").mkdir()
    with pytest.raises(ConfigError, match="runs.*comet|comet.*already exists"):
        lib.rename("star", "comet")
    assert (lib.root / "star.safetensors").is_file() and (lib.root / "runs" / "star").is_dir()
    assert read_metadata(lib.root / "star.safetensors")["lora_studio.name"] == "star"
