"""The adapter library: names stay inside the folder; import, list, rename, delete and export keep sidecars."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from app.cli import main
from pipelines.adapters import lora_metadata, save_adapter
from pipelines.errors import ConfigError, CorruptWeightsError, PickleRefusedError, UnsafeNameError
from pipelines.library import AdapterLibrary, check_name, default_library_root
from pipelines.weights_io import load_safetensors

MODULES = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
           "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]


def _lora(path, rank=4, alpha=2.0, family="sd1", trigger="sks", seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in MODULES:
        sd[f"unet.{m}.lora_A.weight"] = torch.randn(rank, 32, generator=g)
        sd[f"unet.{m}.lora_B.weight"] = torch.randn(32, rank, generator=g)
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.randn(rank, 32, generator=g)
    sd["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.randn(32, rank, generator=g)
    return save_adapter(sd, path, lora_metadata(family=family, rank=rank, alpha=alpha, name=path.stem,
                                                trigger_word=trigger))


@pytest.fixture
def lib(tmp_path):
    return AdapterLibrary(tmp_path / "loras")


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "downloads"
    d.mkdir()
    p = _lora(d / "My Style.safetensors")
    Image.new("RGB", (8, 8), "red").save(d / "My Style.png")
    (d / "My Style.md").write_text("# card")
    return p


def test_import_list_info_with_preview(lib, src):
    info = lib.import_file(src)
    assert info.name == "My Style" and info.path.parent == lib.root
    assert (lib.root / "My Style.png").is_file() and (lib.root / "My Style.md").is_file()
    [row] = lib.list()
    assert (row.name, row.family, row.trigger_word, row.rank, row.alpha) == ("My Style", "sd1", "sks", 4, 2.0)
    assert row.size == src.stat().st_size and row.preview == lib.root / "My Style.png" and row.date
    assert len(row.short_hash) == 12
    assert lib.import_file(src, name="second").name == "second"
    assert lib.names() == ["My Style", "second"]
    (lib.root / "broken.safetensors").write_bytes(b"not a weights file")
    assert [i.name for i in lib.list()] == ["My Style", "second"] and "broken" in lib.problems


def test_import_refuses_bad_files_and_leaves_nothing_behind(lib, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(256))
    with pytest.raises(CorruptWeightsError, match="junk.safetensors"):
        lib.import_file(junk)
    torch.save({"unet.a.lora_A.weight": torch.ones(1)}, tmp_path / "evil.pt")
    with pytest.raises(PickleRefusedError):
        lib.import_file(tmp_path / "evil.pt")
    assert not lib.root.exists() or list(lib.root.iterdir()) == []


def test_allowed_pickle_is_stored_as_safetensors(lib, tmp_path):
    sd, _ = load_safetensors(_lora(tmp_path / "p.safetensors"))
    torch.save(sd, tmp_path / "old.pt")
    info = lib.import_file(tmp_path / "old.pt", allow_pickle=True)
    assert info.path.suffix == ".safetensors" and info.rank == 4


@pytest.mark.parametrize("bad", ["..", "../outside", "a/b", "a\\b", "/etc/passwd", "C:evil", "x\x00y", ".hidden",
                                 "", " pad", "a<b", "a:b"])
def test_unsafe_names_are_refused(lib, src, bad):
    lib.import_file(src, name="ok")
    with pytest.raises(UnsafeNameError):
        lib.path_for(bad)
    with pytest.raises(UnsafeNameError):
        lib.import_file(src, name=bad)
    with pytest.raises(UnsafeNameError):
        lib.rename("ok", bad)


def test_symlink_out_of_the_library_is_refused_and_not_listed(lib, src, tmp_path):
    outside = _lora(tmp_path / "secret.safetensors")
    lib.root.mkdir(parents=True)
    (lib.root / "sneaky.safetensors").symlink_to(outside)
    with pytest.raises(UnsafeNameError, match="outside"):
        lib.path_for("sneaky")
    assert "sneaky" not in lib.names() and lib.list() == []
    with pytest.raises(UnsafeNameError):
        lib.delete("sneaky")
    assert outside.is_file()
    # a dangling link cannot be used to write outside either
    (lib.root / "dangling.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(UnsafeNameError):
        lib.import_file(src, name="dangling")
    assert not (tmp_path / "elsewhere.safetensors").exists()


def test_names_resolve_consistently_up_to_case(lib, src):
    lib.import_file(src, name="Style")
    assert lib.path_for("style") == lib.path_for("STYLE") == lib.root / "Style.safetensors"
    assert lib.path_for("Style.safetensors") == lib.root / "Style.safetensors"
    with pytest.raises(ConfigError, match="already exists"):
        lib.import_file(src, name="STYLE")
    assert lib.rename("style", "STYLE").name == "STYLE"  # a case-only rename is allowed
    assert lib.names() == ["STYLE"]
    with pytest.raises(FileNotFoundError):
        lib.path_for("nope")


def test_a_mistyped_name_gets_a_suggestion(lib, src):
    lib.import_file(src)
    with pytest.raises(FileNotFoundError, match="no adapter named 'my_style'.*did you mean 'My Style'"):
        lib.path_for("my_style")
    with pytest.raises(FileNotFoundError) as err:
        lib.path_for("outline")
    assert "did you mean" not in str(err.value)  # nothing close: no guess


def test_rename_and_delete_carry_sidecars(lib, src):
    lib.import_file(src, name="a")
    (lib.root / "a.toml").write_text("rank = 4")
    lib.import_file(src, name="b")
    with pytest.raises(ConfigError):
        lib.rename("a", "b")
    lib.rename("a", "c")
    assert sorted(p.name for p in lib.root.iterdir()) == ["b.md", "b.png", "b.safetensors", "c.md", "c.png",
                                                           "c.safetensors", "c.toml"]
    gone = lib.delete("c")
    assert {p.name for p in gone} == {"c.md", "c.png", "c.safetensors", "c.toml"}
    assert sorted(p.name for p in lib.root.iterdir()) == ["b.md", "b.png", "b.safetensors"]


def test_export_kohya_keeps_metadata(lib, src, tmp_path):
    lib.import_file(src, name="s")
    out = lib.export("s", "kohya", tmp_path)
    sd, meta = load_safetensors(out)
    assert out == tmp_path / "s.safetensors"
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight" in sd
    assert float(sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 2.0
    assert meta["modelspec.trigger_phrase"] == "sks" and meta["ss_network_dim"] == "4"
    back = lib.export("s", "peft")
    assert back.parent == lib.root / "exports"
    assert set(load_safetensors(back)[0]) == set(load_safetensors(lib.path_for("s"))[0])


def test_default_root_follows_lora_studio_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path / "home"))
    assert default_library_root() == tmp_path / "home" / "loras"
    assert AdapterLibrary().root == tmp_path / "home" / "loras"
    monkeypatch.delenv("LORA_STUDIO_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_library_root() == tmp_path / "xdg" / "lora-studio" / "loras"


def test_check_name_strips_the_suffix():
    assert check_name("style.safetensors") == "style"
    assert check_name("Über style (v2)") == "Über style (v2)"


def test_cli_loras_commands(src, tmp_path, capsys):
    lib = str(tmp_path / "cli-lib")
    assert main(["loras", "--library", lib, "import", str(src), "--name", "mine"]) == 0
    assert main(["loras", "list", "--library", lib]) == 0
    out = capsys.readouterr().out
    assert "mine" in out and "sd1" in out and "sks" in out
    assert main(["loras", "--library", lib]) == 0  # no action: the list
    assert out.endswith(capsys.readouterr().out) and "NAME" in out
    assert main(["loras", "--library", lib, "export", "mine", "--format", "kohya", "--out",
                 str(tmp_path / "k.safetensors")]) == 0
    assert any(k.startswith("lora_unet_") for k in load_safetensors(tmp_path / "k.safetensors")[0])
    # a half-size copy, in either format, with the same weights rounded to fp16
    ref, _ = load_safetensors(tmp_path / "k.safetensors")
    for fmt in ("kohya", "peft"):
        assert main(["loras", "--library", lib, "export", "mine", "--format", fmt, "--precision", "fp16",
                     "--out", str(tmp_path / f"{fmt}16.safetensors")]) == 0
        half, _ = load_safetensors(tmp_path / f"{fmt}16.safetensors")
        assert {v.dtype for k, v in half.items() if not k.endswith(".alpha")} == {torch.float16}
    half, _ = load_safetensors(tmp_path / "kohya16.safetensors")
    assert half.keys() == ref.keys()
    assert all(torch.equal(ref[k].half(), half[k]) for k in ref if not k.endswith(".alpha"))
    assert all(torch.equal(ref[k], half[k]) for k in ref if k.endswith(".alpha"))  # the scale is untouched
    assert main(["loras", "--library", lib, "rename", "mine", "yours"]) == 0
    assert main(["loras", "--library", lib, "rm", "../yours"]) == 2
    assert "not allowed" in capsys.readouterr().err
    assert main(["loras", "--library", lib, "rm", "yours"]) == 0
    assert main(["loras", "--library", lib, "list"]) == 0
    assert "no adapters" in capsys.readouterr().out


def test_cli_loras_info_describes_a_library_adapter_or_any_file(src, tmp_path, tiny_sd1_dir, capsys):
    """`loras info`: what a downloaded or trained adapter is (base, trigger, rank, training, the card's step
    range) before it is used; --card and --metadata print the card and the raw metadata."""
    lib = str(tmp_path / "info-lib")
    meta = lora_metadata(family="sd1", rank=4, alpha=2.0, name="mine", trigger_word="ohwx", steps=300,
                         num_images=12, resolution=64, base_model="toy-sd",
                         extra={"ss_unet_lr": "0.001", "ss_text_encoder_lr": "0", "ss_seed": "7"})
    meta["lora_studio.suggested_start"] = "10/20"
    trained = _lora(tmp_path / "trained.safetensors")
    sd, _ = load_safetensors(trained)
    save_adapter(sd, trained, meta)
    assert main(["loras", "--library", lib, "import", str(trained), "--name", "mine"]) == 0
    (tmp_path / "info-lib" / "mine.md").write_text("# mine\n\nthe card\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["loras", "--library", lib, "info", "mine"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mine\n")
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "SD 1.x (from its metadata), trained on toy-sd" in rows["base"]
    assert rows["trigger"].split()[1:] == ["ohwx"]
    assert "LoRA rank 4, alpha 2; 3 layers in unet, text_encoder: q_proj, to_k, to_q" in rows["network"]
    assert "300 steps, 12 images, 64 px, lr 0.001 (UNet only), seed 7" in rows["training"]
    assert "from step 10 of 20: <lora:mine:1:start=10>" in rows["step"]
    assert "<lora:mine:1> in a prompt" in rows["use"] and "info mine --card" in rows["model"]
    assert main(["loras", "--library", lib, "info", "mine", "--card"]) == 0
    assert capsys.readouterr().out == "# mine\n\nthe card\n"
    assert main(["loras", "--library", lib, "info", "mine", "--metadata"]) == 0
    import json
    printed = json.loads(capsys.readouterr().out)
    assert printed["lora_studio.trigger"] == "ohwx" and printed["ss_seed"] == "7"
    # a file that is not in the library: described where it is, without a card
    assert main(["loras", "--library", lib, "info", str(src)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("My Style\n") and "loras import" in out and "sks" in out and "step range" not in out
    assert main(["loras", "--library", lib, "info", str(src), "--card"]) == 0  # My Style.md beside it
    assert capsys.readouterr().out == "# card"
    # does it fit my base? A file made for this base: every layer; the errors name what is wrong
    from lora_helpers import make_lora

    from pipelines.base_models import load_base

    fits = save_adapter(make_lora(load_base(tiny_sd1_dir, device="cpu").pipe, rank=2), tmp_path / "fits.safetensors",
                        lora_metadata(family="sd1", rank=2, alpha=2))
    assert main(["loras", "--library", lib, "info", str(fits), "--base", str(tiny_sd1_dir)]) == 0
    fit_row = [line for line in capsys.readouterr().out.splitlines()[1:] if line.split()[0] == "fits"]
    total = len({k.rsplit(".lora_", 1)[0] for k in load_safetensors(fits)[0]})
    assert fit_row and f"{total} of {total} layers match" in fit_row[0]
    xl = _lora(tmp_path / "xl.safetensors", family="sdxl")
    assert main(["loras", "--library", lib, "info", str(xl), "--base", str(tiny_sd1_dir)]) == 2
    assert "xl.safetensors: this adapter was made for SDXL" in capsys.readouterr().err
    assert main(["loras", "--library", lib, "info", "nope"]) == 2
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "nan.safetensors"
    sd[next(iter(sd))][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(sd, str(bad), meta)  # our writers refuse such tensors; other tools' do not
    assert main(["loras", "--library", lib, "info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "nan.safetensors" in err and "finite" in err.lower()


def test_a1111_user_metadata_gives_the_trigger_and_goes_with_exports(lib, tmp_path):
    """An adapter from AUTOMATIC1111 / a civitai helper carries its trigger word in `name.json` ("activation
    text") rather than in the file: the library shows it, and a kohya export takes the file along; a broken
    file of that name is ignored, not an error."""
    import json

    d = tmp_path / "a1111"
    d.mkdir()
    _lora(d / "dl.safetensors", trigger="")
    user = {"description": "", "sd version": "SD1", "activation text": " zxc style ", "preferred weight": 0.7,
            "negative text": "", "notes": ""}
    (d / "dl.json").write_text(json.dumps(user))
    lib.import_file(d / "dl.safetensors")
    assert lib.info("dl").trigger_word == "zxc style"
    out = lib.export("dl", "kohya", tmp_path / "out.safetensors")
    assert json.loads(out.with_suffix(".json").read_text()) == user
    # a rename carries the file and the tag its notes give (as training writes them)
    user["notes"] = "Acting from step 10 of 20 keeps more of the base (<lora:dl:1:start=10> with ...)."
    (lib.root / "dl.json").write_text(json.dumps(user))
    lib.rename("dl", "Über dl")
    moved = json.loads((lib.root / "Über dl.json").read_text(encoding="utf-8"))
    assert not (lib.root / "dl.json").exists() and "<lora:Über dl:1:start=10>" in moved["notes"]
    assert {k: v for k, v in moved.items() if k != "notes"} == {k: v for k, v in user.items() if k != "notes"}
    # an export under another file name (A1111 names the adapter after it): the notes' tag names the export
    exported = lib.export("Über dl", "kohya")
    assert exported.name == "Über dl.kohya.safetensors"
    assert "<lora:Über dl.kohya:1:start=10>" in json.loads(exported.with_suffix(".json").read_text())["notes"]
    (lib.root / "Über dl.json").write_text("{not json")
    assert [(r.name, r.trigger_word) for r in lib.list()] == [("Über dl", "")]


def test_a_picture_becomes_the_adapters_preview(lib, src, tmp_path, capsys):
    """A1111's "replace preview": NAME.png beside the adapter, the card here (and there); from a file (the CLI) or a
    picture; a link at NAME.png is never written through, and a file that is not a picture is named."""
    lib.import_file(src, "card")
    made = tmp_path / "made.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(made)
    assert main(["loras", "preview", "card", str(made), "--library", str(lib.root)]) == 0
    shown = lib.info("card").preview
    assert shown == lib.root / "card.png" and Image.open(shown).getpixel((0, 0)) == (200, 10, 10)
    lib.set_preview("card", Image.new("RGB", (8, 8), (0, 0, 255)))  # replaced
    assert Image.open(lib.root / "card.png").getpixel((0, 0)) == (0, 0, 255)
    junk = tmp_path / "notes.png"
    junk.write_text("not a picture")
    with pytest.raises(ConfigError, match="image: notes.png: not a picture"):
        lib.set_preview("card", junk)
    (lib.root / "card.png").unlink()
    os.symlink(made, lib.root / "card.png")
    with pytest.raises(UnsafeNameError, match="card.png is a link"):
        lib.set_preview("card", made)
    assert main(["loras", "preview", "card", str(tmp_path / "gone.png"), "--library", str(lib.root)]) != 0
    assert "gone.png: no such file" in capsys.readouterr().err
