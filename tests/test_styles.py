"""Prompt styles (AUTOMATIC1111's styles.csv): read as A1111 writes them, merged as A1111 merges them, saved from the
app, and applied by `generate --style` and the Generate tab."""

from __future__ import annotations

import pytest
from PIL import Image

from app.cli import main
from pipelines.errors import ConfigError
from pipelines.generation import parse_parameters
from pipelines.styles import Style, apply_styles, merge, read_styles, save_style

# as A1111 writes it: a header, quoted fields with commas, an empty negative prompt, a {prompt} placeholder
A1111_CSV = ('\ufeffname,prompt,negative_prompt\n'
             '"outline look","{prompt}, thin outline, <lora:outline:0.8> ohwx style","blurry, lowres"\n'
             'Clean,"sharp, clean",\n'
             '"Only negative",,"watermark"\n'
             ',"a row without a name is skipped",\n')


def test_a1111_styles_read_and_merge_as_a1111_does(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(A1111_CSV, encoding="utf-8")
    styles = read_styles(path)
    assert list(styles) == ["outline look", "Clean", "Only negative"]
    assert styles["outline look"].negative_prompt == "blurry, lowres"
    # {prompt} takes the prompt in its place; any other style text goes after it, joined by ", "
    assert merge("a red circle", "{prompt}, thin outline") == "a red circle, thin outline"
    assert merge("a red circle", "sharp, clean") == "a red circle, sharp, clean"
    assert merge("", "sharp") == "sharp" and merge("a", "") == "a"
    p, n = apply_styles("a red circle", "text", ["outline look", "clean", "Only negative"], styles, path)
    assert p == "a red circle, thin outline, <lora:outline:0.8> ohwx style, sharp, clean"
    assert n == "text, blurry, lowres, watermark"
    with pytest.raises(ConfigError, match=r"no style 'nope' in .*styles.csv \(it has: outline look, Clean"):
        apply_styles("x", "", ["nope"], styles, path)
    assert read_styles(tmp_path / "missing.csv") == {}
    bad = tmp_path / "bad.csv"
    bad.write_text("title,text\na,b\n")
    with pytest.raises(ConfigError, match="bad.csv is not AUTOMATIC1111's styles.csv"):
        read_styles(bad)


def test_saved_styles_round_trip_and_keep_the_others(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text(A1111_CSV, encoding="utf-8")
    save_style(path, Style("mine", 'a "quoted", comma prompt', "bad hands"))
    styles = read_styles(path)
    assert list(styles) == ["outline look", "Clean", "Only negative", "mine"]
    assert styles["mine"] == Style("mine", 'a "quoted", comma prompt', "bad hands")
    assert styles["outline look"].prompt.startswith("{prompt}, thin outline")
    with pytest.raises(ConfigError, match="a style called 'mine' already exists"):
        save_style(path, Style("MINE", "x"))
    with pytest.raises(ConfigError, match="style name"):
        save_style(path, Style("  ", "x"))
    with pytest.raises(ConfigError, match="both empty"):
        save_style(path, Style("empty"))
    save_style(tmp_path / "new" / "styles.csv", Style("first", "p"))  # a new home: the file is created
    assert list(read_styles(tmp_path / "new" / "styles.csv")) == ["first"]


def test_generate_with_styles_records_the_merged_prompt(tiny_sd1_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "styles.csv").write_text(A1111_CSV, encoding="utf-8")
    out = tmp_path / "o.png"
    rc = main(["generate", "--base", str(tiny_sd1_dir), "--prompt", "a red circle", "--style", "clean",
               "--style", "Only negative", "--steps", "2", "--seed", "1", "--out", str(out), "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    with Image.open(out) as im:
        p = parse_parameters(im.info["parameters"])
    assert p["Prompt"] == "a red circle, sharp, clean" and p["Negative prompt"] == "watermark"
    rc = main(["generate", "--base", str(tiny_sd1_dir), "--prompt", "x", "--style", "missing", "--out", str(out),
               "--device", "cpu"])
    assert rc == 2 and "no style 'missing'" in capsys.readouterr().err
    rc = main(["generate", "--base", str(tiny_sd1_dir), "--prompt", "x", "--style", "clean", "--styles",
               str(tmp_path / "none.csv"), "--out", str(out)])
    assert rc == 2 and "none.csv is not a file" in capsys.readouterr().err
