"""The Train tab's form, generated from TrainConfig's field descriptions (issue 15): every option has a widget
or is set by the app, a value typed into any widget reaches the TrainConfig, the form is one dict; a run
that stopped or finished can be continued, and a name in use asks (resume, overwrite, new name) instead of
silently starting again beside the old checkpoints. Handlers called without a browser; jobs are queued, not
run (tests/test_jobs.py runs real ones)."""

from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr
import pytest

from app.studio import Studio
from app.ui import ADVANCED, GROUPS, PRESET_FIELDS, StudioUI, elem_id, field_value, shown_in, unset_label
from pipelines.errors import ConfigError
from training.config import PRESETS, TrainConfig, train_options
from training.jobs import Job, JobQueue
from training.trainer import train


@pytest.fixture()
def ui(tmp_path, tiny_sd1_dir):
    studio = Studio(home=tmp_path / "home", base=str(tiny_sd1_dir), device="cpu", queue=JobQueue(worker=False))
    u = StudioUI(studio)
    u.build()
    return u


def _form(ui: StudioUI, name: str = "form-test", **kw) -> dict:
    ds_id, _, _, caps, *_ = ui.pick_sample_set("concept-star", None)
    if kw.get("masked_loss"):  # masked loss is refused at Start without any mask: one beside the first image
        from PIL import Image

        first = sorted(ui.studio.dataset_folder(ds_id).glob("*.png"))[0]
        Image.new("L", Image.open(first).size, 255).save(first.with_name(f"{first.stem}-masklabel.png"))
    form = {"images": ds_id, "captions": caps, "last_trigger": "sks", "name": name, "trigger": "sks",
            "preset": "concept", "base": None, "prior": False}
    form.update(kw)
    return form


# ------------------------------------------------------------------------------------------------ generated form
def test_every_option_has_a_widget_or_is_set_by_the_app(ui):
    widgets = ui.form_widgets
    for o in train_options():
        assert (o.name in widgets) == o.ui, f"{o.name}: ui={o.ui} but {'a' if o.name in widgets else 'no'} widget"
    assert {"captions", "last_trigger", "prior"} <= set(widgets)  # the form's own values, no field
    for o in ADVANCED:  # the Advanced section's widgets carry adv-<field> ids, labels and help from the field
        w = widgets[o.name]
        assert w.elem_id == elem_id(o) == "adv-" + o.name.replace("_", "-")
        assert o.label in w.label and w.info.startswith(o.help)
    # a section per group, in GROUPS order
    blocks = ui.demo.blocks.values()
    sections = [b.elem_id for b in blocks if isinstance(b, gr.Accordion) and (b.elem_id or "").startswith("adv-group")]
    expected = [g for g in GROUPS if any(o.group == g for o in ADVANCED)]
    assert len(sections) == len(expected) and sorted(sections) == sorted(
        "adv-group-" + "-".join("".join(c if c.isalnum() else " " for c in g.lower()).split()) for g in expected)


def _typed(o, default):
    """A value a user types into the option's widget (what the browser sends) and what the field should get."""
    if o.kind is bool:
        return (not default), (not default)
    if o.choices is not None:
        if o.name == "quantize_base":  # int8 needs torchao, nf4 CUDA: the unset choice here
            return unset_label(o), None
        other = next(c for c in reversed(o.choices) if c != default)
        return other, other
    if o.kind is list:
        if o.name == "optimizer_args":  # key=value lines, checked against the optimizer's (Lion's: above) signature
            return "\n  betas=0.9,0.98  \n\n", ["betas=0.9,0.98"]
        if o.list_style == "lines":
            return "a red sks\n\n  in a box  ", ["a red sks", "in a box"]
        return "to_q, to_v,to_k", ["to_q", "to_v", "to_k"]
    if o.kind is int:
        v = (o.min or 0) + 8 if o.max is None or o.max >= (o.min or 0) + 8 else o.max
        v = 24 if o.name == "resolution" else v
        return v, v
    if o.kind is float:
        v = 0.25 if o.below is not None else (default or 0.5) * 3
        if o.max is not None and v > o.max:  # a share (ti_frac): inside its range, away from the default
            v = o.max * 0.75
        return v, v
    v = "a drawing of {trigger}" if o.name == "instance_template" else "a shape"
    return v, v


@pytest.mark.parametrize("o", ADVANCED, ids=[o.name for o in ADVANCED])
def test_a_value_typed_into_each_generated_widget_reaches_the_config(ui, o):
    default = ui.form_widgets[o.name].value
    default = field_value(o, default) if o.kind is not list else default
    payload, want = _typed(o, default)
    value = ui.form_widgets[o.name].preprocess(payload)  # as Gradio hands the browser's value to the handler
    extra = {"prior": True} if o.name == "class_prompt" else {}
    extra.update({"train_text_encoder": True} if o.name == "lr_text" else {})
    # textual inversion trains no LoRA: ticked on the embedding preset (the concept preset's LoRA options refuse it)
    extra.update({"preset": "embedding"} if o.name == "textual_inversion" else {})
    cfg = ui.train_config(_form(ui, **extra, **{o.name: value}))
    assert getattr(cfg, o.name) == want
    if o.optional:  # emptied (a number box cleared, a text box emptied, the unset choice): unset
        empty = unset_label(o) if o.choices is not None else ("" if o.kind is str else None)
        cfg = ui.train_config(_form(ui, **{o.name: ui.form_widgets[o.name].preprocess(empty)}))
        assert getattr(cfg, o.name) is None


def test_saved_settings_load_back_into_every_field_and_train_from_a_terminal(ui, tmp_path):
    """kohya_ss's "Save/Open config": the Train form's settings saved as a .toml load back into every field
    (and an earlier adapter's NAME.toml does too), and `lora-studio train --config` reads the same file."""
    import tomllib

    from app.cli import parse_train_args
    from app.ui import SETTINGS_FIELDS

    typed = {}
    for o in ADVANCED:
        default = ui.form_widgets[o.name].value
        payload, want = _typed(o, field_value(o, default) if o.kind is not list else default)
        typed[o.name] = (ui.form_widgets[o.name].preprocess(payload), want)
    assert typed["network"][1] != "lora"  # LoHa / LoKr have no LoRA dropout: that field keeps 0 with them
    typed["dropout"] = (ui.form_widgets["dropout"].preprocess(0.0), 0.0)
    typed["dora"] = (ui.form_widgets["dora"].preprocess(False), False)  # DoRA trains with LoRA only
    typed["textual_inversion"] = (ui.form_widgets["textual_inversion"].preprocess(False), False)  # no LoRA then
    typed["scale_weight_norms"] = (ui.form_widgets["scale_weight_norms"].preprocess(0.0), 0.0)  # plain LoRA only
    form = _form(ui, name="saved", trigger="zwx", preset="custom", prior=True, train_text_encoder=True,
                 **{k: v for k, (v, _) in typed.items() if k != "train_text_encoder"})
    cfg = ui.train_config(form)
    file, said = ui.save_settings(form)
    path = Path(file["value"])
    assert path.suffix == ".toml" and "lora-studio train --config saved.toml" in said
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert data["trigger"] == "zwx" and data["rank"] == cfg.rank and "images" in data
    assert "output_dir" not in data and "device" not in data  # the app's own folders are no setting
    # loaded back: every field as it was, and a name not yet taken
    *values, msg = ui.load_settings_file(str(path), ui.base_names()[0])
    loaded = {k: v["value"] if isinstance(v, dict) else v for k, v in zip(SETTINGS_FIELDS, values)}
    assert "Loaded the settings of <b>saved</b>" in msg and loaded["name"] == "saved" and loaded["prior"] is True
    assert (loaded["trigger"], loaded["preset"], loaded["base"]) == ("zwx", "custom", ui.base_names()[0])
    again = ui.train_config(_form(ui, **{k: ui.form_widgets[k].preprocess(v) if k in typed else v
                                         for k, v in loaded.items()}))
    for o in ADVANCED:
        assert getattr(again, o.name) == getattr(cfg, o.name), o.name
    # a terminal run on this computer reads it as it is: the staged images and the base model are found
    term = parse_train_args(["--config", str(path)])
    assert term.rank == cfg.rank and term.trigger == "zwx" and term.lr_unet == cfg.lr_unet
    assert Path(term.images) == Path(cfg.images) and Path(term.images).is_dir()
    from pipelines.base_models import load_base

    assert load_base(term.base, device="cpu").family == "sd1"
    # saved with no images staged: no images key, and the message says to give them
    file, said = ui.save_settings({**form, "images": None, "captions": None})
    assert "images" not in tomllib.loads(Path(file["value"]).read_text()) and "--images FOLDER" in said
    # an earlier adapter's settings, from the library: listed, loaded, with a free name
    lib = ui.studio.library.root
    lib.mkdir(parents=True, exist_ok=True)
    from lora_helpers import make_lora

    from pipelines.adapters import lora_metadata, save_adapter
    from pipelines.base_models import load_base

    save_adapter(make_lora(load_base(ui.studio.base_source(None), device="cpu").pipe, rank=2),
                 lib / "older.safetensors", lora_metadata(family="sd1", rank=2, alpha=2, name="older"))
    assert ui.settings_sources() == []  # no .toml beside it yet
    (lib / "older.toml").write_text('name = "older"\ntrigger = "qwe"\npreset = "style"\nmax_steps = 123\n')
    assert ui.settings_sources() == ["older"]
    *values, msg = ui.load_settings("older", ui.base_names()[0])
    loaded = {k: v["value"] if isinstance(v, dict) else v for k, v in zip(SETTINGS_FIELDS, values)}
    assert (loaded["name"], loaded["trigger"], loaded["max_steps"]) == ("older-2", "qwe", 123)
    assert loaded["preset"] == "style" and loaded["prior"] is False
    # errors name what is wrong
    with pytest.raises(gr.Error, match="settings: pick an adapter"):
        ui.load_settings(None, None)
    with pytest.raises(gr.Error, match="no adapter named 'saved'"):
        ui.load_settings("saved", None)
    (lib / "older.toml").unlink()
    with pytest.raises(gr.Error, match="'older' has no saved settings"):
        ui.load_settings("older", None)
    bad = tmp_path / "bad.toml"
    bad.write_text("rank = 'four'\n")
    with pytest.raises(gr.Error, match="bad.toml.*rank") as err:
        ui.load_settings_file(str(bad), None)
    assert str(tmp_path) not in str(err.value)  # the file's name, not the server's upload folder


def test_the_form_is_one_dict_and_unknown_or_app_set_keys_are_refused(ui):
    cfg = ui.train_config(_form(ui, rank=4, max_steps=7))
    assert isinstance(cfg, TrainConfig) and cfg.rank == 4 and cfg.max_steps == 7
    assert cfg.unet_targets == PRESETS["concept"]["unet_targets"]  # left out: the preset's value
    assert cfg.output_dir == str(ui.studio.library.root) and cfg.device == "cpu"
    for bad in ({"rnak": 4}, {"output_dir": "/tmp"}, {"device": "cuda"}, {"resume": "latest"}):
        with pytest.raises(Exception, match="unknown or app-set"):
            ui.train_config(_form(ui, **bad))
    with pytest.raises(Exception, match="max_steps: enter a number"):
        ui.train_config(_form(ui, max_steps=None))
    with pytest.raises(Exception, match="rank: must be a whole number between 1 and 1024"):
        ui.train_config(_form(ui, rank=0))  # Gradio's own bounds check (no field named) is off
    assert ui.form_widgets["rank"].preprocess(0) == 0
    # Gradio shows an unset number as 0 and sends 0 until the box is cleared: where 0 is out of range, 0 is unset
    cfg = ui.train_config(_form(ui, alpha=0, conv_rank=0, conv_alpha=0.0, resolution=0))
    assert cfg.alpha is None and cfg.conv_rank is None and cfg.conv_alpha is None and cfg.resolution is None
    assert ui.form_widgets["alpha"].value == 0 and "0: unset" in ui.form_widgets["alpha"].info
    # the prior toggle decides whether the class prompt is used
    assert ui.train_config(_form(ui, class_prompt="a shape")).class_prompt is None
    assert ui.train_config(_form(ui, class_prompt="a shape", prior=True)).class_prompt == "a shape"


def test_a_preset_sets_every_field_it_names(ui):
    style = dict(zip(PRESET_FIELDS, ui.preset_defaults("style")))
    opts = {o.name: o for o in ADVANCED}
    for f in PRESET_FIELDS:
        want = PRESETS["style"].get(f, opts[f].ui_default)
        assert field_value(opts[f], style[f]) == want, f
    assert set(PRESETS["concept"]) <= set(PRESET_FIELDS)


def test_choosing_prodigy_sets_its_multiplier_and_going_back_the_presets_rates(ui):
    base = ui.base_names()[0]
    assert ui.optimizer_rates("prodigy", "concept", base, 1e-3, 2e-4) == (1.0, 1.0)
    cfg = ui.train_config(_form(ui, preset="concept", optimizer="prodigy", lr_unet=1.0, lr_text=1.0,
                                train_text_encoder=True))
    assert (cfg.optimizer, cfg.lr_unet, cfg.lr_text) == ("prodigy", 1.0, 1.0)
    # back to AdamW: a rate of 1.0 would blow it up, so the preset's come back; a rate the user chose stays
    assert ui.optimizer_rates("adamw", "concept", base, 1.0, 1.0) == (1e-3, 2e-4)
    assert ui.optimizer_rates("lion", "style", base, 1.0, 1.0) == (1e-3, 0.0)
    assert all(v.get("__type__") == "update" for v in ui.optimizer_rates("lion", "concept", base, 3e-4, 1e-4))
    # Prodigy with an AdamW-sized rate typed in: Start says what is wrong
    with pytest.raises(ConfigError, match="lr_unet: Prodigy finds its own step size"):
        ui.train_config(_form(ui, optimizer="prodigy", lr_unet=1e-3))


def test_start_errors_stay_on_the_page(ui):
    outputs = ["job_id", "status", "msg", "box", "choice", "resume", "new", "pending", "name"]
    out = shown_in(ui.start_training, outputs, "msg")(_form(ui, rank=0))
    assert "rank: must be a whole number" in out[2] and "role='alert'" in out[2]
    assert all(isinstance(o, dict) and o.get("__type__") == "update" for i, o in enumerate(out) if i != 2)


# ------------------------------------------------------------------------------------------------ name in use, continue
def _finished(ui: StudioUI, star_images, tiny_sd1_dir, name: str, stop_at: int | None = None) -> TrainConfig:
    """A run trained here: finished (an adapter in the library) or stopped at step `stop_at` (a checkpoint)."""
    cfg = TrainConfig(images=str(star_images), base=str(tiny_sd1_dir), output_dir=str(ui.studio.library.root),
                      name=name, max_steps=4, batch_size=2, rank=2, device="cpu", sample_steps=1, checkpoint_every=1,
                      resolution=32)
    stop = threading.Event()
    train(cfg, on_progress=lambda p: stop.set() if stop_at and p.step >= stop_at else None, stop=stop)
    run = ui.studio.library.root / "runs" / name
    (run / "job.toml").write_text(cfg.to_toml())  # what a job of the app leaves there
    return cfg


def test_start_with_a_finished_adapters_name_asks_and_never_overwrites(ui, star_images, tiny_sd1_dir):
    _finished(ui, star_images, tiny_sd1_dir, "star")
    form = _form(ui, "star", max_steps=2)
    job_id, status, msg, box, choice, resume, new, pending, name = ui.start_training(form)
    assert job_id == status == name == gr.skip()  # nothing started
    assert box["visible"] is True and "already in the library" in choice and "star-2" in choice
    assert resume["visible"] is False  # a finished adapter has nothing to resume
    assert new["value"] == "Start as 'star-2'" and ui.studio.queue.jobs() == []
    job_id, status, msg, box, *_, name = ui.choose_new_name(pending)
    job = ui.studio.job(job_id)
    assert job.name == "star-2" and name == "star-2" and box["visible"] is False and "star-2" in status
    # overwrite: the adapter is replaced by a run from step 1, the old run folder goes
    *_, pending, _ = ui.start_training(form)
    job_id, *_ = ui.choose_overwrite(pending)
    job = ui.studio.job(job_id)
    assert job.name == "star" and job.config.overwrite and not (ui.studio.library.root / "runs" / "star").exists()


def test_start_with_a_stopped_runs_name_offers_resume(ui, star_images, tiny_sd1_dir):
    _finished(ui, star_images, tiny_sd1_dir, "half", stop_at=2)
    st = ui.studio.run_state("half")
    assert st.resumable and st.step == 2
    job_id, status, msg, box, choice, resume, new, pending, name = ui.start_training(_form(ui, "half"))
    assert box["visible"] is True and resume["visible"] is True and "checkpoint at step 2/4" in choice
    job_id, status, *_ = ui.choose_resume(pending)
    job = ui.studio.job(job_id)
    assert job.kind == "resume" and job.config.resume == "latest" and job.config.max_steps == 4
    assert "half</b> is waiting in the queue" in status
    with pytest.raises(gr.Error, match="already queued or running"):  # and now the name is busy
        ui.start_training(_form(ui, "half"))


def test_a_stopped_or_finished_run_offers_resume_or_train_more(ui, star_images, tiny_sd1_dir):
    half = _finished(ui, star_images, tiny_sd1_dir, "half", stop_at=2)
    _finished(ui, star_images, tiny_sd1_dir, "done")
    q = ui.studio.queue
    stopped = q.submit(half)
    q.stop(stopped.id)  # a job of the run, ended
    status, plot, samples, seen, done, resume, more_steps, more = ui.poll(stopped.id, {})
    assert resume["visible"] is True and more["visible"] is False
    job_id, status, msg, *hide = ui.resume_shown(stopped.id, seen)
    assert ui.studio.job(job_id).kind == "resume" and all(h["visible"] is False for h in hide)
    # a finished adapter: train N more steps from it (a new adapter under a free name)
    finished = q.submit(TrainConfig.from_toml(ui.studio.library.root / "runs" / "done" / "job.toml",
                                              {"overwrite": True}))
    q.stop(finished.id)
    assert ui._continue_buttons(q.get(finished.id))[2]["visible"] is True  # 'done' is in the library
    job_id, *_ = ui.train_more_shown(finished.id, None, 5)
    job = ui.studio.job(job_id)
    assert job.kind == "more" and job.name == "done-more" and job.config.max_steps == 5
    assert ui.more_label(5) == "Train 5 more steps"


def test_interrupted_runs_have_their_own_badge(ui):
    cfg = TrainConfig(images=".", name="gone", max_steps=40)
    job = Job(1, cfg, state="interrupted")
    assert "ls-interrupted" in ui.status_html(job) and "Resume" in ui.status_html(job)


def test_the_end_of_training_check_shows_as_such(ui):
    """After the last step the trainer checks the adapter for its model card; the status says so instead of
    a frozen "step 40/40 · about 0s left"."""
    from training.trainer import CHECKING, Progress

    job = Job(1, TrainConfig(images=".", name="chk", max_steps=40), state="running")
    job.progress = Progress(40, 40, loss=0.01, message=CHECKING)
    html_ = ui.status_html(job)
    assert "ls-running" in html_ and "checking" in html_ and "all 40 steps trained" in html_
    job.progress = Progress(39, 40, loss=0.01, elapsed_s=78.0, eta_s=2.0)
    assert "step 39/40" in ui.status_html(job) and "1m 18s elapsed · about 2s left" in ui.status_html(job)
    # a line without timing (the trainer stopping, saving) shows no "0s elapsed · about 0s left"
    job.progress = Progress(20, 40, loss=0.01, elapsed_s=0.0, eta_s=None, message="stopping")
    assert "step 20/40" in ui.status_html(job) and "elapsed" not in ui.status_html(job)
