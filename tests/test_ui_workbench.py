"""The Train and Library tabs as a hobbyist's workbench: captions follow the preset, errors stay readable,
too few images are flagged, a rename carries the name everywhere (handlers called without a browser)."""

from __future__ import annotations

import gradio as gr
import pytest
from PIL import Image

from app.studio import Studio
from app.ui import StudioUI, shown_in
from pipelines.weights_io import read_metadata


@pytest.fixture()
def ui(tmp_path, tiny_sd1_dir):
    u = StudioUI(Studio(home=tmp_path / "home", base=str(tiny_sd1_dir), device="cpu"))
    u.build()
    return u


def _images(folder, n, captions=()):
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.new("RGB", (32, 32), (40 * i % 255, 90, 200)).save(p)
        out.append(str(p))
    for i, text in captions:
        (folder / f"img{i}.txt").write_text(text)
        out.append(str(folder / f"img{i}.txt"))
    return out


def test_captions_follow_the_preset_but_keep_the_users_own(ui, tmp_path):
    files = _images(tmp_path / "up", 5, captions=[(4, "a zwx on a beach")])
    ds_id, _, _, caps, *_ = ui.stage_upload(files, "zwx", "concept", None)
    assert list(caps["caption"]) == ["a photo of zwx"] * 4 + ["a zwx on a beach"]
    caps.loc[1, "caption"] = "zwx, close-up"  # the user's own edit
    styled = ui.recaption_for_preset(caps, "style", "zwx")
    assert list(styled["caption"]) == ["in the style of zwx", "zwx, close-up", "in the style of zwx",
                                       "in the style of zwx", "a zwx on a beach"]
    assert list(ui.recaption_for_preset(styled, "concept", "zwx")["caption"])[:3] == [
        "a photo of zwx", "zwx, close-up", "a photo of zwx"]


def test_too_few_images_are_flagged(ui, tmp_path):
    _, _, skipped, *_ = ui.stage_upload(_images(tmp_path / "two", 2), "zwx", "concept", None)
    assert "Only 2 usable image(s): 4–30 work best" in skipped
    _, _, skipped, *_ = ui.stage_upload(_images(tmp_path / "six", 6), "zwx", "concept", None)
    assert "work best" not in skipped


def test_an_error_stays_on_the_page_and_clears_nothing(ui):
    """Wired with shown_in, a failing handler returns its message into a status pane and skips every other
    output (the gallery keeps its images), instead of a vanishing toast over panes that read 'Error'."""
    outputs = ["gallery", "files", "params", "seed", "paths", "warn", "info"]
    handler = shown_in(ui.generate, outputs, "info")
    req = ["a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", 1, 1.0, 0, "Latent", 0.7, None, 0.75, 4, None]
    slots = [None, True, 1.0, False, 1.0, False, 0, 0] * 4
    slots[0] = "no-such-adapter"
    out = handler(None, *req, False, *slots)
    assert len(out) == 7 and all(isinstance(o, dict) and o.get("__type__") == "update" and len(o) == 1
                                 for o in out[:6])  # gr.skip(): every other pane keeps what it showed
    assert out[6].startswith("<div class='ls-error' role='alert'>") and "no adapter named" in out[6]
    assert "no-such-adapter" in out[6]
    with pytest.raises(gr.Error):  # the handler's own Python API still raises
        ui.generate(None, *req, False, *slots)


def test_rename_in_the_library_tab_carries_the_name(ui, tmp_path, star_images, tiny_sd1_dir):
    from training.config import TrainConfig
    from training.trainer import train

    lib = ui.studio.library.root
    train(TrainConfig(images=str(star_images), base=str(tiny_sd1_dir), output_dir=str(lib), name="star",
                      max_steps=2, batch_size=2, rank=2, device="cpu", sample_steps=2, checkpoint_every=1))
    ui.rename_adapter("star", "comet")
    assert read_metadata(lib / "comet.safetensors")["lora_studio.name"] == "comet"
    assert "# comet" in ui.adapter_details("comet")
    assert "comet" in ui.studio.runs() and "star" not in ui.studio.runs()
