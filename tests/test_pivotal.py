"""Pivotal tuning (`--pivotal`) and LoRA files with bundled embeddings (AUTOMATIC1111's `bundle_emb.<word>.…`).

A user trains the trigger word as new token vectors together with the LoRA; the file carries them, and wherever
the file is loaded (this app, A1111) the trigger word means what was trained. Files from elsewhere with bundled
embeddings load too, and the embedding can be exported for ComfyUI / diffusers."""

from __future__ import annotations

import pytest
import torch

from lora_helpers import assert_resumes_exactly
from pipelines.adapters import embedding_path, export_adapter, inspect_adapter
from pipelines.base_models import load_base
from pipelines.embeddings import bundled, split_bundled, use_embeddings
from pipelines.errors import ConfigError, CorruptWeightsError, IncompatibleAdapterError
from pipelines.stack import AdapterStack, StackEntry
from pipelines.weights_io import load_safetensors, save_safetensors
from training.config import TrainConfig
from training.pivotal import initial_vectors
from training.trainer import Trainer, encode_text, train


def _cfg(images, base, tmp_path, **kw):
    base_kw = dict(images=str(images), base=str(base), output_dir=str(tmp_path / "lib"), max_steps=4, batch_size=2,
                   checkpoint_every=0, device="cpu", sample_steps=2, name="p", rank=4, seed=3, weight_check=False,
                   warmup_steps=0, pivotal=True, lr_ti=5e-2, ti_frac=0.5, ti_vectors=3)
    base_kw.update(kw)
    return TrainConfig(**base_kw)


def _cond(model, prompt):
    with torch.no_grad():
        pe, pooled = encode_text(model, [prompt])
    return pe, pooled


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_trained_trigger_travels_in_the_file(star_images, tiny_sd1_dir, tiny_sd2_dir, tiny_sdxl_dir, tmp_path,
                                                 family):
    base_dir = {"sd1": tiny_sd1_dir, "sd2": tiny_sd2_dir, "sdxl": tiny_sdxl_dir}[family]
    tr = Trainer(_cfg(star_images, base_dir, tmp_path))
    start = initial_vectors(load_base(str(base_dir), device="cpu").pipe, 3, None, 3)
    res = tr.run()
    trained = tr.pivotal.vectors()
    assert set(trained) == ({"clip_l", "clip_g"} if family == "sdxl" else {""})
    for k, v in trained.items():
        assert v.shape == start[k].shape and not torch.allclose(v, start[k])  # the vectors trained
    sd, meta = load_safetensors(res.adapter_path)
    emb = {k: v for k, v in sd.items() if k.startswith("bundle_emb.")}
    # A1111's bundled-embedding keys: SD 1.x a textual-inversion file's string_to_param, SDXL clip_l / clip_g
    want = {"bundle_emb.sks.clip_l", "bundle_emb.sks.clip_g"} if family == "sdxl" else {"bundle_emb.sks.string_to_param.*"}
    assert set(emb) == want
    assert all(k.startswith(("lora_unet_", "lora_te", "bundle_emb.")) for k in sd)
    card = res.adapter_path.with_suffix(".md").read_text()
    assert "bundle_emb.sks" in card and "--format embedding" in card
    # the trigger prompt as the trained model encodes it ...
    prompt = "a photo of sks"
    pe_trained, pooled_trained = _cond(tr.base, prompt)
    # ... and with the file loaded into a fresh base by the app's stack: the same conditioning
    fresh = load_base(str(base_dir), device="cpu")
    plain, _ = _cond(fresh, prompt)
    stack = AdapterStack(fresh)
    stack.load("p", res.adapter_path)
    stack.set_stack([StackEntry("p", 1.0)])
    assert "sks" in bundled(fresh)
    pe_file, pooled_file = _cond(fresh, prompt)
    torch.testing.assert_close(pe_file, pe_trained, rtol=1e-4, atol=1e-5)
    if family == "sdxl":
        torch.testing.assert_close(pooled_file, pooled_trained, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pe_file, plain, atol=1e-3)  # the word now means something else than its text
    # out of the stack, the word is text again (as in A1111: the embedding comes with the adapter)
    stack.clear()
    assert "sks" not in bundled(fresh)
    torch.testing.assert_close(_cond(fresh, prompt)[0], plain)
    stack.set_stack([StackEntry("p", 0.7)])
    torch.testing.assert_close(_cond(fresh, prompt)[0], pe_file)  # the embedding does not scale with the weight
    stack.unload()
    torch.testing.assert_close(_cond(fresh, prompt)[0], plain)


def test_pivotal_resumes_exactly_and_continues(star_images, tiny_sd1_dir, tmp_path):
    # stopped at step 1 (the vectors still train) and resumed: the same adapter and vectors as one run
    sd = assert_resumes_exactly(lambda sub, **kw: _cfg(star_images, tiny_sd1_dir, tmp_path / sub, checkpoint_every=1,
                                                       **kw), stop_at=1)
    assert "bundle_emb.sks.string_to_param.*" in sd
    first = tmp_path / "a" / "lib" / "p.safetensors"
    # train more on top: the vectors continue from the file's
    more = Trainer(_cfg(star_images, tiny_sd1_dir, tmp_path / "c", init_adapter=str(first), max_steps=1,
                        lr_ti=1e-9, lr_unet=1e-9))
    more.run()
    torch.testing.assert_close(more.pivotal.vectors()[""], sd["bundle_emb.sks.string_to_param.*"], rtol=1e-4,
                               atol=1e-5)
    # without pivotal tuning its embedding would be lost: refused, naming the file
    with pytest.raises(ConfigError, match="pivotal"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path / "d", init_adapter=str(first), pivotal=False))
    with pytest.raises(IncompatibleAdapterError, match="ti_vectors = 3"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path / "e", init_adapter=str(first), ti_vectors=2))


def test_vectors_stop_after_their_share_and_start_from_a_word(star_images, tiny_sd1_dir, tmp_path):
    tr = Trainer(_cfg(star_images, tiny_sd1_dir, tmp_path, max_steps=4, ti_frac=0.25, ti_init="circle",
                      lr_unet=1e-3))
    tr.build()
    table = tr.base.pipe.text_encoder.get_input_embeddings().weight
    ids = tr.base.pipe.tokenizer("circle", add_special_tokens=False).input_ids
    torch.testing.assert_close(tr.pivotal.vectors()[""], table[[ids[0]] * 3].detach().float())
    tr._restore()
    tr.train_step(0)
    after_first = tr.pivotal.vectors()[""]
    assert not torch.allclose(after_first, table[[ids[0]] * 3].detach().float())
    tr.train_step(1)  # 0.25 of 4 steps: the vectors are done, the LoRA goes on
    torch.testing.assert_close(tr.pivotal.vectors()[""], after_first)
    assert tr.pivotal.frozen


def test_pivotal_options_are_checked():
    from training.optimizers import check_rates

    with pytest.raises(ConfigError, match="trigger"):
        TrainConfig(images="x", trigger="my dog", pivotal=True)
    with pytest.raises(ConfigError, match="lr_ti"):
        check_rates(TrainConfig(images="x", pivotal=True, optimizer="prodigy", lr_unet=1.0, lr_ti=5e-4))
    # Prodigy: the embedding takes its multiplier too, unless given
    assert TrainConfig.from_dict({"images": "x", "pivotal": True, "optimizer": "prodigy"}).lr_ti == 1.0


@pytest.mark.parametrize("form", ["string_to_param", "emb_params"])
def test_a_file_with_a_bundled_embedding_from_elsewhere(tiny_sd1_dir, tmp_path, form):
    """Files trained elsewhere carry `bundle_emb.<word>.string_to_param.*` or `.emb_params` (SD 1.x): the word works
    while the adapter is in use, the Library says so, and the embedding exports for ComfyUI / diffusers."""
    from lora_helpers import make_lora
    from pipelines.adapters import lora_metadata, save_kohya
    from pipelines.library import AdapterLibrary

    model = load_base(str(tiny_sd1_dir), device="cpu")
    width = model.pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vec = torch.randn(2, width, generator=torch.Generator().manual_seed(1)) * 0.3
    lib = AdapterLibrary(tmp_path / "lib")
    lib.root.mkdir(parents=True)
    path = lib.root / "x.safetensors"
    save_kohya(make_lora(model.pipe, rank=2), path, lora_metadata(family="sd1", rank=2, alpha=2), family="sd1",
               alphas=2.0, layout=None)
    sd, meta = load_safetensors(path)
    sd["bundle_emb.ohwx.string_to_param.*" if form == "string_to_param" else "bundle_emb.ohwx.emb_params"] = vec
    save_safetensors(sd, path, meta)
    info = inspect_adapter(path)
    assert info.embeddings == {"ohwx": 2}
    prompt = "a red ohwx on a black background"
    before, _ = _cond(model, prompt)
    stack = AdapterStack(model, library=lib)
    stack.set_stack([StackEntry("x", 0.0)])  # at weight 0: the LoRA does nothing, the word is the embedding
    after, _ = _cond(model, prompt)
    assert not torch.allclose(before, after, atol=1e-4)
    stack.unload()
    torch.testing.assert_close(_cond(model, prompt)[0], before)
    # export: the embedding alone (named after its word), and beside a diffusers-format copy
    out = lib.export("x", "embedding")
    assert out.name == "ohwx.safetensors"
    emb, _ = load_safetensors(out)
    torch.testing.assert_close(emb["emb_params"], vec)
    peft = lib.export("x", "peft")
    assert embedding_path(peft).is_file()
    assert not any(k.startswith("bundle_emb") for k in load_safetensors(peft)[0])
    kohya = lib.export("x", "kohya", tmp_path / "k.safetensors")
    torch.testing.assert_close(split_bundled(load_safetensors(kohya)[0])[1]["ohwx"][""], vec)
    # the exported file in an embeddings folder works as the same word
    folder = tmp_path / "emb"
    folder.mkdir()
    out.rename(folder / out.name)
    assert use_embeddings(model, folder, [prompt]) == []
    torch.testing.assert_close(_cond(model, prompt)[0], after)


def test_bundled_embeddings_that_do_not_fit_are_refused(tiny_sd1_dir, tiny_sdxl_dir, tmp_path):
    with pytest.raises(CorruptWeightsError, match="bundled embedding 'a'"):
        split_bundled({"bundle_emb.a.string_to_param.*": torch.zeros(2, 7), "bundle_emb.a.other": torch.zeros(2, 7)},
                      "f.safetensors")
    with pytest.raises(CorruptWeightsError, match="bundle_emb.a"):
        split_bundled({"bundle_emb.a": torch.zeros(2, 7)}, "f.safetensors")
    # an SD 1.x embedding in an SDXL adapter file: the load names the file and the word, the model stays as it was
    from lora_helpers import make_lora
    from pipelines.adapters import lora_metadata, save_kohya
    from pipelines.single_file import unet_layout

    model = load_base(str(tiny_sdxl_dir), device="cpu")
    path = tmp_path / "x.safetensors"
    save_kohya(make_lora(model.pipe, rank=2), path, lora_metadata(family="sdxl", rank=2, alpha=2), family="sdxl",
               alphas=2.0, layout=unet_layout(model.pipe.unet), embeddings={"ohwx": {"": torch.zeros(2, 32)}})
    stack, vocab = AdapterStack(model), len(model.pipe.tokenizer)
    with pytest.raises(IncompatibleAdapterError, match="x.safetensors: its bundled embedding 'ohwx'"):
        stack.load("x", path)
    assert stack.loaded == {} and len(model.pipe.tokenizer) == vocab


def _adapter_with_word(model, path, word, vec, seed=0):
    from lora_helpers import make_lora
    from pipelines.adapters import lora_metadata, save_kohya

    save_kohya(make_lora(model.pipe, rank=2, seed=seed), path, lora_metadata(family="sd1", rank=2, alpha=2),
               family="sd1", alphas=2.0, layout=None, embeddings={word: {"": vec}} if vec is not None else None)
    return path


def test_baking_keeps_the_trained_word(tiny_sd1_dir, tmp_path):
    """A stack baked into one adapter carries its adapters' embeddings; baked into a checkpoint, each embedding is
    written beside it as an embeddings-folder file (a checkpoint holds none)."""
    model = load_base(str(tiny_sd1_dir), device="cpu")
    width = model.pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vec = torch.randn(2, width, generator=torch.Generator().manual_seed(4)) * 0.3
    x = _adapter_with_word(model, tmp_path / "x.safetensors", "ohwx", vec)
    y = _adapter_with_word(model, tmp_path / "y.safetensors", "", None, seed=1)
    stack = AdapterStack(model)
    stack.load("x", x)
    stack.load("y", y)
    stack.set_stack([StackEntry("x", 0.5), StackEntry("y", 1.0)])
    prompt = "a blue ohwx on a white background"
    want, _ = _cond(model, prompt)
    baked = stack.bake(tmp_path / "b.safetensors")
    torch.testing.assert_close(split_bundled(load_safetensors(baked)[0])[1]["ohwx"][""], vec)
    stack.unload()
    stack.load("b", baked)
    stack.set_stack([StackEntry("b", 1.0)])
    torch.testing.assert_close(_cond(model, prompt)[0], want, rtol=1e-4, atol=1e-5)
    stack.unload()
    stack.load("x", x)
    stack.set_stack([StackEntry("x", 1.0)])
    (tmp_path / "ckpt").mkdir()
    ckpt = stack.bake_checkpoint(tmp_path / "ckpt" / "m.safetensors")
    emb, meta = load_safetensors(tmp_path / "ckpt" / "ohwx.safetensors")
    torch.testing.assert_close(emb["emb_params"], vec)
    assert load_safetensors(ckpt)[1]["lora_studio.embeddings_beside"] == "ohwx.safetensors"
    # two adapters with different embeddings of one word: refused, naming both
    z = _adapter_with_word(model, tmp_path / "z.safetensors", "OHWX", vec + 1, seed=2)
    stack.load("z", z)
    with pytest.raises(ConfigError, match="'x' and 'z' both carry an embedding of the word 'OHWX'"):
        stack.bake(tmp_path / "c.safetensors", entries=[StackEntry("x", 1.0), StackEntry("z", 1.0)])
