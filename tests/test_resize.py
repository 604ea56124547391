"""Resize an adapter to a lower rank, and extract a LoRA from a fine-tuned checkpoint (kohya_ss' utilities).

What a user relies on: the smaller file loads everywhere (kohya layout), each layer is the *best* approximation
of its rank (Eckart–Young: the error is exactly the dropped singular values), at full rank nothing changes,
`--keep` picks the fewest ranks that hold the share asked for, and a LoRA extracted from a checkpoint that
has a LoRA baked in gives that LoRA back.
"""

from __future__ import annotations

import pytest
import torch
from lora_helpers import make_lora

from app.cli import main
from pipelines.adapters import inspect_adapter, lora_metadata, save_adapter, to_peft
from pipelines.base_models import load_base
from pipelines.errors import ConfigError, IncompatibleAdapterError
from pipelines.library import AdapterLibrary
from pipelines.resize import choose_rank, extract_adapter, resize_adapter
from pipelines.stack import AdapterStack
from pipelines.weights_io import load_safetensors


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir):
    return load_base(str(tiny_sd1_dir), device="cpu")


def _deltas(path) -> dict[str, torch.Tensor]:
    """{module: scale·B@A} of an adapter file, read through our own loader's key mapping."""
    sd, meta = load_safetensors(path)
    peft, alphas = to_peft(sd, meta, unet_layers_per_block=1)
    out = {}
    for k, a in peft.items():
        if not k.endswith(".lora_A.weight"):
            continue
        m = k[: -len(".lora_A.weight")]
        b = peft[f"{m}.lora_B.weight"].float()
        out[m] = alphas[m] / a.shape[0] * b.reshape(b.shape[0], -1) @ a.float().reshape(a.shape[0], -1)
    return out


@pytest.fixture
def rank8(sd1, tmp_path):
    sd = make_lora(sd1.pipe, rank=8, seed=4)
    return save_adapter(sd, tmp_path / "big.safetensors",
                        lora_metadata(family="sd1", rank=8, alpha=4, trigger_word="sks", name="big"), alpha=4.0)


def test_resize_keeps_the_best_approximation_of_each_rank(rank8, tmp_path):
    want = _deltas(rank8)
    same = resize_adapter(rank8, tmp_path / "r8.safetensors", rank=8)
    assert same.worst > 0.99999
    got = _deltas(same.path)
    for m, d in want.items():
        torch.testing.assert_close(got[m], d, rtol=1e-4, atol=1e-5)
    small = resize_adapter(rank8, tmp_path / "r3.safetensors", rank=3)
    got = _deltas(small.path)
    assert {f.rank for f in small.layers} == {3}
    for m, d in want.items():
        s = torch.linalg.svdvals(d.double())
        err = float(((got[m].double() - d.double()) ** 2).sum())
        assert err == pytest.approx(float((s[3:] ** 2).sum()), rel=1e-3, abs=1e-9)  # Eckart–Young
    k, meta = load_safetensors(small.path)
    assert all(key.startswith(("lora_unet_", "lora_te_")) for key in k)  # the layout A1111 / ComfyUI read
    assert meta["ss_network_dim"] == "3" and meta["lora_studio.resized_from"].startswith("rank 8")
    assert meta["modelspec.trigger_phrase"] == "sks"
    assert small.path.stat().st_size < rank8.stat().st_size / 2


def test_keep_picks_the_fewest_ranks_that_hold_the_share(rank8, tmp_path):
    rep = resize_adapter(rank8, tmp_path / "k.safetensors", keep=0.9)
    want = _deltas(rank8)
    for fit in rep.layers:
        s = torch.linalg.svdvals(want[fit.module].double())
        share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        assert share[fit.rank - 1] >= 0.9 - 1e-9 and (fit.rank == 1 or share[fit.rank - 2] < 0.9)
        assert fit.kept == pytest.approx(float(share[fit.rank - 1]), rel=1e-4)
    assert choose_rank(torch.tensor([3.0, 2.0, 1.0]), 1, 0.99) == 1  # the rank caps the share
    with pytest.raises(ConfigError, match="keep: "):
        resize_adapter(rank8, tmp_path / "x.safetensors", keep=1.5)
    with pytest.raises(ConfigError, match="rank: give a rank"):
        resize_adapter(rank8, tmp_path / "x.safetensors")


def test_extract_gives_a_baked_lora_back(sd1, tiny_sd1_dir, tmp_path):
    """Bake a rank-4 LoRA (UNet attention and text encoder) into a checkpoint; extracting it at rank 4 gives
    the same weight differences, and the extracted file loads and acts like the original."""
    sd = make_lora(sd1.pipe, rank=4, seed=5, std=1.0)
    src = save_adapter(sd, tmp_path / "orig.safetensors", lora_metadata(family="sd1", rank=4, alpha=4))
    stack = AdapterStack(sd1)
    stack.load("orig", src)
    stack.set_stack([("orig", 0.8)])
    ckpt = stack.bake_checkpoint(tmp_path / "tuned.safetensors")
    stack.clear()
    stack.unload()
    tuned = load_base(str(ckpt), device="cpu", config=str(tiny_sd1_dir))
    rep = extract_adapter(sd1, tuned, tmp_path / "extracted.safetensors", rank=4, name="extracted")
    want = {m: 0.8 * d for m, d in _deltas(src).items()}
    got = _deltas(rep.path)
    assert set(got) == set(want)  # only the layers that moved: nothing else is written
    for m, d in want.items():
        torch.testing.assert_close(got[m], d, rtol=1e-3, atol=1e-4)
    assert rep.worst > 0.9999
    info = inspect_adapter(rep.path, sd1)
    assert info.matched == info.total and info.family == "sd1"
    # a text encoder that did not move is left out (kohya's min diff), and the same model twice is refused
    unet_only = save_adapter({k: v for k, v in sd.items() if k.startswith("unet.")}, tmp_path / "u.safetensors",
                             lora_metadata(family="sd1", rank=4, alpha=4))
    stack.load("u", unet_only)
    stack.set_stack([("u", 1.0)])
    ckpt2 = stack.bake_checkpoint(tmp_path / "tuned2.safetensors")
    stack.clear()
    stack.unload()
    rep2 = extract_adapter(sd1, load_base(str(ckpt2), device="cpu", config=str(tiny_sd1_dir)),
                           tmp_path / "e2.safetensors", rank=2)
    assert any(s.startswith("text_encoder (") for s in rep2.skipped)
    assert all(f.module.startswith("unet.") for f in rep2.layers)
    with pytest.raises(IncompatibleAdapterError, match="same weights"):
        extract_adapter(sd1, sd1, tmp_path / "none.safetensors", rank=2)


def test_extract_refuses_another_architecture(sd1, tiny_sdxl_dir, tmp_path):
    xl = load_base(str(tiny_sdxl_dir), device="cpu")
    with pytest.raises(IncompatibleAdapterError, match="not the same architecture"):
        extract_adapter(sd1, xl, tmp_path / "x.safetensors", rank=2)


def test_cli_resize_into_the_library(rank8, tmp_path, capsys):
    lib = AdapterLibrary(tmp_path / "lib")
    lib.import_file(rank8, "big")
    assert main(["loras", "resize", "big", "--rank", "2", "--library", str(tmp_path / "lib")]) == 0
    out = capsys.readouterr().out
    assert "big-r2.safetensors" in out and "layers at rank 2" in out
    info = lib.info("big-r2")
    assert info.rank == 2 and info.trigger_word == "sks"
    assert info.metadata["lora_studio.name"] == "big-r2"
    assert main(["loras", "info", "big-r2", "--library", str(tmp_path / "lib")]) == 0
    assert "resized   from rank 8 (big.safetensors): " in capsys.readouterr().out
    assert main(["loras", "resize", "big", "--rank", "2", "--library", str(tmp_path / "lib")]) != 0
    assert "already exists" in capsys.readouterr().err
    assert main(["loras", "resize", "big", "--keep", "0.5", "--precision", "fp16", "--out",
                 str(tmp_path / "half.safetensors"), "--library", str(tmp_path / "lib")]) == 0
    k, _ = load_safetensors(tmp_path / "half.safetensors")
    assert {v.dtype for n, v in k.items() if not n.endswith(".alpha")} == {torch.float16}
    assert not [p for p in (tmp_path / "lib").iterdir() if p.name.startswith(".new-")]  # no leftovers


def test_an_fp16_file_resizes_to_a_smaller_fp16_file(sd1, tmp_path):
    sd = {k: v.half() for k, v in make_lora(sd1.pipe, rank=8, seed=9).items()}
    src = save_adapter(sd, tmp_path / "h.safetensors", lora_metadata(family="sd1", rank=8, alpha=8))
    rep = resize_adapter(src, tmp_path / "h4.safetensors", rank=4)
    k, _ = load_safetensors(rep.path)
    assert {v.dtype for n, v in k.items() if not n.endswith(".alpha")} == {torch.float16}
    nbytes = lambda d: sum(v.numel() * v.element_size() for n, v in d.items() if not n.endswith(".alpha"))  # noqa: E731
    assert nbytes(k) == nbytes(sd) // 2  # half the rank, the same precision: half the weights


def test_cli_refuses_a_resize_or_bake_without_a_rank_before_any_work(rank8, tmp_path, capsys, tiny_sd1_dir):
    lib = AdapterLibrary(tmp_path / "lib")
    lib.import_file(rank8, "big")
    assert main(["loras", "resize", "big", "--library", str(tmp_path / "lib")]) != 0
    err = capsys.readouterr().err
    assert "rank: give a rank" in err and "Traceback" not in err
    out = tmp_path / "baked.safetensors"
    assert main(["loras", "--library", str(tmp_path / "lib"), "bake", "--base", str(tiny_sd1_dir), "--device", "cpu",
                 "--lora", "big", "--out", str(out), "--rank", "0"]) != 0
    assert "rank: must be a whole number of 1 or more" in capsys.readouterr().err and not out.exists()
