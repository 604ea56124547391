"""Issue #16: a config file (or dict) with a value of the wrong type is refused with the field named, never a
traceback and never a silent misreading ("no" read as true, "to_q" split into letters, inf accepted).
Also the packaging floors (requires-python, gradio) that the code needs."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import tomllib
import typing
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from pipelines.errors import ConfigError
from training.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
HINTS = typing.get_type_hints(TrainConfig)
BOOL_FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if HINTS[f.name] is bool]


def _toml(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "run.toml"
    head = "" if body.startswith("images ") else 'images = "pics"\n'
    p.write_text(head + body + "\n", encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------------ booleans
def test_bool_fields_are_found():
    assert {"random_flip", "train_text_encoder", "buckets", "shuffle_tags", "gradient_checkpointing",
            "caption_prefix_trigger"} <= set(BOOL_FIELDS)


@pytest.mark.parametrize("word", ["no", "false", "off", "0"])
@pytest.mark.parametrize("name", BOOL_FIELDS)
def test_a_string_in_a_bool_field_is_refused_not_read_as_true(name, word, tmp_path):
    p = _toml(tmp_path, f'{name} = "{word}"')
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml(p)
    assert str(e.value) == f"{p}: {name}: must be true or false, got '{word}'"
    with pytest.raises(ConfigError, match=f"^{name}: must be true or false, got 0$"):
        TrainConfig.from_dict({name: 0})


@pytest.mark.parametrize("name", BOOL_FIELDS)
def test_toml_booleans_are_read_as_they_are(name, tmp_path):
    for value in (True, False):
        p = _toml(tmp_path, f"{name} = {str(value).lower()}")
        assert getattr(TrainConfig.from_toml(p), name) is value


# ------------------------------------------------------------------------------------------------ other types
WRONG = [  # TOML line, the start of the message
    ("trigger = 5", "trigger: must be a string, got 5"),
    ("images = 5", "images: must be a string, got 5"),
    ('seed = "abc"', "seed: must be a whole number, got 'abc'"),
    ("seed = 1.5", "seed: must be a whole number, got 1.5"),
    ("seed = 99999999999", "seed: must be a whole number between 0 and 4294967295"),
    ("seed = -1", "seed: must be a whole number between 0 and 4294967295"),
    ("rank = 8.0", "rank: must be a whole number, got 8.0"),
    ("rank = true", "rank: must be a whole number, got True"),
    ('resolution = "512"', "resolution: must be a whole number (or unset), got '512'"),
    ('device = "tpu"', "device: 'tpu' is not a device name torch knows"),
    ('device = "cuda:x"', "device: 'cuda:x' is not a device name torch knows"),
    ('device = "meta"', "device: 'meta' is not a device LoRA Studio can train on"),
    ('instance_template = "{trigger} {0}"', "instance_template: '{trigger} {0}' is not a template of {trigger}"),
    ('instance_template = "{trigger.x}"', "instance_template: '{trigger.x}' is not a template of {trigger}"),
    ('instance_template = "a {trigger"', "instance_template: 'a {trigger' is not a template of {trigger}"),
    ('instance_template = "a {{trigger}}"', "instance_template: must contain '{trigger}'"),
    ("unet_targets = [1, 2]", "unet_targets: must be a list of strings, got [1, 2]"),
    ('unet_targets = "to_q"', "unet_targets: must be a list of strings, got 'to_q'"),
    ('sample_prompts = "a cat"', "sample_prompts: must be a list of strings, got 'a cat'"),
    ('alpha = "x"', "alpha: must be a finite number (or unset), got 'x'"),
    ("lr_unet = inf", "lr_unet: must be a finite number, got inf"),
    ("lr_text = nan", "lr_text: must be a finite number, got nan"),
    ("min_snr_gamma = -inf", "min_snr_gamma: must be a finite number (or unset), got -inf"),
    ('caption_dropout = "0.1"', "caption_dropout: must be a finite number, got '0.1'"),
    ('preset = ["concept"]', "preset: must be one of concept, style, embedding, custom, got ['concept']"),
    ("name = 7", "name: must be a string, got 7"),
    ("overwrite_everything = true", "unknown key(s) overwrite_everything"),
]


@pytest.mark.parametrize("line,msg", WRONG, ids=[w[0] for w in WRONG])
def test_wrong_type_in_a_toml_file_names_the_file_and_the_field(line, msg, tmp_path):
    p = _toml(tmp_path, line)
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml(p)
    assert str(e.value).startswith(f"{p}: {msg}"), str(e.value)


@pytest.mark.parametrize("line,msg", [w for w in WRONG if not w[0].startswith("overwrite_")],
                         ids=[w[0] for w in WRONG if not w[0].startswith("overwrite_")])
def test_wrong_type_in_a_dict_names_the_field(line, msg):
    data = tomllib.loads(line)
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({"images": "pics", **data})
    assert str(e.value).startswith(msg), str(e.value)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_field_has_its_type_checked(name, tmp_path):
    """Derived from the annotations: a field added later is covered without a line in a list."""
    p = tmp_path / "run.toml"
    p.write_text(f"{name} = {{ a = 1 }}\n")  # a table fits no field
    with pytest.raises(ConfigError, match=f"^{p}: {name}: must be "):
        TrainConfig.from_toml(p)


def test_numbers_of_float_fields_accept_whole_numbers_and_hold_floats(tmp_path):
    cfg = TrainConfig.from_toml(_toml(tmp_path, "alpha = 8\nlr_unet = 1\nmin_snr_gamma = 5"))
    assert (cfg.alpha, cfg.lr_unet, cfg.min_snr_gamma) == (8.0, 1.0, 5.0)
    assert all(isinstance(v, float) for v in (cfg.alpha, cfg.lr_unet, cfg.min_snr_gamma))
    assert TrainConfig(alpha=None).alpha is None and TrainConfig(resolution=None).resolution is None


def test_a_command_line_value_is_not_blamed_on_the_file(tmp_path):
    p = _toml(tmp_path, "rank = 4")
    with pytest.raises(ConfigError, match="^rank: must be a whole number between 1 and 1024, got 0$"):
        TrainConfig.from_toml(p, overrides={"rank": 0})
    with pytest.raises(ConfigError, match=f"^{p}: rank: "):
        TrainConfig.from_toml(_toml(tmp_path, "rank = 0"), overrides={"seed": 1})


# ------------------------------------------------------------------------------------------------ the file itself
def test_train_given_as_a_value_not_a_table(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text("train = 5\n")
    with pytest.raises(ConfigError, match=r"^.*run.toml: train: must be a \[train\] table of options, got 5$"):
        TrainConfig.from_toml(p)


def test_keys_outside_the_train_table_are_not_silently_dropped(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('seed = 1\n[train]\nimages = "pics"\n')
    with pytest.raises(ConfigError, match=r"run.toml: seed: outside the \[train\] table"):
        TrainConfig.from_toml(p)
    p.write_text('[train]\nimages = "pics"\nseed = 1\n')
    assert TrainConfig.from_toml(p).seed == 1


def test_a_file_that_is_not_utf8_is_refused_clearly(tmp_path):
    p = tmp_path / "run.toml"
    p.write_bytes('images = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"run.toml: not UTF-8 text \(byte 13\)"):
        TrainConfig.from_toml(p)


def test_a_utf8_file_with_a_bom_is_read(tmp_path):
    p = tmp_path / "run.toml"
    p.write_bytes(b"\xef\xbb\xbf" + 'images = "caf\u00e9"\n'.encode())
    assert TrainConfig.from_toml(p).images == "caf\u00e9"


def test_a_folder_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        TrainConfig.from_toml(tmp_path)


def test_to_toml_round_trips_any_text(tmp_path):
    cfg = TrainConfig(trigger="\U0001f431 x\x7fy\t\"q\" \\", instance_template="a {trigger} \u00e9",
                      sample_prompts=["\U0001f431 sks"])
    p = tmp_path / "run.toml"
    p.write_text(cfg.to_toml(), encoding="utf-8")
    assert TrainConfig.from_toml(p) == cfg


# ------------------------------------------------------------------------------------------------ device
@pytest.mark.parametrize("name", [None, "cpu"])
def test_cpu_and_unset_devices_are_accepted(name):
    assert TrainConfig(device=name).device == name


def test_cuda_without_cuda_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device: 'cuda' is not available on this machine "
                                          r"\(torch.cuda.is_available\(\) is false"):
        TrainConfig.from_toml(_toml(tmp_path, 'device = "cuda"'))


def test_cuda_with_cuda_is_accepted_up_to_its_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert TrainConfig(device="cuda").device == "cuda"
    assert TrainConfig(device="cuda:0").device == "cuda:0"
    with pytest.raises(ConfigError, match=r"device: 'cuda:1' does not exist; this machine has 1 cuda device"):
        TrainConfig(device="cuda:1")


# ------------------------------------------------------------------------------------------------ packaging
def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _floor(spec: str) -> Version:
    floors = [Version(s.version) for s in SpecifierSet(spec) if s.operator in (">=", "~=", "==")]
    assert floors, f"no lower bound in {spec!r}"
    return max(floors)


def _sources() -> list[Path]:
    return [p for d in ("app", "training", "pipelines") for p in sorted((ROOT / d).rglob("*.py"))]


# standard-library modules that a Python version introduced; add one here when the code starts using it
STDLIB_SINCE = {"tomllib": (3, 11)}


def test_requires_python_admits_no_version_without_the_stdlib_modules_we_import():
    used = set()
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                used |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                used.add(node.module.split(".")[0])
    needed = {m: v for m, v in STDLIB_SINCE.items() if m in used}
    assert "tomllib" in needed  # training/config.py reads TOML configs with it
    floor = _floor(_pyproject()["project"]["requires-python"])
    assert floor.release[:2] >= max(needed.values()), (floor, needed)


# launch() keywords of Gradio that are recent: Gradio 6 moved theme/css from Blocks() to launch() and renamed
# show_api to footer_links (gradio CHANGELOG, 6.0.0-dev.1 and -dev.2; the Gradio 6 migration guide)
GRADIO_LAUNCH_SINCE = {"theme": (6, 0), "css": (6, 0), "css_paths": (6, 0), "js": (6, 0), "head": (6, 0),
                       "head_paths": (6, 0), "footer_links": (6, 0)}


def _launch_keywords() -> set[str]:
    kws = set()
    for path in sorted((ROOT / "app").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "launch":
                kws |= {k.arg for k in node.keywords if k.arg}
    return kws


def test_gradio_floor_has_every_launch_keyword_the_app_passes():
    import gradio

    kws = _launch_keywords()
    assert {"server_name", "theme", "css", "footer_links"} <= kws  # the scan found app/ui.py's demo.launch(...)
    accepted = inspect.signature(gradio.Blocks.launch).parameters
    assert not kws - set(accepted), f"the installed gradio's launch() lacks {sorted(kws - set(accepted))}"
    spec = next(d for d in _pyproject()["project"]["dependencies"] if d.split(">")[0].strip() == "gradio")
    floor = _floor(spec.removeprefix("gradio"))
    needed = max(GRADIO_LAUNCH_SINCE.get(k, (0, 0)) for k in kws)
    assert floor.release[:2] >= needed, f"{spec}: app/ passes launch() keywords that need gradio >= {needed}"
    assert Version(gradio.__version__) in SpecifierSet(spec.removeprefix("gradio"))
