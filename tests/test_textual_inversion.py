"""Textual inversion (`--textual-inversion`, the `embedding` preset): the trigger word's vectors are trained alone,
the model is left as it is, and the result is an embeddings-folder file (AUTOMATIC1111's format) that the word
NAME brings into any prompt, here, in A1111 and in ComfyUI."""

from __future__ import annotations

import pytest
import torch

from lora_helpers import assert_resumes_exactly
from pipelines.base_models import load_base
from pipelines.embeddings import read_embedding, use_embeddings
from pipelines.errors import ConfigError
from pipelines.weights_io import load_safetensors
from training.config import TrainConfig
from training.pivotal import initial_vectors
from training.trainer import Trainer, encode_text, train


def _cfg(images, base, tmp_path, **kw):
    base_kw = dict(images=str(images), base=str(base), output_dir=str(tmp_path / "lib"),
                   embeddings_dir=str(tmp_path / "emb"), max_steps=4, batch_size=2, checkpoint_every=0, device="cpu",
                   sample_steps=2, name="star-emb", seed=3, warmup_steps=0, textual_inversion=True, lr_ti=5e-2,
                   ti_vectors=3)
    base_kw.update(kw)
    return TrainConfig(**base_kw)


def _cond(model, prompt):
    with torch.no_grad():
        return encode_text(model, [prompt])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_embedding_file_means_what_was_trained_and_nothing_else_changes(star_images, tiny_sd1_dir,
                                                                             tiny_sdxl_dir, tmp_path, family):
    base_dir = {"sd1": tiny_sd1_dir, "sdxl": tiny_sdxl_dir}[family]
    tr = Trainer(_cfg(star_images, base_dir, tmp_path))
    fresh = load_base(str(base_dir), device="cpu")
    start = initial_vectors(fresh.pipe, 3, None, 3)
    before = fresh.pipe.unet.state_dict()
    res = tr.run()
    # the file: in the embeddings folder under the run's name, A1111's keys, the trained vectors
    assert res.adapter_path == tmp_path / "emb" / "star-emb.safetensors"
    sd, meta = load_safetensors(res.adapter_path)
    assert set(sd) == ({"clip_l", "clip_g"} if family == "sdxl" else {"emb_params"})
    assert meta["lora_studio.trigger_word"] == "sks" and meta["lora_studio.base_family"] == family
    for k, v in read_embedding(res.adapter_path).items():
        assert v.shape == start[k].shape and not torch.allclose(v, start[k])
    assert (tmp_path / "emb" / "star-emb.preview.png").is_file()
    card = (tmp_path / "emb" / "star-emb.md").read_text()
    assert "Write `star-emb` in a prompt" in card and "embedding:star-emb" in card
    assert not list((tmp_path / "lib").glob("*.safetensors"))  # no adapter in the library
    # the model is as it was: no LoRA layer, the same weights
    assert not any("lora" in n for n, _ in tr.base.pipe.unet.named_modules())
    after = tr.base.pipe.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the trained model's trigger prompt == the file's word in a fresh base, through the embeddings folder
    trained = _cond(tr.base, "a photo of sks")
    plain = _cond(fresh, "a photo of star-emb")
    assert use_embeddings(fresh, tmp_path / "emb", ["a photo of star-emb"]) == []
    got = _cond(fresh, "a photo of star-emb")
    torch.testing.assert_close(got[0], trained[0], rtol=1e-4, atol=1e-5)
    if family == "sdxl":
        torch.testing.assert_close(got[1], trained[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0], plain[0], atol=1e-3)
    torch.testing.assert_close(_cond(fresh, "a photo of a circle")[0], _cond(load_base(str(base_dir), device="cpu"),
                                                                             "a photo of a circle")[0])


def test_an_embedding_run_resumes_exactly_and_trains_more_from_its_file(star_images, tiny_sd1_dir, tmp_path):
    sd = assert_resumes_exactly(lambda sub, **kw: _cfg(star_images, tiny_sd1_dir, tmp_path / sub,
                                                       checkpoint_every=1, **kw), stop_at=2)
    assert set(sd) == {"emb_params"}
    # --init-adapter with an embedding file (this app's, A1111's, kohya's): its vectors go on training
    first = tmp_path / "a" / "emb" / "star-emb.safetensors"
    tr = Trainer(_cfg(star_images, tiny_sd1_dir, tmp_path / "more", init_adapter=str(first), max_steps=1, lr_ti=1e-12))
    res = tr.run()
    torch.testing.assert_close(read_embedding(res.adapter_path)[""], read_embedding(first)[""], rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="has \\(3, 32\\) vectors, this run \\(2, 32\\).*ti_vectors = 3"):
        Trainer(_cfg(star_images, tiny_sd1_dir, tmp_path / "bad", init_adapter=str(first), ti_vectors=2)).run()


def test_what_an_embedding_run_refuses(star_images, tiny_sd1_dir, tmp_path):
    for kw, field in ((dict(name="two words"), "name"), (dict(trigger="a sks"), "trigger"),
                      (dict(pivotal=True), "pivotal"), (dict(train_text_encoder=True, lr_text=1e-4),
                                                        "train_text_encoder"),
                      (dict(network="loha"), "network"), (dict(preserve_weight=1.0), "preserve_weight")):
        with pytest.raises(ConfigError, match=f"^{field}: "):
            _cfg(star_images, tiny_sd1_dir, tmp_path, **kw)
    train(_cfg(star_images, tiny_sd1_dir, tmp_path, max_steps=1))
    with pytest.raises(ConfigError, match="an embedding called 'star-emb' already exists in .*emb; pass --overwrite"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path, max_steps=1, name="Star-Emb"))
    with pytest.raises(ConfigError, match="as star-emb.safetensors: remove it first"):
        train(_cfg(star_images, tiny_sd1_dir, tmp_path, max_steps=1, name="Star-Emb", overwrite=True))
    again = train(_cfg(star_images, tiny_sd1_dir, tmp_path, max_steps=2, overwrite=True))
    assert again.adapter_path.name == "star-emb.safetensors"
    # the preset: the trigger's vectors alone, at the learning rate textual inversion needs
    cfg = TrainConfig.from_dict({"images": str(star_images), "trigger": "sks", "preset": "embedding"})
    assert cfg.textual_inversion and not cfg.train_text_encoder and cfg.lr_ti == 5e-3
    real = TrainConfig.from_dict({"images": str(star_images), "trigger": "sks", "preset": "embedding",
                                  "base": str(tiny_sd1_dir)})
    assert real.textual_inversion


def test_the_app_trains_an_embedding_into_its_embeddings_folder(star_images, tiny_sd1_dir, tmp_path):
    """The Train tab's embedding preset: the job's file lands in the app's embeddings folder, which the Generate
    tab's picker lists; the run counts as finished (no Resume), and Train more continues from the file."""
    from app.studio import Studio
    from app.ui import StudioUI
    from training.jobs import Job, JobQueue

    studio = Studio(home=tmp_path / "home", base=str(tiny_sd1_dir), queue=JobQueue(command=lambda *a: None),
                    device="cpu")
    ui = StudioUI(studio)
    ui.build()
    cfg = ui.train_config({"name": "star-emb", "trigger": "sks", "preset": "embedding", "images": None,
                           "base": ui.base_names()[0]}, check_images=False)
    assert cfg.textual_inversion and cfg.embeddings_folder == studio.embeddings_dir
    res = train(cfg.replace(images=str(star_images), max_steps=2, batch_size=2, sample_steps=2))
    assert res.adapter_path.parent == studio.embeddings_dir and "star-emb" in studio.embedding_names()
    assert studio.run_state("star-emb").in_library
    job = Job(id=7, config=cfg, state="done", result=res)
    assert "Embeddings</b> picker; write <code>star-emb</code>" in ui.status_html(job)
    more = studio.train_more("star-emb", 3, config=cfg.replace(images=str(star_images)))
    assert more.config.init_adapter == str(res.adapter_path) and more.config.name == "star-emb-more"
    assert more.config.textual_inversion and more.config.max_steps == 3


def test_the_embeddings_command_lists_the_folder(star_images, tiny_sd1_dir, tmp_path, capsys):
    from app.cli import main

    res = train(_cfg(star_images, tiny_sd1_dir, tmp_path, max_steps=1))
    (tmp_path / "emb" / "broken.safetensors").write_bytes(b"not weights")
    assert main(["embeddings", "--embeddings", str(tmp_path / "emb")]) == 0
    got = capsys.readouterr()
    row = next(ln for ln in got.out.splitlines() if ln.startswith("star-emb "))
    import hashlib

    assert row.split()[1:3] == ["3", "width"] and hashlib.sha256(res.adapter_path.read_bytes()).hexdigest()[:12] in row
    assert "[preview]" in row and "[card]" in row
    assert "warning: broken.safetensors" in got.err
    assert main(["embeddings", "--embeddings", str(tmp_path / "none")]) == 0
    assert "no embeddings in" in capsys.readouterr().out
