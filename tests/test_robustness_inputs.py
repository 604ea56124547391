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
    assert main(["train", "--images", str(images), "--name", "star", "--library", str(lib), "--num-processes", "2"]) == 2
    assert "'Star' already exists" in capsys.readouterr().err and not (lib / "runs").exists()
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


@pytest.mark.parametrize("arg, says", [
    ("outline:abc", "--lora outline:abc: weight 'abc' of 'outline' is not a number"),
    ("outline:0.5:x", "weight 'x' of 'outline:0.5' is not a number"),
    ("a:0.1:0.2:0.3", "--lora a:0.1:0.2:0.3: at most two weights"),
])
def test_lora_option_with_a_weight_that_is_not_a_number_says_so(tmp_path, capsys, arg, says):
    """A mistyped weight is named as the weight, not blamed on the adapter name's ':'."""
    assert main(["generate", "--prompt", "a sks", "--lora", arg, "--library", str(tmp_path / "lib")]) == 2
    err = capsys.readouterr().err
    assert says in err and "not allowed in file names" not in err


# ------------------------------------------------------------------------------------------------ 6. symlinked sidecars
def test_symlinked_sidecars_are_never_read_served_or_copied(tmp_path):
    from PIL import Image

    from pipelines.library import AdapterLibrary

    secret = tmp_path / "private.txt"
    secret.write_text("my private notes")
    secret_png = tmp_path / "private.png"
    Image.new("RGB", (8, 8), "red").save(secret_png)
    lib = AdapterLibrary(tmp_path / "lib")
    lib.root.mkdir()
    _adapter_file(lib.root / "a.safetensors")
    (lib.root / "a.md").symlink_to(secret)
    (lib.root / "a.png").symlink_to(secret_png)
    (lib.root / "a.txt").symlink_to(lib.root / "a.safetensors")  # even a link inside the library
    assert lib.sidecars("a") == [] and lib.model_card("a") is None
    assert lib.info("a").preview is None and lib.list()[0].preview is None
    Image.new("RGB", (8, 8), "blue").save(lib.root / "a.preview.png")  # a real preview is still shown
    assert lib.info("a").preview == lib.root / "a.preview.png"
    (lib.root / "a.png").unlink()
    (lib.root / "a.png").write_bytes(secret_png.read_bytes())
    assert lib.info("a").preview == lib.root / "a.png"
    # an import copies the regular sidecars only
    src = tmp_path / "dl"
    src.mkdir()
    _adapter_file(src / "b.safetensors")
    (src / "b.md").symlink_to(secret)
    (src / "b.toml").write_text("rank = 2\n")
    lib.import_file(src / "b.safetensors")
    assert (lib.root / "b.toml").is_file() and not (lib.root / "b.md").exists()
    # rename and delete carry or remove the links themselves, never touching what they point at
    lib.rename("a", "c")
    assert (lib.root / "c.md").is_symlink() and not (lib.root / "a.md").is_symlink()
    lib.delete("c")
    assert not any(p.name.startswith(("a.", "c.")) for p in lib.root.iterdir())
    assert secret.read_text() == "my private notes" and secret_png.is_file()


# ------------------------------------------------------------------------------------------------ 8. leftovers
def test_temp_files_of_a_killed_save_are_removed_when_the_library_lists(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    from pipelines.library import AdapterLibrary
    from pipelines.weights_io import STALE_TEMP_SECONDS

    lib = AdapterLibrary(tmp_path / "lib")
    lib.root.mkdir()
    _adapter_file(lib.root / "a.safetensors")
    # a real kill -9 in the middle of the final write leaves atomic_write's temporary file
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from pipelines.weights_io import atomic_write

        def slow(tmp):
            open(tmp, "wb").write(b"half an adapter")
            print("writing", flush=True)
            time.sleep(60)

        atomic_write({str(lib.root / "b.safetensors")!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    [left] = [p for p in lib.root.iterdir() if p.name.startswith(".b.safetensors.")]
    assert lib.names() == ["a"] and left.exists()  # fresh: it could be a save in progress, kept
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(left, (old, old))
    others = {  # same age, but not ours to remove
        ".a.safetensors.tmp": "not atomic_write's pattern",
        "a.safetensors.abcd1234.tmp": "not hidden",
        ".notes.abcd1234.tmp": "not an adapter or sidecar",
        ".a.safetensors.ABCD1234.tmp": "not mkstemp's characters",
    }
    for name in others:
        (lib.root / name).write_bytes(b"x")
        os.utime(lib.root / name, (old, old))
    card_tmp = lib.root / ".a.md.x_9k2m0q.tmp"
    card_tmp.write_text("half a card")
    os.utime(card_tmp, (old, old))
    assert [i.name for i in lib.list()] == ["a"]
    assert not left.exists() and not card_tmp.exists()
    assert all((lib.root / name).exists() for name in others)


def test_rename_onto_orphan_sidecars_is_refused_naming_the_file(tmp_path):
    from pipelines.library import AdapterLibrary

    lib = AdapterLibrary(tmp_path / "lib")
    lib.root.mkdir()
    _adapter_file(lib.root / "old.safetensors")
    (lib.root / "old.md").write_text("old's card")
    (lib.root / "new.md").write_text("someone's notes, left without new.safetensors")
    with pytest.raises(ConfigError, match=r"'new.md' is already in the library"):
        lib.rename("old", "new")
    assert (lib.root / "new.md").read_text().startswith("someone's notes") and lib.names() == ["old"]
    (lib.root / "other.png").write_bytes(b"a preview that would become other's")
    with pytest.raises(ConfigError, match=r"'other.png'"):
        lib.rename("old", "other")
    with pytest.raises(ConfigError, match=r"'other.png'"):  # an import under that name too
        lib.import_file(lib.root / "old.safetensors", name="other")
    # the adapter's own sidecars never count: a case-only rename works
    assert lib.rename("old", "OLD").name == "OLD" and (lib.root / "OLD.md").read_text() == "old's card"


# ------------------------------------------------------------------------------------------------ 9. broken pickles
def _broken_pickles(d):
    import pickle

    import torch

    (d / "empty.ckpt").write_bytes(b"")
    (d / "junk.pt").write_bytes(b"this is not a pickle at all " * 8)
    torch.save({"state_dict": {"w": torch.ones(64, 64)}}, d / "whole.ckpt")
    data = (d / "whole.ckpt").read_bytes()
    (d / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    torch.save([torch.ones(2)], d / "list.pt")
    torch.save(torch.ones(2), d / "tensor.bin")
    torch.save({"epoch": 3, "note": "no weights"}, d / "notensors.pt")
    (d / "cut.pt").write_bytes(pickle.dumps({"w": 1}, protocol=2)[:-4])

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (d / "code.pt").write_bytes(pickle.dumps({"w": Evil()}, protocol=2))
    return {
        "empty.ckpt": r"the file is empty \(0 bytes\)",
        "junk.pt": r"not a readable weights file: its data is malformed .*not a PyTorch weights file",
        "truncated.ckpt": r"not a readable weights file: a damaged zip archive; truncated",
        "list.pt": r"holds a list, not a state dict",
        "tensor.bin": r"holds a Tensor, not a state dict",
        "notensors.pt": r"holds no tensors \(a dict with keys 'epoch', 'note'\)",
        "cut.pt": r"not a readable weights file: it ends too early",
        "code.pt": r"not a readable weights file: it holds Python objects other than tensors \(print\).*can run code",
    }


def test_broken_pickles_are_corrupt_weights_errors_naming_the_file(tmp_path, capsys):
    from pipelines.base_models import load_base
    from pipelines.errors import CorruptWeightsError
    from pipelines.library import AdapterLibrary
    from pipelines.weights_io import load_safetensors

    cases = _broken_pickles(tmp_path)
    lib = AdapterLibrary(tmp_path / "lib", allow_pickle=True)
    for name, why in cases.items():
        path = tmp_path / name
        with pytest.raises(CorruptWeightsError, match=rf"{name}: {why}"):  # an adapter
            load_safetensors(path, allow_pickle=True)
        with pytest.raises(CorruptWeightsError, match=rf"{name}: {why}"):
            lib.import_file(path)
        with pytest.raises(CorruptWeightsError, match=rf"{name}: {why}"):  # a base model
            load_base(str(path), allow_pickle=True, device="cpu")
    assert lib.names() == [] and "this must never run" not in capsys.readouterr().out
    # the command line: one line naming the file, no traceback
    assert main(["generate", "--base", str(tmp_path / "list.pt"), "--allow-pickle", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "list.pt: holds a list" in err and "Traceback" not in err
