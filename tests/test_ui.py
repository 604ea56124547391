"""The browser app's handlers, without a browser: build the Blocks app, call the handler methods directly.

Covers issue 6 rows 1 (names, never paths), 2 (upload over the size limit), 16 (a second training waits
in the queue and sees its position), 17 (concurrent generate requests with different stacks) and 19
(`--share` without `--auth`).
"""

from __future__ import annotations

import io
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.options import check_launch_options
from app.studio import Studio
from app.ui import ADVANCED, PRESET_FIELDS, SLOTS, StudioUI, field_value, launch
from pipelines.adapters import lora_metadata, save_adapter
from pipelines.errors import ConfigError, DatasetError, UnsafeNameError
from pipelines.generation import GenerationRequest, parse_parameters, read_png_parameters
from pipelines.stack import StackEntry
from pipelines.weights_io import read_header
from training.config import PRESETS
from training.jobs import JobQueue

from jobs_helpers import FileGate
from lora_helpers import make_lora

# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture()
def gate(tmp_path):
    """Each job's process is a fake trainer that reports step 1 and blocks until released, so a second job
    must wait in the queue (jobs are processes: see tests/test_jobs.py for real ones)."""
    g = FileGate(tmp_path / "gate")
    yield g
    g.release.set()


@pytest.fixture()
def ui(tmp_path, tiny_sd1_dir, gate):
    studio = Studio(home=tmp_path / "home", base=str(tiny_sd1_dir), queue=JobQueue(command=gate), device="cpu")
    u = StudioUI(studio)
    u.build()
    return u


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_sd1_dir):
    """Two different LoRA files for the tiny SD1 base, as another tool would hand them over."""
    from pipelines.base_models import load_base

    d = tmp_path_factory.mktemp("loras")
    pipe = load_base(tiny_sd1_dir, device="cpu").pipe
    out = {}
    for name, seed, trig in (("alpha-style", 1, "ohwx"), ("beta-thing", 2, "sks")):
        sd = make_lora(pipe, rank=4, seed=seed, std=2.0)
        meta = lora_metadata(family="sd1", rank=4, alpha=4, name=name, trigger_word=trig)
        out[name] = save_adapter(sd, d / f"{name}.safetensors", meta)
    return out


REQ_TAIL = (1, 1.0, 0, "Latent", 0.7, None, 0.75, 4, None)  # clip skip; Hires off; no start; mask blur; VAE


def _form(ui: StudioUI, ds_id: str, captions, name: str, **kw) -> dict:
    """The Train tab's form as `start_training` takes it: one dict, field name -> widget value."""
    v = dict(images=ds_id, captions=captions, last_trigger="sks", name=name, trigger="sks", preset="concept",
             rank=4, alpha=None, max_steps=3, lr_unet=1e-3, lr_text=2e-4, train_text_encoder=False, prior=False,
             class_prompt="", num_class_images=4, resolution=None, seed=1, sample_prompts="", batch_size=2,
             sample_every=0, sample_steps=2, checkpoint_every=0, base=None, quantize_base="none (full precision)",
             preserve_weight=0, save_precision="fp32", shuffle_tags=False, caption_dropout=0)
    v.update(kw)
    return v


def _import(ui: StudioUI, path: Path, name: str = ""):
    return ui.import_adapter(str(path), name)


# ------------------------------------------------------------------------------------------------ launch options
def test_share_without_auth_is_refused(capsys):
    from app.cli import main

    assert main(["ui", "--share"]) == 2
    err = capsys.readouterr().err
    assert "--share" in err and "--auth user:password" in err
    with pytest.raises(ConfigError, match="--auth"):
        launch(Studio.__new__(Studio), share=True)  # refused before the app is built or served
    with pytest.raises(ConfigError, match="user:password"):
        check_launch_options(True, "no-colon")
    assert check_launch_options(True, "me:pa:ss") == ("me", "pa:ss")
    assert check_launch_options(False, None) is None


def test_no_arguments_starts_the_ui_on_localhost(monkeypatch):
    import app.ui
    from app.cli import main

    seen = {}
    monkeypatch.setattr(app.ui, "main_ui", lambda **kw: seen.update(kw) or 0)
    assert main([]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 7860 and seen["share"] is False and seen["base"] is None
    # the app's options work without naming the `ui` command too
    assert main(["--port", "8001", "--host", "0.0.0.0"]) == 0
    assert seen["port"] == 8001 and seen["host"] == "0.0.0.0"


# ------------------------------------------------------------------------------------------------ Train tab
def test_upload_shows_thumbnails_skipped_files_and_captions_with_trigger(ui, tmp_path):
    up = tmp_path / "up"
    up.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(up / f"img{i}.png")
    (up / "img0.txt").write_text("a blue square")
    (up / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    (up / "empty.jpg").write_bytes(b"")
    (up / ".DS_Store").write_bytes(b"\0\1")
    files = sorted(str(p) for p in up.iterdir())
    ds_id, thumbs, skipped, caps, last, sample_set, trig = ui.stage_upload(files, "zkx", "concept", None)
    assert [c for _, c in thumbs] == ["img0.png", "img1.png", "img2.png"]
    assert "3 image(s)" in skipped and "broken.png" in skipped and "empty.jpg" in skipped and ".DS_Store" in skipped
    assert "empty file" in skipped
    rows = dict(zip(caps["image"], caps["caption"]))
    assert rows["img0.png"] == "zkx, a blue square" and rows["img1.png"] == "a photo of zkx"
    assert last == trig == "zkx"
    # changing the trigger word swaps it in every caption, keeping the user's edits
    caps.loc[caps["image"] == "img1.png", "caption"] = "a photo of zkx, my edit"
    new_caps, last = ui.retrigger(caps, "zkx", "qwv")
    rows = dict(zip(new_caps["image"], new_caps["caption"]))
    assert rows["img0.png"] == "qwv, a blue square" and rows["img1.png"] == "a photo of qwv, my edit"
    # nothing usable: a readable error, not a traceback, and nothing staged is left behind
    before = set(ui.studio.datasets.iterdir())
    with pytest.raises(gr.Error, match="no usable training images"):
        ui.stage_upload([str(up / "broken.png")], "zkx", "concept", None)
    assert set(ui.studio.datasets.iterdir()) == before


def _dataset_zip(path: Path, members: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _png(colour=(200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_a_zipped_kohya_dataset_keeps_its_folders_repeats_and_trigger(ui, tmp_path):
    """A dataset folder prepared for kohya_ss, zipped and uploaded: its folders are kept (so their repeat counts
    and captions apply), the trigger word comes from the folder names, captions edited in the table are written
    into the right folder, and nothing of the zip lands outside the dataset."""
    z = _dataset_zip(tmp_path / "my set.zip", {
        "mydata/10_ohwx woman/0.png": _png(), "mydata/10_ohwx woman/1.png": _png((0, 0, 200)),
        "mydata/10_ohwx woman/1.txt": b"ohwx woman, smiling", "mydata/2_ohwx woman closeup/0.png": _png(),
        "mydata/2_ohwx woman closeup/0-masklabel.png": _png((255, 255, 255)),
        "__MACOSX/mydata/._0.png": b"junk", "mydata/.DS_Store": b"\0", "../escape.png": _png()})
    ds_id, thumbs, skipped, caps, last, sample_set, trig = ui.stage_upload([str(z)], "sks", "concept", None)
    assert trig == last == "ohwx"
    rows = dict(zip(caps["image"], caps["caption"]))
    assert rows == {"10_ohwx woman/0.png": "ohwx woman", "10_ohwx woman/1.png": "ohwx woman, smiling",
                    "2_ohwx woman closeup/0.png": "ohwx woman closeup"}
    assert "kohya" in skipped and "`10_ohwx woman`: 2 image(s) × 10" in skipped and "× 2" in skipped
    assert "1 mask file(s)" in skipped
    folder = ui.studio.dataset_folder(ds_id)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "10_ohwx woman/0.png", "10_ohwx woman/1.png", "10_ohwx woman/1.txt", "2_ohwx woman closeup/0-masklabel.png",
        "2_ohwx woman closeup/0.png"]
    assert not (tmp_path / "escape.png").exists() and not list(ui.studio.datasets.glob("*escape*"))
    caps.loc[caps["image"] == "10_ohwx woman/0.png", "caption"] = "ohwx woman, outdoors"
    cfg = ui.train_config(_form(ui, ds_id, caps, "kw", trigger="ohwx", last_trigger="ohwx"))
    assert (folder / "10_ohwx woman" / "0.txt").read_text().strip() == "ohwx woman, outdoors"
    from training.dataset import scan_folder

    assert {i.repeats for i in scan_folder(cfg.images, cfg.trigger).items} == {10, 2}
    assert ui.train_config(_form(ui, ds_id, caps, "kw", trigger="ohwx", last_trigger="ohwx",
                                 masked_loss=True)).masked_loss  # one image has a mask: the rest count whole
    # another kohya dataset replacing this one brings its own trigger word (the first one's was not typed)
    z2 = _dataset_zip(tmp_path / "second.zip", {"5_zkw man/0.png": _png()})
    *_, trig2 = ui.stage_upload([str(z2)], "ohwx", "concept", ds_id)
    assert trig2 == "zkw"
    ds_id = ui.stage_upload([str(z)], "ohwx", "concept", None)[0]
    # a name with a folder that leaves the dataset is refused
    with pytest.raises(UnsafeNameError):
        ui.studio.save_captions(ds_id, [("../x.png", "a")])


def test_masked_loss_without_masks_is_refused_at_start(ui, tmp_path):
    ds_id, _, _, caps, *_ = ui.stage_upload([str(_dataset_zip(tmp_path / "plain.zip", {"a.png": _png()}))], "sks",
                                            "concept", None)
    with pytest.raises(DatasetError, match="masked_loss: none of the 1 images uploaded has a mask"):
        ui.train_config(_form(ui, ds_id, caps, "m", masked_loss=True))
    assert not ui.train_config(_form(ui, ds_id, caps, "m")).masked_loss


def test_a_zipped_kohya_ss_project_trains_on_its_img_folder(ui, tmp_path):
    """kohya_ss' GUI keeps a project as img/, reg/, model/ and log/: zipped whole, its img/ folders are the
    training images (not the regularisation images or the samples in model/)."""
    z = _dataset_zip(tmp_path / "proj.zip", {
        "proj/img/40_zkw man/0.png": _png(), "proj/img/40_zkw man/1.png": _png((0, 0, 200)),
        "proj/reg/1_man/0.png": _png((9, 9, 9)), "proj/model/sample/s.png": _png((1, 2, 3))})
    ds_id, thumbs, skipped, caps, last, _, trig = ui.stage_upload([str(z)], "", "concept", None)
    assert trig == "zkw" and [c for _, c in thumbs] == ["40_zkw man/0.png", "40_zkw man/1.png"]
    assert "× 40" in skipped


def test_zip_names_written_as_utf8_without_the_flag_are_read_right(ui, tmp_path):
    """Many zip tools store UTF-8 names without marking them so (Python then reads them as cp437): the folder's
    caption and the trigger word keep their letters."""
    z = _dataset_zip(tmp_path / "accents.zip", {"10_zéw café/0.png": _png()})
    data = bytearray(z.read_bytes())
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # clear the UTF-8 flag (bit 11) in both headers
        i = data.find(sig)
        data[i + at + 1] &= ~0x08 & 0xFF
    z.write_bytes(bytes(data))
    *_, caps, _, _, trig = ui.stage_upload([str(z)], "sks", "concept", None)
    assert trig == "zéw" and list(caps["image"]) == ["10_zéw café/0.png"]


def test_a_bad_or_oversized_zip_is_refused_naming_it_and_leaves_nothing(ui, tmp_path, monkeypatch):
    import app.studio

    before = set(ui.studio.datasets.iterdir())
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\3\4 not really")
    with pytest.raises(gr.Error, match="broken.zip is not a readable .zip"):
        ui.stage_upload([str(bad)], "sks", "concept", None)
    monkeypatch.setattr(app.studio, "MAX_ZIP_BYTES", 1000)
    big = _dataset_zip(tmp_path / "big.zip", {f"{i}.png": _png((i, 0, 0)) for i in range(20)})
    with pytest.raises(gr.Error, match=r"big.zip unpacks to .* at most"):
        ui.stage_upload([str(big)], "sks", "concept", None)
    assert set(ui.studio.datasets.iterdir()) == before


def test_every_caption_is_edited_at_once_in_the_table(ui, tmp_path):
    up = tmp_path / "tagged"
    up.mkdir()
    for i, tags in enumerate(("red, square, watermark", "blue, circle", "red, circle, watermark")):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(up / f"{i}.png")
        (up / f"{i}.txt").write_text(tags)
    ds_id, _, _, caps, *_ = ui.stage_upload(sorted(str(p) for p in up.iterdir()), "zkx", "concept", None)
    assert "`zkx` 3 · `circle` 2 · `red` 2 · `watermark` 2" in ui.caption_tags(caps)
    caps, counts = ui.edit_all_captions("remove", caps, "watermark", "", "", "zkx")
    caps, counts = ui.edit_all_captions("front", caps, "1girl", "", "", "zkx")
    assert list(caps["caption"]) == ["zkx, 1girl, red, square", "zkx, 1girl, blue, circle", "zkx, 1girl, red, circle"]
    assert "watermark" not in counts and "`1girl` 3" in counts
    with pytest.raises(gr.Error, match="type the text to replace"):
        ui.edit_all_captions("replace", caps, "", "", "", "zkx")
    # what the table says is what trains: written beside the images at Start
    ui.train_config(_form(ui, ds_id, caps, "edited", trigger="zkx", last_trigger="zkx"))
    folder = ui.studio.dataset_folder(ds_id)
    assert (folder / "1.txt").read_text().strip() == "zkx, 1girl, blue, circle"


def test_sample_set_fills_trigger_preset_and_name(ui):
    ds_id, thumbs, skipped, caps, last, trig, preset, name, uploads, *fields = ui.pick_sample_set("concept-star", None)
    assert len(thumbs) == 12 and trig == last == "sks" and preset == "concept" and name == "concept-star-lora"
    # the preset's defaults arrive in the same response (no chained event that could overwrite typed values)
    opts = {o.name: o for o in ADVANCED}
    concept = {f: field_value(opts[f], v) for f, v in zip(PRESET_FIELDS, fields)}
    assert {f: PRESETS["concept"][f] for f in PRESETS["concept"]} == {f: concept[f] for f in PRESETS["concept"]}
    style = dict(zip(PRESET_FIELDS, ui.pick_sample_set("style-outline", ds_id)[9:]))
    assert {f: style[f] for f in PRESETS["style"]} == PRESETS["style"]
    # a field the concept preset set and the style preset does not goes back to its default, not concept's
    assert style["unet_targets"] == "to_q, to_k, to_v, to_out.0"
    assert all("sks" in c for c in caps["caption"])
    style = dict(zip(PRESET_FIELDS, ui.preset_defaults("style")))
    assert style["train_text_encoder"] is False  # style: UNet only
    assert all(isinstance(v, dict) for v in ui.preset_defaults("custom"))  # custom: leave the fields alone


def _start(ui: StudioUI, form: dict):
    """start_training -> (job id, status); the name-in-use choice is no start."""
    job_id, status, msg, box, *_ = ui.start_training(form)
    assert msg == "" and box.get("visible") is False, (msg, box)
    return job_id, status


def test_second_job_waits_and_reports_queue_position(ui, gate):
    ds_id, _, _, caps, *_ = ui.pick_sample_set("concept-star", None)
    id1, status1 = _start(ui, _form(ui, ds_id, caps, "first"))
    deadline = time.time() + 60  # a slow machine may take a while to start the first job
    while not gate.started and time.time() < deadline:
        time.sleep(0.02)
    assert gate.started == ["first"]
    id2, status2 = _start(ui, _form(ui, ds_id, caps, "second"))
    # the running job stays in view (its progress), the queued one is a line with its position
    assert "first" in status2 and "second</b> is waiting in the queue" in status2 and "position 1" in status2
    status, plot, samples, seen, done, *cont = ui.poll(id2, {})
    assert "first</b>: step 1/3" in status and "loss 0.5000" in status and list(plot["loss"]) == [0.5]
    assert "second</b> is waiting in the queue: position 1" in status and seen["job"] == id1
    assert isinstance(done, dict)  # still running: the library is not refreshed yet
    # the same name twice, or a name already in the library, is refused with a clear message
    with pytest.raises(gr.Error, match="already queued or running"):
        ui.start_training(_form(ui, ds_id, caps, "first"))
    id3, _ = _start(ui, _form(ui, ds_id, caps, "third"))
    assert "position 2" in ui.status_html(ui.studio.job(id3))
    # Stop on a page whose job waits while it shows another's run: its own job leaves the queue, the run goes on
    assert seen["job"] == id1
    status, *_ = ui.stop_training(id3, seen)
    assert "third" not in status and "first</b>: step 1/3" in status
    assert ui.studio.job(id3).state == "stopped" and ui.studio.job(id1).state == "running"
    gate.release.set()
    q = ui.studio.queue
    q.wait(q.get(id2), timeout=60)
    assert gate.started == ["first", "second"] and q.max_concurrent_seen == 1
    status, plot, samples, seen, done, *cont = ui.poll(id2, seen)
    assert "second</b> is ready" in status and done == f"{id2}:done"
    # a reopened page shows the latest job that ran ('third' left the queue before it started: nothing to show)
    assert ui.latest_job_id() == id2
    # every run can be picked to see its progress, loss and samples again: newest first, with its state
    picker = ui.run_choices(id2)
    assert [label for label, _ in picker["choices"]] == [f"{id3} · third · stopped", f"{id2} · second · done",
                                                         f"{id1} · first · done"]
    assert picker["value"] == id2
    # the earlier run picked to view: its status and loss are shown, the page's own job stays the page's
    assert ui.run_choices(id2, id1)["value"] == id1
    status, plot, samples, seen, *_ = ui.poll(id2, {}, id1)
    assert "first</b> is ready" in status and seen["job"] == id1


def test_bad_form_values_name_the_field(ui):
    ds_id, _, _, caps, *_ = ui.pick_sample_set("concept-star", None)
    with pytest.raises(gr.Error, match="rank"):
        ui.start_training(_form(ui, ds_id, caps, "x", rank=0))
    with pytest.raises(gr.Error, match="resolution"):
        ui.start_training(_form(ui, ds_id, caps, "x", resolution=60))
    with pytest.raises(gr.Error, match="upload some images"):
        ui.start_training(_form(ui, None, caps, "x"))
    with pytest.raises(gr.Error, match="class prompt"):
        ui.start_training(_form(ui, ds_id, caps, "x", prior=True))
    with pytest.raises(gr.Error, match="preserve_weight"):
        ui.start_training(_form(ui, ds_id, caps, "x", preserve_weight=-1))
    assert ui.train_config(_form(ui, ds_id, caps, "y", preserve_weight=2.5)).preserve_weight == 2.5
    assert ui.train_config(_form(ui, ds_id, caps, "y", save_precision="fp16")).save_precision == "fp16"
    tagged = ui.train_config(_form(ui, ds_id, caps, "y", shuffle_tags=True, caption_dropout=0.1))
    assert tagged.shuffle_tags and tagged.keep_tokens == 1 and tagged.caption_dropout == 0.1
    with pytest.raises(gr.Error, match="caption_dropout"):
        ui.start_training(_form(ui, ds_id, caps, "x", caption_dropout=1.5))
    with pytest.raises(gr.Error, match="save_precision"):
        ui.start_training(_form(ui, ds_id, caps, "x", save_precision="fp8"))
    if not torch.cuda.is_available():
        with pytest.raises(gr.Error, match="quantize_base: 'nf4' .* needs a CUDA GPU"):
            ui.start_training(_form(ui, ds_id, caps, "x", quantize_base="nf4"))


def test_quantized_base_choice_reaches_the_config(ui):
    pytest.importorskip("torchao")
    ds_id, _, _, caps, *_ = ui.pick_sample_set("concept-star", None)
    form = _form(ui, ds_id, caps, "q", quantize_base="int8")
    assert ui.train_config(form).quantize_base == "int8"
    assert ui.train_config(_form(ui, ds_id, caps, "q")).quantize_base is None


# ------------------------------------------------------------------------------------------------ names, never paths
@pytest.mark.parametrize("bad", ["../outside", "/etc/passwd", "a/../../b", "..", "sub/dir", "x\x00y"])
def test_names_from_the_browser_never_reach_outside(ui, tmp_path, bad):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"keep me")
    for handler in (ui.download_adapter, ui.export_kohya, ui.ask_delete, ui.confirm_delete, ui.adapter_details):
        with pytest.raises(gr.Error):
            handler(bad)
    with pytest.raises(gr.Error):
        ui.rename_adapter(bad, "new")
    with pytest.raises(gr.Error):
        ui.pick_sample_set(bad, None)
    with pytest.raises(gr.Error):  # a base model is picked by name from the list, never opened as a path
        ui.generate(bad, "a sks", "", 2, 3.0, 1, 0, 0, 1, "Euler", *REQ_TAIL, False,
                    *([None, False, 1.0, False, 1.0, False, 0, 0] * 4))
    ds_id, _, _, caps, *_ = ui.pick_sample_set("concept-star", None)
    caps.loc[0, "image"] = bad if bad else "x"
    with pytest.raises(gr.Error):  # a caption row naming a file outside the dataset
        ui.start_training(_form(ui, ds_id, caps, "n1"))
    assert outside.read_bytes() == b"keep me"
    assert not (tmp_path / "outside.txt").exists()


def test_symlink_out_of_the_library_is_refused(ui, tmp_path, lora_files):
    target = tmp_path / "elsewhere.safetensors"
    target.write_bytes(Path(lora_files["alpha-style"]).read_bytes())
    (ui.studio.library.root / "sneaky.safetensors").symlink_to(target)
    for handler in (ui.download_adapter, ui.export_kohya, ui.confirm_delete):
        with pytest.raises(gr.Error, match="outside"):
            handler("sneaky")
    assert target.is_file()
    assert "sneaky" not in ui.adapter_names()


def test_symlinked_model_card_and_preview_are_never_shown(ui, tmp_path, lora_files):
    secret = tmp_path / "private.md"
    secret.write_text("my private notes")
    picture = tmp_path / "private.png"
    Image.new("RGB", (8, 8), "red").save(picture)
    _import(ui, lora_files["alpha-style"])
    root = ui.studio.library.root
    (root / "alpha-style.md").symlink_to(secret)
    (root / "alpha-style.png").symlink_to(picture)
    assert "my private notes" not in ui.adapter_details("alpha-style")
    details = ui.adapter_details("alpha-style")  # what the file says instead, as `loras info` gives it
    assert "No model card" in details and "**trigger**: ohwx" in details
    assert "**network**: LoRA rank 4, alpha 4;" in details and "**hash**: " in details
    cards, *_ = ui.refresh_adapters(ui.base_names()[0], None, None, None, None, None, None, None)
    assert [Path(p).name for p, _ in cards] != ["alpha-style.png"]
    assert all(Path(p).resolve() != picture.resolve() for p, _ in cards)


# ------------------------------------------------------------------------------------------------ Library tab
def test_an_adapter_with_a_trained_word_hands_its_embedding_over(ui, lora_files, tmp_path):
    """A pivotal-tuned adapter (a bundled embedding): the Library says so, and Download / Export add the word's
    embedding file for ComfyUI, which reads no bundled embedding."""
    from pipelines.adapters import export_kohya
    from pipelines.weights_io import load_safetensors, save_safetensors

    src = export_kohya(lora_files["beta-thing"], tmp_path / "piv.safetensors")
    sd, meta = load_safetensors(src)
    width = next(v.shape[1] for k, v in sd.items() if k.startswith("lora_te_") and k.endswith("lora_down.weight"))
    sd["bundle_emb.sks.string_to_param.*"] = torch.randn(2, width)
    save_safetensors(sd, src, meta)
    _import(ui, src)
    assert "**embedding**: sks (2 vectors)" in ui.adapter_details("piv")
    files, note = ui.download_adapter("piv")
    assert [Path(p).name for p in files["value"]] == ["piv.safetensors", "sks.safetensors"]
    assert "ComfyUI" in note and "embedding:sks" in note
    emb, _ = load_safetensors(files["value"][1])
    torch.testing.assert_close(emb["emb_params"], sd["bundle_emb.sks.string_to_param.*"])
    files, msg = ui.export_kohya("piv")
    assert [Path(p).name for p in files["value"]][-1] == "sks.safetensors" and "embedding:sks" in msg
    # its word is offered to insert into the prompt, marked as the trained embedding
    labels = [c[0] for c in ui.trigger_choices("piv", True)["choices"]]
    assert "sks  (piv, its trained embedding)" in labels
    # a plain adapter's download stays the file alone, without a note
    _import(ui, lora_files["alpha-style"])
    assert ui.download_adapter("alpha-style")[1] == ""


# ------------------------------------------------------------------------------------------------ Library tab
def test_import_rename_export_delete_round_trip(ui, lora_files):
    msg, pick, cleared_file, cleared_name = _import(ui, lora_files["alpha-style"])
    assert "alpha-style" in msg and pick["value"] == "alpha-style"
    base = ui.base_names()[0]
    cards, table, hint, *_ = ui.refresh_adapters(base, None, None, None, None, None, None, None)
    assert list(table["name"]) == ["alpha-style"] and list(table["trigger"]) == ["ohwx"]
    assert "SD 1.x" in table["base"][0] and "⚠" not in table["base"][0]
    assert "1 adapter" in hint and len(cards) == 1
    # the same name again is refused; a new name works
    with pytest.raises(gr.Error, match="already exists"):
        _import(ui, lora_files["alpha-style"])
    _import(ui, lora_files["alpha-style"], "copy")
    msg, pick, _ = ui.rename_adapter("copy", "renamed")
    assert pick["value"] == "renamed" and set(ui.adapter_names()) == {"alpha-style", "renamed"}
    with pytest.raises(gr.Error, match="already exists"):
        ui.rename_adapter("renamed", "alpha-style")
    with pytest.raises(gr.Error, match="new name: type the adapter's new name"):
        ui.rename_adapter("renamed", "  ")
    with pytest.raises(gr.Error, match="already this adapter's name"):
        ui.rename_adapter("renamed", "renamed")
    [out] = ui.export_kohya("renamed")[0]["value"]
    keys = [k for k in read_header(out)[0] if k != "__metadata__"]
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    # a download is always in kohya's layout (what AUTOMATIC1111 and ComfyUI map completely): an imported
    # peft-format file comes as a converted copy, a kohya-layout library file as itself
    [path] = ui.download_adapter("renamed")[0]["value"]
    keys = [k for k in read_header(path)[0] if k != "__metadata__"]
    assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    _import(ui, Path(out), "as-kohya")
    assert ui.download_adapter("as-kohya")[0]["value"] == [str(ui.studio.library.root / "as-kohya.safetensors")]
    # with AUTOMATIC1111's user metadata beside it (as training writes it), the download and export carry it
    (ui.studio.library.root / "as-kohya.json").write_text('{"activation text": "ohwx"}')
    assert [Path(p).name for p in ui.download_adapter("as-kohya")[0]["value"]] == ["as-kohya.safetensors",
                                                                                 "as-kohya.json"]
    assert [Path(p).suffix for p in ui.export_kohya("as-kohya")[0]["value"]] == [".safetensors", ".json"]
    ui.confirm_delete("as-kohya")
    box, question = ui.ask_delete("renamed")
    assert box["visible"] is True and "cannot be undone" in question
    assert ui.cancel_delete()[0]["visible"] is False and "renamed" in ui.adapter_names()
    msg, box, pick = ui.confirm_delete("renamed")
    assert box["visible"] is False and ui.adapter_names() == ["alpha-style"]
    # not a LoRA at all: a clear message naming the file
    junk = Path(path).with_name("junk.safetensors")
    junk.write_bytes(b"\0" * 64)
    with pytest.raises(gr.Error, match="junk.safetensors") as err:
        _import(ui, junk)
    assert str(junk.parent) not in str(err.value)  # the server's upload folder is no business of the browser


def test_resize_from_the_library_adds_a_smaller_copy(ui, lora_files):
    _import(ui, lora_files["beta-thing"])
    msg, pick = ui.resize_adapter("beta-thing", 2, 0, "")
    assert pick["value"] == "beta-thing-r2" and "layers at rank 2" in msg
    info = ui.studio.library.info("beta-thing-r2")
    assert info.rank == 2 and info.trigger_word == "sks" and info.size < ui.studio.library.info("beta-thing").size
    # a share to keep instead of a rank; a name in use is refused before any work
    msg, pick = ui.resize_adapter("beta-thing", 0, 50, "half")
    assert pick["value"] == "half"
    assert float(re.search(r"keeps at least ([\d.]+)%", msg).group(1)) >= 50
    with pytest.raises(gr.Error, match="already exists"):
        ui.resize_adapter("beta-thing", 2, 0, "half")
    with pytest.raises(gr.Error, match="rank: give a rank"):
        ui.resize_adapter("beta-thing", 0, 0, "none")
    with pytest.raises(gr.Error, match="pick the adapter"):
        ui.resize_adapter(None, 2, 0, "")


def test_extract_a_lora_from_a_tuned_model_in_the_models_folder(ui, tiny_sd1_dir):
    """A 'fine-tune' that moved two attention projections by rank-2 updates: the extracted adapter holds exactly
    those two layers, at rank 2, keeping all of each change."""
    from pipelines.base_models import load_base

    tuned = load_base(tiny_sd1_dir, device="cpu")
    g = torch.Generator().manual_seed(0)
    moved = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"]
    with torch.no_grad():
        for name in moved:
            w = tuned.pipe.unet.get_submodule(name).weight
            w += torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
    tuned.pipe.save_pretrained(ui.studio.models_dir / "my-finetune")
    names = ui.refresh_extract_models(None, None)
    assert "my-finetune" in names[0]["choices"]
    default = ui.base_names()[0]
    msg, pick = ui.extract_adapter("my-finetune", default, 8, 0, 0, "from-finetune")
    assert pick["value"] == "from-finetune" and "2 layers at rank 2" in msg and "100.0%" in msg
    info = ui.studio.library.info("from-finetune")
    assert info.num_layers == 2 and info.family == "sd1"
    with pytest.raises(gr.Error, match="already exists"):
        ui.extract_adapter("my-finetune", default, 8, 0, 0, "from-finetune")
    with pytest.raises(gr.Error, match="same model"):
        ui.extract_adapter(default, default, 8, 0, 0, "x")
    with pytest.raises(gr.Error, match="name: type a name"):
        ui.extract_adapter("my-finetune", default, 8, 0, 0, " ")


def test_a_generated_image_becomes_an_adapters_preview(ui, lora_files):
    _import(ui, lora_files["alpha-style"])
    base = ui.base_names()[0]
    paths = ui.generate(base, "a red circle", "", 2, 3.0, 5, 0, 0, 2, "Euler", *REQ_TAIL, False,
                        *_slots(("alpha-style", 0.8)))[4]
    msg, _ = ui.set_preview("alpha-style", 1, paths)  # the second image, picked in the gallery
    assert "Preview of **alpha-style** set" in msg
    preview = ui.studio.library.info("alpha-style").preview
    assert preview is not None and Image.open(preview).tobytes() == Image.open(paths[1]).convert("RGB").tobytes()
    with pytest.raises(gr.Error, match="generate an image first"):
        ui.set_preview("alpha-style", 0, [])
    with pytest.raises(gr.Error, match="pick the adapter"):
        ui.set_preview(None, 0, paths)


def test_the_generate_tabs_stack_saves_as_one_adapter(ui, lora_files):
    """Rows and prompt tags at their weights, baked into one library adapter that draws what the stack draws;
    at a rank, its best approximation; a step range cannot be baked and says so."""
    _import(ui, lora_files["alpha-style"])
    _import(ui, lora_files["beta-thing"])
    base = ui.base_names()[0]
    rows = _slots(("alpha-style", 0.8))
    prompt = "a red circle <lora:beta-thing:0.5>"
    msg, _ = ui.bake_stack(base, prompt, "both", 0, *rows)
    assert "Saved the stack as **both**" in msg and "exact, rank 8" in msg
    args = ("", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL, False)
    stacked = ui.generate(base, prompt, *args, *rows)[4][0]
    baked = ui.generate(base, "a red circle <lora:both:1>", *args, *_slots())[4][0]
    diff = np.abs(np.asarray(Image.open(stacked), dtype=np.int16) - np.asarray(Image.open(baked), dtype=np.int16))
    assert diff.max() <= 2  # the same image, up to float rounding of the summed factors
    msg, _ = ui.bake_stack(base, prompt, "both-r2", 2, *rows)
    assert "layers at rank 2" in msg and ui.studio.library.info("both-r2").rank == 2
    with pytest.raises(gr.Error, match="step range"):
        ui.bake_stack(base, "x <lora:beta-thing:1:start=2>", "ranged", 0, *_slots())
    with pytest.raises(gr.Error, match="already exists"):
        ui.bake_stack(base, prompt, "both", 0, *rows)
    with pytest.raises(gr.Error, match="enable an adapter"):
        ui.bake_stack(base, "x", "nothing", 0, *_slots())
    assert "ranged" not in ui.adapter_names() and "nothing" not in ui.adapter_names()


def test_an_upload_brings_the_adapters_preview_and_a1111_json_along(ui, lora_files, tmp_path):
    """civitai downloads and AUTOMATIC1111 folders keep a preview image and user metadata beside the file:
    uploaded together (each in its own upload folder, as Gradio stores them) they come along, renamed with it."""
    import json

    ups = [tmp_path / f"u{i}" for i in range(4)]
    for d in ups:
        d.mkdir()
    lora = ups[0] / "Cool Style.safetensors"
    shutil.copyfile(lora_files["beta-thing"], lora)
    Image.new("RGB", (8, 8), "blue").save(ups[1] / "Cool Style.preview.png")
    (ups[2] / "Cool Style.json").write_text(json.dumps({"activation text": "zzq"}))
    Image.new("RGB", (8, 8), "red").save(ups[3] / "unrelated.png")
    msg, pick, *_ = ui.import_adapter([str(ups[1] / "Cool Style.preview.png"), str(lora),
                                       str(ups[2] / "Cool Style.json"), str(ups[3] / "unrelated.png")], "cool")
    root = ui.studio.library.root
    assert (root / "cool.safetensors").is_file() and (root / "cool.preview.png").is_file()
    assert json.loads((root / "cool.json").read_text())["activation text"] == "zzq"
    assert not (root / "unrelated.png").exists() and "Not taken" in msg and "unrelated.png" in msg
    assert ui.studio.library.info("cool").preview == root / "cool.preview.png"
    assert not list(ui.studio.home.glob(".import-*"))  # the staging folder is gone
    with pytest.raises(gr.Error, match="one adapter at a time"):
        ui.import_adapter([str(lora), str(lora_files["alpha-style"])], "")
    with pytest.raises(gr.Error, match="choose a .safetensors LoRA file"):
        ui.import_adapter([str(ups[3] / "unrelated.png")], "")


def test_badge_when_adapter_does_not_fit_the_base(ui, tmp_path, tiny_sd2_dir, lora_files):
    _import(ui, lora_files["beta-thing"])
    (ui.studio.models_dir / "sd2-model").symlink_to(tiny_sd2_dir, target_is_directory=True)
    assert "sd2-model" not in ui.base_names()  # a link out of the models folder is not offered
    shutil.copytree(tiny_sd2_dir, ui.studio.models_dir / "sd2-copy")
    assert "sd2-copy" in ui.base_names()
    _, table, *_ = ui.refresh_adapters("sd2-copy", None, None, None, None, None, None, None)
    assert "⚠" in table["base"][0] and "SD 2.x" in table["base"][0]


def test_first_refresh_lists_without_undoing_a_pick(ui, lora_files):
    """The page's first refresh carries the pickers' values from before the user could pick; it updates the
    lists only, so a pick made meanwhile stays. A later refresh clears a pick that left the library."""
    _import(ui, lora_files["alpha-style"])
    base = ui.base_names()[0]
    first = ui.first_refresh(base, None, None, None, None, None, None, None)
    later = ui.refresh_adapters(base, "gone", None, None, "alpha-style", None, None, None)
    for upd in (first[3], first[4], *first[6:]):
        assert upd["choices"] and "value" not in upd  # choices as (label, value) pairs or names
    assert later[3]["value"] is None and later[6]["value"] == "alpha-style"


def test_picking_an_adapter_takes_the_step_range_its_card_suggests(ui, lora_files, tmp_path):
    """An adapter whose end-of-training check suggested a start (metadata "10/20") ticks *steps* in its row with
    the start scaled to the current step count; one without a suggestion clears the row's range."""
    from pipelines.adapters import SUGGESTED_START_KEY
    from pipelines.weights_io import load_safetensors

    sd, meta = load_safetensors(lora_files["alpha-style"])
    save_adapter(sd, tmp_path / "ranged.safetensors", {**meta, SUGGESTED_START_KEY: "10/20"})
    _import(ui, tmp_path / "ranged.safetensors")
    _import(ui, lora_files["beta-thing"])
    ticked, start, stop, card = ui.slot_picked("ranged", 20)
    assert ticked["value"] is True and start["value"] == 10 and "model card: 10 of 20" in start["label"]
    assert stop["value"] == 0 and card == 10
    assert ui.slot_picked("ranged", 30)[1]["value"] == 15
    ticked, start, _, card = ui.slot_picked("beta-thing", 20)
    assert ticked["value"] is False and start["value"] == 0 and "model card" not in start["label"] and card is None
    assert ui.slot_picked(None, 20)[0]["value"] is False
    # a new step count rescales a start the card gave; one the user edited, or an unticked row, stays
    rows = ["ranged", True, 10, 10, "ranged", True, 7, 10, "ranged", False, 10, 10, None, False, 0, None]
    out = ui.steps_changed(40, *rows)
    assert out[0]["value"] == 20 and "model card: 20 of 40" in out[0]["label"] and out[1] == 20
    assert out[2:] == [gr.skip()] * 6 and out[0] != gr.skip()
    assert ui.studio.library.info("ranged").suggested_start(1) is None  # no later step to start from
    # the comparison grid's adapter follows the first pick in a row, never replacing one chosen there
    assert ui.compare_default("ranged", None) == "ranged"
    assert ui.compare_default("ranged", "beta-thing") == gr.skip() and ui.compare_default(None, None) == gr.skip()


# ------------------------------------------------------------------------------------------------ Generate tab
def _slots(*entries):
    vals = []
    for i in range(4):
        if i < len(entries):
            name, w = entries[i]
            vals += [name, True, w, False, 1.0, False, 0, 0]
        else:
            vals += [None, True, 1.0, False, 1.0, False, 0, 0]
    return vals


def _value(update):
    return update["value"] if isinstance(update, dict) else update


def test_hires_fix_and_img2img_from_the_form(ui, lora_files, tmp_path):
    """The Hires fix settings make a larger picture that "Use these parameters" brings back (the accordion
    opened); "Start from this image" puts a result in as the starting image, which Generate then draws from."""
    base = ui.base_names()[0]
    hires = (1, 2.0, 3, "Lanczos", 0.5, None, 0.75, 4, None)
    made = ui.generate(base, "a red circle", "", 2, 3.0, 7, 0, 0, 2, "Euler", *hires, False, *_slots())
    paths = made[1]
    assert [Image.open(p).size for p in paths] == [(64, 64)] * 2
    out = ui.recall_form(read_png_parameters(paths[0]), base)
    assert out[9:13] == (2.0, 3, "Lanczos", 0.5) and out[13]["open"] is True
    assert ui.start_from(0, [])[2].startswith("Generate an image first")
    _import(ui, lora_files["alpha-style"])  # a grid with the Hires fix records the first pass's size, as A1111
    grid = ui.compare("adapter weights", base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *hires,
                      "alpha-style", "0, 1", None, *_slots())[0]
    assert parse_parameters(read_png_parameters(grid))["Size"] == "32x32"
    value, acc, said = ui.start_from(1, paths)
    path = value["background"]
    assert path == paths[1] and value["layers"] == [] and acc["open"] is True and "Starting image set" in said
    moved = ui.generate(base, "a blue square", "", 4, 3.0, 7, 0, 0, 1, "Euler", 1, 1.0, 0, "Latent", 0.7, path, 0.5,
                        4, None, False, *_slots())[1][0]
    assert Image.open(moved).size == (32, 32)  # the model's size: the starting picture is stretched to it
    assert parse_parameters(read_png_parameters(moved))["Denoising strength"] == "0.5"  # the img2img slider's
    # paint over a part of the starting picture in the editor: only that part is drawn anew (inpainting)
    start = Image.open(path).convert("RGB").resize((32, 32))
    layer = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 16, 32))  # the brush's strokes over the left half
    editor = {"background": start, "layers": [layer], "composite": start}
    painted = ui.generate(base, "a blue square", "", 4, 3.0, 7, 0, 0, 1, "Euler", 1, 1.0, 0, "Latent", 0.7, editor,
                          0.9, 0, None, False, *_slots())[1][0]
    got = np.asarray(Image.open(painted), dtype=np.int16)
    assert np.array_equal(got[:, 16:], np.asarray(start, dtype=np.int16)[:, 16:])  # unpainted: kept exactly
    assert parse_parameters(read_png_parameters(painted))["Mask blur"] == "0"
    unpainted = {"background": start, "layers": [Image.new("RGBA", (32, 32))], "composite": start}
    plain = ui.generate(base, "a blue square", "", 4, 3.0, 7, 0, 0, 1, "Euler", 1, 1.0, 0, "Latent", 0.7, unpainted,
                        0.9, 0, None, False, *_slots())[1][0]
    assert "Mask blur" not in read_png_parameters(plain)  # nothing painted: plain img2img
    with pytest.raises(gr.Error, match="hires_scale: Hires fix enlarges an image made from the prompt"):
        ui.generate(base, "x", "", 2, 3.0, 7, 0, 0, 1, "Euler", 1, 2.0, 0, "Latent", 0.7, path, 0.5, 4, None, False, *_slots())


def test_an_images_parameters_fill_the_form_and_make_it_again(ui, lora_files, tmp_path):
    """PNG Info → Send to txt2img: the parameters of a made image (read from the file, or pasted) fill the
    form, its adapters go into the rows with their weights and step ranges, and Generate makes the same image."""
    _import(ui, lora_files["alpha-style"])
    _import(ui, lora_files["beta-thing"])
    base = ui.base_names()[0]
    rows = _slots(("alpha-style", 0.8), ("beta-thing", 0.5))
    rows[5:8] = [True, 1, 0]  # alpha-style from step 1
    rows[8 + 3:8 + 5] = [True, 0.2]  # beta-thing: text encoder at 0.2
    made = ui.generate(base, "a red circle", "dark", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL, False, *rows)[1][0]
    text, said = ui.read_image_parameters(made)
    assert text == read_png_parameters(made) and "Use these parameters" in said
    out = ui.recall_form(text, base)
    prompt, negative, steps, guidance, scheduler, seed, width, height, clip_skip = out[:9]
    *hires, hires_open, vae, base_pick = out[9:16]
    slots, cards, msg = out[16:16 + 8 * SLOTS], out[16 + 8 * SLOTS:16 + 9 * SLOTS], out[-1]
    assert out[-8:-5] == (-1, 0.0, gr.skip())  # no variation seed recorded: the box is cleared, the strength off
    assert out[-5] is False  # nor Tiling: the box is unticked
    assert out[-4:-1] == (0.0, False, gr.skip())  # nor CFG rescale or a zero-SNR schedule
    assert vae == "Automatic"  # no VAE recorded: the model's own
    assert hires[:3] == [1.0, 0, "Latent"] and hires[3] == gr.skip() and hires_open == gr.skip()  # no Hires fix
    hires[3] = 0.7
    assert (prompt, negative, steps, guidance, scheduler, seed) == ("a red circle", "dark", 2, 3.0, "Euler", 7)
    assert clip_skip == 1
    assert _value(base_pick) == base  # the recorded model is the one here
    slots = [_value(v) for v in slots]
    assert slots[:8] == ["alpha-style", True, 0.8, False, 0.8, True, 1, 0]
    assert slots[8:16] == ["beta-thing", True, 0.5, True, 0.2, False, 0, 0]
    assert slots[16] is None and list(cards) == [None] * SLOTS and "seed 7" in msg
    again = ui.generate(base, prompt, negative, steps, guidance, seed, width, height, 1, scheduler, clip_skip, *hires, None, 0.75, 4, vae, False,
                        *slots)[1][0]
    assert Image.open(again).tobytes() == Image.open(made).tobytes()
    # pasted from elsewhere: an adapter that is not here stays a tag in the prompt, and the notes say what differs
    # (and a weight beyond the row's sliders stays a tag too)
    pasted = ("a cat <lora:alpha-style:0.5> <lora:not-here:1> <lora:beta-thing:3>\nSteps: 3, Sampler: Euler a, "
              "CFG scale: 5, Seed: 9, Size: 64x64, Model: juggernaut, Clip skip: 2")
    with pytest.warns(UserWarning):
        out = ui.recall_form(pasted, base)
    assert out[0] == "a cat <lora:not-here:1> <lora:beta-thing:3>" and out[15] == gr.skip()
    assert out[8] == 2  # A1111's Clip skip fills the form's slider
    assert _value(out[16]) == "alpha-style" and _value(out[16 + 8]) is None
    assert "'not-here' is not in the library" in out[-1] and "juggernaut" in out[-1]
    assert "Clip skip" not in out[-1]  # applied, so not among what differs
    # block weights (the LoRA Block Weight extension's) have no field in a row: that adapter stays a tag
    out = ui.recall_form("a cat <lora:alpha-style:0.7:lbw=OUTD>\nSteps: 3, Seed: 9, Size: 64x64", base)
    assert out[0] == "a cat <lora:alpha-style:0.7:lbw=OUTD>" and _value(out[16]) is None
    with pytest.raises(gr.Error, match="not the parameters text"):
        ui.recall_form("just words", base)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    with pytest.raises(gr.Error, match="carries no generation parameters"):
        ui.read_image_parameters(str(plain))


def test_a_file_without_a_trigger_word_offers_its_training_tags(ui, lora_files, tmp_path):
    """A LoRA from civitai often records no trigger word, only kohya's tag counts of its captions: the Library and
    `loras info` list the most frequent tags, and the Generate tab offers the first three to insert."""
    import json

    from pipelines.adapters import adapter_facts
    from pipelines.weights_io import load_safetensors, save_safetensors

    sd, meta = load_safetensors(lora_files["alpha-style"])
    meta = {k: v for k, v in meta.items() if "trigger" not in k}
    meta["ss_tag_frequency"] = json.dumps({"10_zkw girl": {"zkw girl": 12, "smiling": 5, "outdoors": 2},
                                           "5_zkw girl closeup": {"zkw girl": 6, "portrait": 6, "smiling": 1},
                                           "broken": "not a dict"})
    path = tmp_path / "civitai-thing.safetensors"
    save_safetensors(sd, path, metadata=meta)
    _import(ui, path)
    info = ui.studio.library.info("civitai-thing")
    assert info.trigger_word == "" and info.training_tags(3) == [("zkw girl", 18), ("portrait", 6), ("smiling", 6)]
    facts = dict(adapter_facts(info))
    assert facts["training tags"].startswith("zkw girl (18), portrait (6), smiling (6), outdoors (2)")
    assert "most likely among the first" in facts["training tags"]
    choices = ui.trigger_choices("civitai-thing", True, None, True, None, True, None, True)["choices"]
    assert [v for _, v in choices] == ["zkw girl", "portrait", "smiling"]
    assert "a training tag" in choices[0][0]


def test_generate_saves_pngs_with_parameters_and_triggers(ui, lora_files):
    _import(ui, lora_files["alpha-style"])
    _import(ui, lora_files["beta-thing"])
    base = ui.base_names()[0]
    choices = ui.trigger_choices("alpha-style", True, "beta-thing", True, None, True, None, True)["choices"]
    assert [v for _, v in choices] == ["ohwx", "sks"]

    class Sel:
        value = "ohwx  (alpha-style)"

    assert ui.insert_trigger("a red circle", Sel())[0] == "a red circle, ohwx"
    # a sentence left open takes the word as its next one; tags ending in a comma get no second comma
    assert ui.insert_trigger("a red square in ", Sel())[0] == "a red square in ohwx"
    assert ui.insert_trigger("a photo of", Sel())[0] == "a photo of ohwx"
    assert ui.insert_trigger("red, square,", Sel())[0] == "red, square, ohwx"
    assert ui.insert_trigger("", Sel())[0] == "ohwx"
    assert ui.insert_trigger("ohwx style", Sel())[0] == "ohwx style"  # there already
    gallery, files, params, seed, paths, warn, info = ui.generate(
        base, "a red circle <lora:beta-thing:0.5>", "", 2, 3.0, 7, 0, 0, 2, "Euler", *REQ_TAIL, False,
        *_slots(("alpha-style", 0.8)))
    assert len(gallery) == 2 and seed == 7
    # each file is named after its own seed (AUTOMATIC1111's way): the second image of seed 7 is seed 8
    assert [Path(f).stem.split("-")[1] for f in files] == ["7", "8"]
    assert "Seed: 8" in read_png_parameters(files[1])
    p = Path(files[0])
    assert p.is_file() and p.is_relative_to(ui.studio.outputs)
    text = read_png_parameters(p)
    assert "Seed: 7" in text and "<lora:alpha-style:0.8>" in text and "<lora:beta-thing:0.5>" in text
    assert "Lora hashes" in text and "alpha-style" in info
    assert isinstance(warn, str)
    # fused: the same stack merged into the weights; unfusing restores the exact unfused result
    args = (base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL)
    plain = Image.open(ui.generate(*args, False, *_slots(("alpha-style", 0.8)))[1][0])
    fused = ui.generate(*args, True, *_slots(("alpha-style", 0.8)))
    assert "(fused)" in fused[-1]
    again = Image.open(ui.generate(*args, False, *_slots(("alpha-style", 0.8)))[1][0])
    assert plain.tobytes() == again.tobytes()
    # a step range on a row: the adapter acts from step 1 on (recorded as a tag); with Fuse it is refused
    ranged = _slots(("alpha-style", 0.8))
    ranged[5:8] = [True, 1, 0]
    late = ui.generate(*args, False, *ranged)
    assert "`<lora:alpha-style:0.8:start=1>`" in late[-1]
    assert "<lora:alpha-style:0.8:start=1>" in read_png_parameters(late[1][0])
    assert Image.open(late[1][0]).tobytes() != plain.tobytes()
    ranged[5] = False  # the box unticked: its numbers are ignored
    assert Image.open(ui.generate(*args, False, *ranged)[1][0]).tobytes() == plain.tobytes()
    # a start past the last step: made, and said
    past = list(ranged)
    past[5:8] = [True, 2, 0]
    with pytest.warns(UserWarning, match="past the last of the 2 sampler steps"):
        warn = ui.generate(*args, False, *past)[5]
    assert "Step range:" in warn and "start=2" in warn and "Interference" not in warn
    ranged[5:8] = [True, 1, 0]
    with pytest.raises(gr.Error, match="fuse: an adapter with a step range"):
        ui.generate(*args, True, *ranged)
    # two adapters that cancel each other: the interference warning is shown
    _import(ui, lora_files["alpha-style"], "alpha-copy")
    with pytest.warns(UserWarning, match="fight"):  # the toast (outside a request: a Python warning)
        warn = ui.generate(*args, False, *_slots(("alpha-style", 1.0), ("alpha-copy", -1.0)))[5]
    assert "Interference" in warn and "fight" in warn
    # comparison grid: one column per weight, labelled
    grid, grid_file, _ = ui.compare("adapter weights", base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL,
                                    "alpha-style", "0, 1", None, *_slots())
    with Image.open(grid) as im:
        assert im.width >= 2 * 128 and "alpha-style 0 | alpha-style 1" in im.info["parameters"]
    # the row's step range holds in every column of its weight grid (the axis says so)
    grid, *_ = ui.compare("adapter weights", base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL,
                          "alpha-style", "0, 1", None, *ranged)
    params = parse_parameters(read_png_parameters(grid))
    assert params["Grid stacks"] == "<lora:alpha-style:0:start=1> | <lora:alpha-style:1:start=1>"
    assert params["Grid"].startswith("alpha-style weight acting from step 1:")
    box = ui.compare_values_box("adapter start step", "0, 0.4, 0.8, 1.2")  # the box turns into steps
    assert box["label"].startswith("Start steps") and box["value"] == "0, 5, 10, 15"
    assert ui.compare_values_box("adapter weights", "0, 5")["label"] == "Weights"
    assert "value" not in ui.compare_values_box("checkpoints of a run", "0, 5")  # unused there: left alone
    grid, *_ = ui.compare("adapter start step", base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL,
                          "alpha-style", "0, 1", None, *_slots(("alpha-style", 0.8)))
    assert "<lora:alpha-style:0.8> | <lora:alpha-style:0.8:start=1>" in read_png_parameters(grid)
    with pytest.raises(gr.Error, match="start steps: 2 is outside 0..1"):
        ui.compare("adapter start step", base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL,
                   "alpha-style", "0, 2", None, *_slots())
    grid, *_ = ui.compare("enabled adapters, one at a time", base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL,
                          None, "", None, *_slots(("alpha-style", 0.8), ("beta-thing", 0.5)))
    assert "alpha-style 0.8 | beta-thing 0.5" in read_png_parameters(grid)
    # a second axis (A1111's X/Y plot): the compared adapters across, their weights down; shown on the page as
    # compare_shown takes the inputs (the rows' boxes before the adapter rows)
    form = (base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL, None, "", None)
    grid, _, _, status = ui.compare_shown("enabled adapters, one at a time", *form,
                                          "weights of the compared adapter", "0.5, 1", False, 0, False, "none", "",
                                          *_slots(("alpha-style", 0.8), ("beta-thing", 0.5)))
    p = parse_parameters(read_png_parameters(grid))
    assert p["Grid rows"] == "weight: weight 0.5 | weight 1" and status == ""
    assert p["Grid stacks"] == ("<lora:alpha-style:0.5> | <lora:beta-thing:0.5> | <lora:alpha-style:1> | "
                                "<lora:beta-thing:1>")
    with pytest.raises(gr.Error, match="the columns vary the adapter's weight already"):
        ui.compare("adapter weights", *form[:-3], "alpha-style", "0, 1", None, *_slots(),
                   rows="weights of the compared adapter", row_values="0.5")
    # A1111's X/Y plot axes: a setting across the columns, the enabled adapters in every tile
    assert ui.compare_values_box("CFG scales", "0, 1")["value"] == "3, 5, 7, 9"
    grid, *_ = ui.compare("CFG scales", base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL,
                          None, "3, 6", None, *_slots(("alpha-style", 0.8)))
    p = parse_parameters(read_png_parameters(grid))
    assert p["Grid"] == "CFG scale: CFG 3 | CFG 6" and p["Grid stacks"] == "<lora:alpha-style:0.8> | <lora:alpha-style:0.8>"
    # a third axis (A1111's X/Y/Z plot): one such grid per sampler, one under the other
    grid, _, _, status = ui.compare_shown("CFG scales", base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler",
                                          *REQ_TAIL, None, "3, 6", None, "none", "", False, 0, False, "samplers",
                                          "Euler a, DDIM", *_slots(("alpha-style", 0.8)))
    p = parse_parameters(read_png_parameters(grid))
    assert p["Grid z"] == "Sampler: Euler a | DDIM" and p["Grid"] == "CFG scale: CFG 3 | CFG 6" and status == ""
    with pytest.raises(gr.Error, match="z: the columns vary guidance already"):
        ui.compare_shown("CFG scales", base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL, None, "3",
                         None, "none", "", False, 0, False, "CFG scales", "5", *_slots())
    grid, *_ = ui.compare("samplers", base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL,
                          None, "Euler a, DDIM", None, *_slots())
    assert parse_parameters(read_png_parameters(grid))["Grid settings"] == "Sampler Euler a | Sampler DDIM"
    with pytest.raises(gr.Error, match="step counts: give at least one"):
        ui.compare("step counts", base, "x", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL, None, "", None, *_slots())
    # A1111's Prompt S/R: a word of the prompt swapped across the columns
    mode = "prompt words (Prompt S/R)"
    assert ui.compare_values_box(mode, "3, 5")["value"] == "red, blue, green"
    grid, *_ = ui.compare(mode, base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL, None,
                          "red, blue", None, *_slots(("alpha-style", 0.8)))
    assert parse_parameters(read_png_parameters(grid))["Grid"] == "Prompt S/R: red | blue"
    with pytest.raises(gr.Error, match="'green' .* is not in the prompt"):
        ui.compare(mode, base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL, None, "green, blue", None,
                   *_slots())
    ck = ui.studio.library.root / "runs" / "myrun" / "checkpoints" / "step-2"
    ck.mkdir(parents=True)
    shutil.copyfile(lora_files["beta-thing"], ck / "adapter.safetensors")
    (ck / "state.pt").write_bytes(b"")
    assert ui.studio.runs() == ["myrun"]
    grid, *_ = ui.compare("checkpoints of a run", base, "a red circle", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL, None, "",
                          "myrun", *_slots())
    assert "step 2" in read_png_parameters(grid)
    with pytest.raises(gr.Error, match="no training run"):
        ui.compare("checkpoints of a run", base, "x", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL, None, "", "nope", *_slots())
    with pytest.raises(gr.Error, match="weights"):
        ui.compare("adapter weights", base, "x", "", 2, 3.0, 7, 0, 0, 1, "Euler", *REQ_TAIL, "alpha-style", "0, 11", None,
                   *_slots())


def test_concurrent_generate_requests_do_not_cross_talk(ui, lora_files):
    """Issue 6 row 17: two requests with different stacks at once each get what their stack gives alone."""
    import numpy as np

    _import(ui, lora_files["alpha-style"])
    _import(ui, lora_files["beta-thing"])
    st = ui.studio
    req = GenerationRequest(prompt="a red circle", steps=3, guidance=3.0, seed=11, scheduler="Euler")
    stacks = {"a": [StackEntry("alpha-style", 1.0)], "b": [StackEntry("beta-thing", -1.0)]}
    alone = {k: np.asarray(st.generate(None, req, v).images[0].image) for k, v in stacks.items()}
    assert not np.array_equal(alone["a"], alone["b"])
    got: dict[str, list] = {"a": [], "b": []}

    def run(k):
        for _ in range(3):
            got[k].append(np.asarray(st.generate(None, req, stacks[k]).images[0].image))

    threads = [threading.Thread(target=run, args=(k,)) for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for k in stacks:
        assert len(got[k]) == 3 and all(np.array_equal(x, alone[k]) for x in got[k]), k


# ------------------------------------------------------------------------------------------------ upload size limit
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_upload_over_the_size_limit_is_refused_and_leaves_no_file(tmp_path, tiny_sd1_dir, gate):
    """Issue 6 row 2: the server refuses an upload over the limit (HTTP 413) and keeps no partial file."""
    studio = Studio(home=tmp_path / "home", base=str(tiny_sd1_dir), queue=JobQueue(command=gate), device="cpu")
    port = _free_port()
    app = launch(studio, port=port, max_file_size="4kb", prevent_thread_lock=True, quiet=True)
    url = app.local_url
    try:
        upload_dir = Path(app.server_app.uploaded_file_dir)
        before = set(upload_dir.rglob("*")) if upload_dir.exists() else set()
        r = httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files={"files": ("big.png", b"\0" * 20_000)},
                       timeout=30)
        assert r.status_code == 413 and "maximum allowed size" in r.text
        after = set(upload_dir.rglob("*")) if upload_dir.exists() else set()
        assert after == before
        ok = httpx.post(f"{url.rstrip('/')}/gradio_api/upload", files={"files": ("small.png", b"\0" * 100)},
                        timeout=30)
        assert ok.status_code == 200
        # only the app's own folders are served: a file elsewhere is not
        secret = tmp_path / "secret.txt"
        secret.write_text("no")
        for p in (secret, Path.cwd() / "pyproject.toml", studio.models_dir / "x.safetensors"):
            r = httpx.get(f"{url.rstrip('/')}/gradio_api/file={p}", timeout=30)
            assert r.status_code in (403, 404), p
        out = studio.outputs / "served.txt"
        out.write_text("yes")
        assert httpx.get(f"{url.rstrip('/')}/gradio_api/file={out.resolve()}", timeout=30).status_code == 200
    finally:
        app.close()


def test_the_command_serves_the_app_and_says_where(tmp_path, tiny_sd1_dir):
    """`lora-studio --port N` as a user runs it: the app answers at the printed address; Ctrl-C stops it."""
    import os
    import signal
    import subprocess
    import sys

    port = _free_port()
    env = {**os.environ, "LORA_STUDIO_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "--port", str(port), "--base", str(tiny_sd1_dir),
                             "--device", "cpu"], cwd=Path(__file__).resolve().parent.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # Ctrl-C as a terminal delivers it: a suite started in the background (`cmd &`)
                            # ignores SIGINT, and a child would inherit that and never see the key
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        lines = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Open "):
                break
        assert lines and lines[-1].startswith(f"Open http://127.0.0.1:{port}"), (lines, proc.poll())
        url = lines[-1].split()[1]
        assert httpx.get(url, timeout=30).status_code == 200
        assert "--share --auth" in proc.stdout.readline()  # how to reach it from elsewhere
        proc.send_signal(signal.SIGINT)
        # communicate drains both pipes while it waits: a full stderr pipe must not hold the exit up
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the app did not stop within 60 s of Ctrl-C; its output ends:\n{out[-2000:]}\n{err[-4000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "share=True" not in out + err  # not gradio's advice to edit code


def test_styles_apply_and_save_in_the_generate_tab(ui):
    """AUTOMATIC1111's styles: a styles.csv in the home shows in the picker; Apply merges the chosen styles into the
    prompt boxes (and clears the choice); Save adds the prompt boxes as a new style."""
    ui.studio.styles_file.write_text('name,prompt,negative_prompt\nClean,"sharp, clean",lowres\n'
                                     'Look,"{prompt} <lora:outline:0.8>",\n', encoding="utf-8")
    assert ui.refresh_styles(["Gone"])["choices"] == ["Clean", "Look"]
    prompt, negative, cleared = ui.apply_styles("a red circle", "", ["Look", "Clean"])
    assert prompt == "a red circle <lora:outline:0.8>, sharp, clean" and negative == "lowres"
    assert cleared["value"] == []
    with pytest.raises(gr.Error, match="pick one or more styles"):
        ui.apply_styles("x", "", [])
    picker, name_box = ui.save_style(" mine ", "a blue square", "blurry", ["Clean"])
    assert picker["choices"] == ["Clean", "Look", "mine"] and picker["value"] == ["Clean"] and name_box == ""
    with pytest.raises(gr.Error, match="already exists"):
        ui.save_style("MINE", "x", "", [])
    assert ui.apply_styles("", "", ["mine"])[:2] == ("a blue square", "blurry")
