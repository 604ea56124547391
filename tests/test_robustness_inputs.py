"""Inputs that never surprise (issue 16): names in use, odd names, links, logs and leftovers, broken pickles."""

from __future__ import annotations

import random
import threading

import pytest

from app.cli import main
from pipelines.errors import ConfigError
from training.config import TrainConfig
from training.toy_world import draw, sample_spec
from training.trainer import train


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = random.Random(1)
    for i in range(2):
        draw(sample_spec(rng, shapes=["star"]), resolution=32).save(d / f"{i}.png")
    return d


def _cfg(images, base, lib, **kw):
    d = dict(images=str(images), base=str(base), output_dir=str(lib), max_steps=2, batch_size=1, device="cpu",
             sample_steps=1, name="k", rank=2, seed=5, checkpoint_every=1, checkpoints_keep=3)
    d.update(kw)
    return TrainConfig(**d)


# ------------------------------------------------------------------------------------------------ 1. names in use
def test_train_refuses_a_name_in_use_before_any_work(images, tmp_path, monkeypatch, capsys):
    import training.trainer as tr

    def no_work(*a, **kw):
        raise AssertionError("training work started although the name is in use")

    monkeypatch.setattr(tr, "scan_folder", no_work)
    monkeypatch.setattr(tr, "load_base", no_work)
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "Star.safetensors").write_bytes(b"the finished adapter")
    (lib / "Star.md").write_text("its card")
    for name in ("Star", "star", "STAR"):  # up to case, one adapter
        with pytest.raises(ConfigError, match=r"'Star' already exists.*--overwrite.*another name"):
            train(_cfg(images, "unused", lib, name=name))
    # --overwrite replaces it only under its own spelling, never beside it as a second file
    with pytest.raises(ConfigError, match=r"own spelling.*--name Star"):
        train(_cfg(images, "unused", lib, name="star", overwrite=True))
    assert (lib / "Star.safetensors").read_bytes() == b"the finished adapter"
    assert (lib / "Star.md").read_text() == "its card"
    assert not (lib / "runs").exists()
    # the command line says the same, and has --overwrite
    assert main(["train", "--images", str(images), "--name", "star", "--library", str(lib)]) == 2
    err = capsys.readouterr().err
    assert "'Star' already exists" in err and "--overwrite" in err
    from app.cli import parse_train_args

    assert parse_train_args(["--images", "x", "--overwrite"]).overwrite is True
    assert parse_train_args(["--images", "x"]).overwrite is False


def test_resume_of_a_stopped_run_is_not_blocked_but_a_finished_one_needs_overwrite(images, tiny_sd1_dir, tmp_path):
    stop = threading.Event()

    def stop_after_first(p):
        if p.loss is not None:
            stop.set()

    first = train(_cfg(images, tiny_sd1_dir, tmp_path), on_progress=stop_after_first, stop=stop)
    assert first.stopped and not (tmp_path / "k.safetensors").exists()
    done = train(_cfg(images, tiny_sd1_dir, tmp_path, resume="latest"))  # no finished adapter yet: allowed
    assert done.adapter_path == tmp_path / "k.safetensors"
    before = done.adapter_path.read_bytes()
    with pytest.raises(ConfigError, match="'k' already exists"):
        train(_cfg(images, tiny_sd1_dir, tmp_path, resume="latest"))
    assert done.adapter_path.read_bytes() == before
    again = train(_cfg(images, tiny_sd1_dir, tmp_path, max_steps=3, resume="latest", overwrite=True))
    assert again.adapter_path == done.adapter_path and again.adapter_path.read_bytes() != before


# ------------------------------------------------------------------------------------------------ 4. links in the image folder
def test_broken_and_looping_symlinks_in_the_image_folder_are_skipped_and_listed(images, tmp_path):
    import os

    from training.dataset import scan_folder

    d = tmp_path / "imgs"
    d.mkdir()
    for p in images.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    os.symlink(tmp_path / "gone.png", d / "dangling.png")
    os.symlink("loop-b.png", d / "loop-a.png")
    os.symlink("loop-a.png", d / "loop-b.png")
    os.symlink(d / "0.png", d / "linked.png")  # a link to a real image is still used
    os.symlink(tmp_path / "gone.txt", d / "1.txt")  # a caption that is a broken link: no caption, not a crash
    res = scan_folder(d)
    assert sorted(p.name for p in (it.path for it in res.items)) == ["0.png", "1.png", "linked.png"]
    why = {p.name: reason for p, reason in res.skipped}
    assert why["dangling.png"].startswith("broken symlink") and "gone.png" in why["dangling.png"]
    assert why["loop-a.png"].startswith("symlink loop") and why["loop-b.png"].startswith("symlink loop")
    assert "dangling.png: broken symlink" in res.report()


# ------------------------------------------------------------------------------------------------ 5. names
def _adapter_file(path):
    import torch

    from pipelines.adapters import lora_metadata, save_adapter

    m = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    g = torch.Generator().manual_seed(0)
    sd = {f"unet.{m}.lora_A.weight": torch.randn(2, 32, generator=g),
          f"unet.{m}.lora_B.weight": torch.randn(32, 2, generator=g)}
    return save_adapter(sd, path, lora_metadata(family="sd1", rank=2, alpha=2, name=path.stem, trigger_word="sks"))


def test_long_names_are_limited_in_utf8_bytes_with_room_for_every_ending(tmp_path):
    from pipelines.errors import UnsafeNameError
    from pipelines.library import MAX_NAME_BYTES, AdapterLibrary, check_name

    with pytest.raises(UnsafeNameError, match=r"300 bytes in UTF-8, more than 200"):
        check_name("é" * 150)  # 150 characters, but 300 bytes: 'File name too long' later
    with pytest.raises(ConfigError, match=r"name: .*bytes in UTF-8"):
        TrainConfig(name="é" * 150)
    # the longest allowed name works with every file the library writes beside it
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    name = "é" * (MAX_NAME_BYTES // 2)
    src = _adapter_file(src_dir / "a.safetensors")
    for suffix in (".preview.png", ".civitai.info", ".md"):
        (src_dir / f"a{suffix}").write_bytes(b"x")
    lib = AdapterLibrary(tmp_path / "lib")
    info = lib.import_file(src, name=name)
    assert info.name == name and len(lib.sidecars(name)) == 3
    assert lib.export(name, "kohya").is_file()
    assert lib.rename(name, name.upper()).name == name.upper()


@pytest.mark.parametrize("bad, why", [
    ("a\u200bb", r"invisible character U\+200B \(ZERO WIDTH SPACE\)"),
    ("a\u200db", r"invisible character U\+200D \(ZERO WIDTH JOINER\)"),
    ("soft\u00adhyphen", r"invisible character U\+00AD \(SOFT HYPHEN\)"),
    ("\ufeffbom", r"invisible character U\+FEFF"),
    ("a\u2060b", r"invisible character U\+2060 \(WORD JOINER\)"),
    ("evil\u202egnp.safetensors", r"text-direction control U\+202E \(RIGHT-TO-LEFT OVERRIDE\)"),
    ("a\u2067b", r"text-direction control U\+2067"),
    ("a\u200fb", r"text-direction control U\+200F"),
    ("a\x85b", r"invisible character U\+0085"),
    ("a:b", r"the character ':' is not allowed"),
    ("C:evil", r"the character ':' is not allowed"),
    ("a|b", r"the character '\|' is not allowed"),
    ("a\x01b", r"control character U\+0001 is not allowed"),
])
def test_invisible_bidi_and_reserved_characters_are_refused_naming_the_problem(bad, why):
    from pipelines.errors import UnsafeNameError
    from pipelines.library import check_name

    with pytest.raises(UnsafeNameError, match=why):
        check_name(bad)


def test_names_people_use_still_pass():
    from pipelines.library import check_name

    for ok in ("Über style (v2)", "星のスタイル", "star 😀", "my-lora_v1.5", "é" * 100):
        assert check_name(ok) == ok


@pytest.mark.parametrize("arg, says", [
    ("x.ckpt", "'.ckpt' file, not a library name"),
    ("sub/x.ckpt:0.5", "a file path, not a library name"),
    ("missing/nope.safetensors", "a file path, not a library name"),
])
def test_lora_option_with_a_file_that_is_not_there_says_so(tmp_path, monkeypatch, capsys, arg, says):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--prompt", "a sks", "--lora", arg, "--library", str(tmp_path / "lib")]) == 2
    err = capsys.readouterr().err
    assert says in err and "no such file" in err and "--allow-pickle" in err
    assert "path separators" not in err
