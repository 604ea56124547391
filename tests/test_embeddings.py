"""Textual-inversion embeddings named in the prompt (EasyNegative & co), as AUTOMATIC1111 loads them."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines.base_models import load_base
from pipelines.embeddings import embedding_files, use_embeddings
from pipelines.generation import GenerationRequest, generate
from pipelines.prompts import encode


@pytest.fixture
def toy(toy_base_dir):
    return load_base(toy_base_dir, device="cpu")  # a fresh copy: embeddings grow its tokenizer


def _words(model, *words) -> torch.Tensor:
    """The toy text encoder's input embeddings of known words: an embedding made of them must act like them."""
    tok, emb = model.pipe.tokenizer, model.pipe.text_encoder.get_input_embeddings().weight
    return torch.stack([emb[tok(w, add_special_tokens=False).input_ids[0]].detach().clone() for w in words])


def test_an_embedding_named_in_the_prompt_acts_as_its_vectors_say(toy, tmp_path):
    """An embedding whose two vectors are the words 'blue' and 'square' draws what 'blue square' draws, named
    in any case, and in a weighted or long prompt too; the word means nothing before the file is there."""
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": _words(toy, "blue", "square")}, folder / "BlueThing.safetensors")  # A1111's layout
    torch.save({"string_to_param": {"*": _words(toy, "green")}, "name": "greeny", "step": 10},
               folder / "greeny.pt")  # A1111's older .pt
    (folder / "notes.txt").write_text("not an embedding")
    assert sorted(embedding_files(folder)) == ["bluething", "greeny"]
    req = dict(steps=8, seed=4)
    want = np.asarray(generate(toy, GenerationRequest(prompt="a blue square on a white background", **req))[0].image,
                      dtype=np.int16)
    before = np.asarray(generate(toy, GenerationRequest(prompt="a bluething on a white background", **req))[0].image,
                        dtype=np.int16)
    assert use_embeddings(toy, folder, ["a BlueThing on a white background"]) == []
    got = np.asarray(generate(toy, GenerationRequest(prompt="a BlueThing on a white background", **req))[0].image,
                     dtype=np.int16)
    assert np.abs(got - want).max() <= 1 and np.abs(before - want).mean() > 1
    with torch.no_grad():  # the tokens stand where the word stood, with the word's weight
        a = encode(toy, "a (bluething:1.3) on a white background", "", None)["prompt_embeds"]
        b = encode(toy, "a (blue square:1.3) on a white background", "", None)["prompt_embeds"]
    assert torch.allclose(a, b, atol=1e-5)
    # the .pt needs pickles allowed: said, and the word stays text
    warned = use_embeddings(toy, folder, ["a greeny circle"])
    assert len(warned) == 1 and "greeny.pt" in warned[0] and "pickle" in warned[0]
    assert use_embeddings(toy, folder, ["a greeny circle"], allow_pickle=True) == []
    with torch.no_grad():
        assert torch.allclose(encode(toy, "a greeny circle", "", None)["prompt_embeds"],
                              encode(toy, "a green circle", "", None)["prompt_embeds"], atol=1e-5)
    # a word that merely contains the name is left alone: it reads as without any embedding loaded
    with torch.no_grad():
        contains = encode(toy, "a bluethings", "", None)["prompt_embeds"]
    fresh = load_base(toy.source, device="cpu")
    with torch.no_grad():
        assert torch.equal(contains, encode(fresh, "a bluethings", "", None)["prompt_embeds"])
    # the file replaced: read again; deleted: the word is text again
    import os
    import time

    before_swap = encode(toy, "a bluething", "", None)["prompt_embeds"]
    save_file({"emb_params": _words(toy, "red", "circle")}, folder / "BlueThing.safetensors")
    os.utime(folder / "BlueThing.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert use_embeddings(toy, folder, ["a bluething"]) == []
    with torch.no_grad():
        swapped = encode(toy, "a bluething", "", None)["prompt_embeds"]
        assert torch.allclose(swapped, encode(toy, "a red circle", "", None)["prompt_embeds"], atol=1e-5)
        assert not torch.equal(swapped, before_swap)
    (folder / "BlueThing.safetensors").unlink()
    assert use_embeddings(toy, folder, ["a bluething"]) == []
    with torch.no_grad():
        assert not torch.allclose(encode(toy, "a bluething", "", None)["prompt_embeds"], swapped, atol=1e-3)


def test_an_embedding_for_another_model_is_named_and_skipped(toy, tiny_sdxl_dir, tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.randn(2, 768)}, folder / "wide.safetensors")
    save_file({"clip_l": torch.randn(1, 128), "clip_g": torch.randn(1, 128)}, folder / "xl.safetensors")
    save_file({"emb_params": torch.tensor([[float("nan")] * 128])}, folder / "broken.safetensors")
    warned = use_embeddings(toy, folder, ["wide xl broken"])
    assert any("wide.safetensors" in w and "768 wide" in w and "another kind of model" in w for w in warned)
    assert any("xl.safetensors" in w and "SDXL embedding" in w for w in warned)
    assert any("broken.safetensors" in w for w in warned) and len(warned) == 3
    assert not any(str(folder) in w for w in warned)  # no server folder in what the app shows
    out = generate(toy, GenerationRequest(prompt="a wide circle", steps=2, seed=1))[0]  # the word stays text
    assert out.image.size == (64, 64)
    xl = load_base(tiny_sdxl_dir, device="cpu")
    width_l = xl.pipe.text_encoder.get_input_embeddings().weight.shape[1]
    width_g = xl.pipe.text_encoder_2.get_input_embeddings().weight.shape[1]
    save_file({"clip_l": torch.randn(2, width_l), "clip_g": torch.randn(2, width_g)}, folder / "xlgood.safetensors")
    with torch.no_grad():
        before = encode(xl, "a xlgood cat", "", None)
        assert use_embeddings(xl, folder, ["a xlgood cat"]) == []
        after = encode(xl, "a xlgood cat", "", None)
    assert not torch.equal(before["prompt_embeds"], after["prompt_embeds"])  # both encoders' halves take it
    assert not torch.equal(before["pooled_prompt_embeds"], after["pooled_prompt_embeds"])
    # the pooled vector is read at the end-of-text token, never at an embedding's (higher) added token id
    from pipelines.prompts import chunks

    ids = chunks(xl.pipe.tokenizer_2, "a xlgood cat", lambda t: t.replace("xlgood", "<ti:xlgood:0> <ti:xlgood:1>"))[0][0]
    with torch.no_grad():
        te2 = xl.pipe.text_encoder_2
        hidden = te2(torch.tensor([ids]), output_hidden_states=True).last_hidden_state
        want = te2.text_projection(hidden[:, ids.index(xl.pipe.tokenizer_2.eos_token_id)])
    assert torch.allclose(after["pooled_prompt_embeds"], want, atol=1e-6)
    assert generate(xl, GenerationRequest(prompt="a xlgood cat", steps=2, seed=1))[0].image is not None


def test_studio_and_cli_load_embeddings_from_the_models_folder(toy_base_dir, tmp_path, monkeypatch, capsys):
    from app.cli import main
    from app.studio import Studio

    home = tmp_path / "home"
    studio = Studio(home=home, device="cpu")
    base = load_base(toy_base_dir, device="cpu")
    save_file({"emb_params": _words(base, "blue", "square")}, studio.embeddings_dir / "bluething.safetensors")
    assert studio.embedding_names() == ["bluething"]
    req = GenerationRequest(prompt="a bluething on a white background", steps=6, seed=2)
    res = studio.generate(None, req)
    plain = studio.generate(None, GenerationRequest(prompt="a blue square on a white background", steps=6, seed=2))
    from PIL import Image

    a, b = (np.asarray(Image.open(r.paths[0]), dtype=np.int16) for r in (res, plain))
    assert np.abs(a - b).max() <= 1 and res.embedding_warnings == []
    import hashlib

    from app.ui import StudioUI
    from pipelines.generation import parse_parameters, read_png_parameters

    text = read_png_parameters(res.paths[0])  # A1111's TI hashes: the file's name and the start of its SHA-256
    digest = hashlib.sha256((studio.embeddings_dir / "bluething.safetensors").read_bytes()).hexdigest()[:12]
    assert parse_parameters(text)["TI hashes"] == f"bluething: {digest}"
    assert "TI hashes" not in read_png_parameters(plain.paths[0])
    ui = StudioUI(studio)
    assert ui.insert_embedding("blurry", "bluething") == "blurry, bluething"
    assert ui.insert_embedding("blurry, BlueThing", "bluething") == "blurry, BlueThing"  # there already
    assert ui.refresh_embeddings("gone")["choices"] == ["bluething"]
    out = ui.recall_form(text, ui.base_names()[0])
    assert "embedding" not in out[-1]  # it is here
    elsewhere = text.replace("bluething: ", "EasyNegative: ")
    with pytest.warns(UserWarning):
        out = ui.recall_form(elsewhere, ui.base_names()[0])
    assert "the image used the embedding 'EasyNegative', which is not in embeddings/" in out[-1]
    monkeypatch.setenv("LORA_STUDIO_HOME", str(home))
    out = tmp_path / "cli.png"
    assert main(["generate", "--base", str(toy_base_dir), "--device", "cpu", "--steps", "6", "--seed", "2",
                 "--prompt", "a bluething on a white background", "--out", str(out)]) == 0
    assert np.abs(np.asarray(Image.open(out), dtype=np.int16) - b).max() <= 1
    assert main(["generate", "--base", str(toy_base_dir), "--device", "cpu", "--prompt", "x",
                 "--embeddings", str(tmp_path / "nope")]) == 2
    assert "--embeddings: " in capsys.readouterr().err


def test_embeddings_are_listed_renamed_and_deleted_with_their_preview_and_card(toy_base_dir, tmp_path, monkeypatch,
                                                                               capsys):
    """The Library's Embeddings section and `lora-studio embeddings --rename / --delete`: the word a prompt
    writes changes with the file's name, and the preview and card follow it."""
    from app.cli import main
    from app.studio import Studio
    from app.ui import EMBEDDING_COLUMNS, StudioUI

    home = tmp_path / "home"
    monkeypatch.setenv("LORA_STUDIO_HOME", str(home))
    studio = Studio(home=home, device="cpu")
    base = load_base(toy_base_dir, device="cpu")
    folder = studio.embeddings_dir
    save_file({"emb_params": _words(base, "blue", "square")}, folder / "bluething.safetensors")
    (folder / "bluething.preview.png").write_bytes(b"png")
    (folder / "bluething.md").write_text("card")
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, folder / "xlword.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not a file")
    ui = StudioUI(studio)
    rows = {r[0]: r for r in ui.embedding_rows()}
    assert len(EMBEDDING_COLUMNS) == len(rows["bluething"])
    assert rows["bluething"][1:3] == [2, "width 128"] and rows["bluething"][5] == "preview, card"
    assert rows["xlword"][1:3] == [2, "sdxl"] and rows["broken"][2].startswith("unreadable: ")
    # rename: the files move together, prompts write the new word, the pickers follow
    msg, table, lib_pick, gen_pick, cleared = ui.rename_embedding("bluething", "blue-square")
    assert sorted(p.name for p in folder.iterdir()) == ["blue-square.md", "blue-square.preview.png",
                                                        "blue-square.safetensors", "broken.safetensors",
                                                        "xlword.safetensors"]
    assert lib_pick["value"] == "blue-square" and "blue-square" in gen_pick["choices"] and cleared == ""
    assert "blue-square" in list(table["word"])
    res = studio.generate(None, GenerationRequest(prompt="a blue-square on a white background", steps=4, seed=2))
    assert "blue-square: " in res.images[0].parameters and res.embedding_warnings == []
    for old, new, why in (("blue-square", "two words", "must be one word"), ("blue-square", "XLword", "already in"),
                          ("nothing", "x", "no embedding named 'nothing'")):
        with pytest.raises(gr.Error, match=why):
            ui.rename_embedding(old, new)
    # delete asks first, then removes the file with its preview and card
    box, question, _ = ui.ask_delete_embedding("blue-square")
    assert box["visible"] and "blue-square" in question
    msg, box, table, lib_pick, gen_pick = ui.delete_embedding("blue-square")
    assert not box["visible"] and "blue-square" not in gen_pick["choices"]
    assert sorted(p.name for p in folder.iterdir()) == ["broken.safetensors", "xlword.safetensors"]
    # the same from a terminal
    assert main(["embeddings", "--rename", "xlword", "xl-thing"]) == 0
    assert "write 'xl-thing' in a prompt" in capsys.readouterr().out
    assert main(["embeddings"]) == 0
    out = capsys.readouterr()
    assert "xl-thing" in out.out and "sdxl" in out.out and "broken.safetensors" in out.err
    assert main(["embeddings", "--delete", "xl-thing"]) == 0 and not (folder / "xl-thing.safetensors").exists()
    assert main(["embeddings", "--rename", "nope", "x"]) == 2
    assert "no embedding named 'nope'" in capsys.readouterr().err
