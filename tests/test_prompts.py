"""AUTOMATIC1111's prompt syntax: (word:1.5) weights, prompts past 75 tokens, BREAK."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.base_models import load_base
from pipelines.generation import GenerationRequest, generate
from pipelines.prompts import CHUNK, chunks, encode, needs_syntax, parse_attention

LONG = ", ".join(["a red circle on a white background"] * 12)  # well past one chunk of 75 tokens


@pytest.mark.parametrize("text,want", [
    ("a (red) b", [("a ", 1.0), ("red", 1.1), (" b", 1.0)]),
    ("((red))", [("red", 1.1 * 1.1)]),
    ("[red]", [("red", 1 / 1.1)]),
    ("(red:1.5) x", [("red", 1.5), (" x", 1.0)]),
    ("(a [b] c:2)", [("a ", 2.0), ("b", 2 / 1.1), (" c", 2.0)]),
    (r"\(literal\) [x", [("(literal) ", 1.0), ("x", 1 / 1.1)]),  # escapes; an unclosed bracket acts to the end
    ("one BREAK two", [("one", 1.0), ("BREAK", -1.0), ("two", 1.0)]),
    ("a: b", [("a: b", 1.0)]),  # a colon outside a weight is text
    ("", [("", 1.0)]),
])
def test_attention_syntax_reads_as_automatic1111_does(text, want):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


@pytest.fixture(scope="module")
def toy(toy_base_dir):
    return load_base(toy_base_dir, device="cpu")


def _img(model, prompt, **kw):
    return np.asarray(generate(model, GenerationRequest(prompt=prompt, steps=8, seed=3, **kw))[0].image, dtype=np.int16)


def test_plain_prompts_keep_diffusers_encoding_and_weight_one_changes_nothing(toy, tiny_sdxl_dir):
    tok = toy.pipe.tokenizer
    assert not needs_syntax(tok, "a red circle, on a white background")
    assert needs_syntax(tok, "a (red) circle") and needs_syntax(tok, "a BREAK b") and needs_syntax(tok, LONG)
    with torch.no_grad():
        ours = encode(toy, "a red circle on a white background", "blue", None)
        pe, ne = toy.pipe.encode_prompt("a red circle on a white background", "cpu", 1, True, negative_prompt="blue")
        assert torch.equal(ours["prompt_embeds"], pe) and torch.equal(ours["negative_prompt_embeds"], ne)
        xl = load_base(tiny_sdxl_dir, device="cpu")  # two encoders, pooled embeddings, zeros for an empty negative
        for neg in ("dog", ""):
            ours = encode(xl, "a cat", neg, None)
            theirs = xl.pipe.encode_prompt(prompt="a cat", device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=True, negative_prompt=neg or None)
            keys = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
            assert all(torch.equal(ours[k], t) for k, t in zip(keys, theirs)), neg
    assert np.array_equal(_img(toy, "a (red:1.0) circle on a white background"),
                          _img(toy, "a red circle on a white background"))


def test_a_weight_scales_its_tokens_and_changes_the_picture(toy):
    with torch.no_grad():
        plain = encode(toy, "a red circle on a white background", "", None)["prompt_embeds"]
        heavy = encode(toy, "a (red:1.5) circle on a white background", "", None)["prompt_embeds"]
    ids = chunks(toy.pipe.tokenizer, "a red circle")[0][0]
    red = ids.index(toy.pipe.tokenizer("red", add_special_tokens=False).input_ids[0])
    ratio = (heavy / plain)[0]  # every token scaled by the same mean-restoring factor, the weighted one by 1.5 more
    others = torch.cat([ratio[:red], ratio[red + 1:]]).flatten()
    assert torch.allclose(others, others[0].expand_as(others), rtol=1e-4)
    assert torch.allclose(ratio[red], 1.5 * others[0], rtol=1e-4)
    assert np.abs(_img(toy, "a (red:1.6) circle on a white background")
                  - _img(toy, "a red circle on a white background")).mean() > 1


def test_a_long_prompt_is_encoded_whole_in_chunks_and_its_end_counts(toy):
    tok = toy.pipe.tokenizer
    parts = chunks(tok, LONG)
    assert len(parts) == 2 and all(len(ids) == len(ws) == CHUNK + 2 for ids, ws in parts)
    comma = tok(",", add_special_tokens=False).input_ids[0]
    first = [i for i in parts[0][0][1:] if i != tok.pad_token_id]
    assert first[-1] == comma  # the chunk was cut after its last comma, not inside a phrase
    with torch.no_grad():
        e = encode(toy, LONG, "blurry", None)
    assert e["prompt_embeds"].shape[1] == e["negative_prompt_embeds"].shape[1] == 2 * (CHUNK + 2)  # negative padded
    assert len(chunks(tok, "a BREAK b")) == 2  # BREAK starts a chunk
    # diffusers would cut everything past token 77: here the last words still change the picture
    blue = _img(toy, LONG + ", blue blue blue blue")
    green = _img(toy, LONG + ", green green green green")
    assert np.abs(blue - green).mean() > 1


def test_clip_skip_and_weights_together(toy):
    with torch.no_grad():
        skipped = encode(toy, "a (red:1.0) circle", "", 1)["prompt_embeds"]
        te = toy.pipe.text_encoder
        ids = torch.tensor([chunks(toy.pipe.tokenizer, "a red circle")[0][0]])
        want = getattr(te, "text_model", te).final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])
    assert torch.allclose(skipped, want, atol=1e-6)


def test_a_weight_of_one_on_an_encoder_whose_norm_has_no_bias_stays_finite(tiny_sd1_dir):
    """The tiny model's final layer norm has no bias: its embeddings average to 0, where A1111's mean restore
    would divide 0 by 0. Weight 1 leaves the tokens as they are; other weights stay finite."""
    from pipelines.generation import skipped_embeddings

    tiny = load_base(tiny_sd1_dir, device="cpu")
    with torch.no_grad():  # clip skip 2: the next-to-last layer through the final norm, which has no bias here
        one = encode(tiny, "a (red:1.0) circle", "", 1)["prompt_embeds"]
        plain = skipped_embeddings(tiny.pipe, ["a red circle"], 1, "cpu")
        heavy = encode(tiny, "a (red:1.5) circle", "", 1)["prompt_embeds"]
    assert torch.equal(one, plain) and torch.isfinite(heavy).all()


def test_token_counter_counts_as_automatic1111_shows_it(tmp_path, toy_base_dir):
    """The Generate tab's counter under each prompt box: tokens / the room of the chunks they take; <lora:…> tags
    do not count, prompt editing counts its longest text, BREAK opens a chunk, an embedding counts its vectors."""
    from app.studio import Studio
    from app.ui import StudioUI
    from pipelines.prompts import token_count

    ui = StudioUI(Studio(home=tmp_path / "home", base=str(toy_base_dir), device="cpu"))
    name = ui.base_names()[0]
    assert ui.token_counter(name, "a red circle") == "3/75"  # before the model is loaded: its folder's tokenizer
    assert ui.token_counter(name, "a red circle <lora:style:0.8>") == "3/75"
    assert ui.token_counter(name, "a [red:big blue:0.5] circle") == "4/75"
    assert ui.token_counter(name, "a red BREAK circle") == "3/150"
    assert ui.token_counter(name, LONG) == f"{token_count(ui.studio.model(name).base.pipe.tokenizer, LONG)[0]}/150"
    assert ui.token_counter(name, "") == "0/75"
    assert ui.token_counter("not a model", "a red circle") == ""
