"""Why does a concept/style LoRA damage trigger-free prompts on the toy base? (issue #14)

    python bench/bleed_probe.py text
        No training. How visible is the trigger to the toy text encoder: token-embedding norms, and the
        cosine between the (77, D) conditioning of "a red sks on a blue background" and of the same
        prompt with a base shape word / with the word left out.

    python bench/bleed_probe.py train concept|style [--set KEY=VALUE ...] [--images DIR]
                                [--trigger-embedding keep|random|copy:WORD] [--prompts 24]
        Trains one LoRA exactly as bench/quality.py does (same preset, overrides, seeds), then
         1. text encoder drift: relative L2 change and cosine of the (77, D) embeddings of every base
            prompt and of "" with the TE LoRA on vs off;
         2. UNet change of the noise prediction, |eps_lora - eps_base| / |eps_base|, on base prompts,
            trigger prompts and "", at fixed noisy latents (toy-world drawings of the prompt) and
            timesteps, with all LoRA layers on and with one layer group on at a time; and the cosine
            between the change on a base prompt and on its trigger twin (1.0: the change ignores the
            prompt's shape word);
         3. preservation ablations: the bench's drops (colour/shape/background, same prompts, seeds and
            sampler as quality.py) with the whole adapter, and with parts of it switched off.
        Last line: `fidelity=0.xx preservation_drop=0.xx` for the whole adapter (equals quality.py's).

    python bench/bleed_probe.py invert concept|style [--images DIR --trigger W --target VALUE] [--steps-inv 300]
        Textual inversion as a probe of the base, not a recipe: every weight frozen, only the trigger's input
        embedding trained on the set (300 steps of 8, v/eps loss as the base was trained). Prompts without
        the trigger are untouched (checked: their conditioning is bitwise the same), so the drop is 0 by
        construction; the fidelity says whether the base can already draw the target from some word.
        High: the target is a recombination of what the base knows, and an adapter only has to bind the
        trigger to it. Low: the target is a new skill, which the adapter must add to layers that every
        prompt goes through. Last line: `inverted fidelity=0.xx`.

`--images DIR`: train on another folder (e.g. a copy of the set with other captions).
`--trigger-embedding random`: before training, give the trigger token a random input embedding of the
norm of the trained tokens (the base's own is untrained: ~0.2 of norm); `copy:WORD`: WORD's embedding
plus a small random offset. Changes only this process's in-memory copy of the base.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

import quality as q  # noqa: E402  (bench/quality.py)
from training import toy_world as tw  # noqa: E402
from training.evaluator import classify, load_evaluator, score  # noqa: E402

FIELDS = q.FIELDS


def token_ids(base, prompt: str) -> list[int]:
    tok = base.pipe.tokenizer
    return tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids


@torch.no_grad()
def embed(base, prompts: list[str]) -> torch.Tensor:
    from training.trainer import encode_text

    return encode_text(base, prompts)[0].float()  # (B, 77, D)


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten()[None], b.flatten()[None])[0])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- text visibility


def run_text(args) -> None:
    from pipelines.base_models import DEFAULT_BASE, load_base

    q._quiet_loading()
    base = load_base(args.base or DEFAULT_BASE)
    tok = base.pipe.tokenizer
    emb = base.pipe.text_encoder.get_input_embeddings().weight.detach()
    words = ["sks", "ohwx", "star", "outline", "photo", "of", "style", "in", "circle", "square", "triangle",
             "red", "blue", "background", "on", "a"]
    print("input token-embedding norms (one token each):")
    print("  " + " ".join(f"{w}={emb[tok.convert_tokens_to_ids(w + '</w>')].norm():.3f}" for w in words))
    trained = [tok.convert_tokens_to_ids(w + "</w>") for w in ["circle", "square", "triangle", "red", "blue",
                                                                "background", "on", "a", "white", "gray"]]
    print(f"  mean of trained tokens: {emb[trained].norm(dim=1).mean():.3f}")
    sks = emb[tok.convert_tokens_to_ids("sks</w>")]
    print("  cosine(sks, w): " + " ".join(
        f"{w}={float(torch.nn.functional.cosine_similarity(sks, emb[tok.convert_tokens_to_ids(w + '</w>')], 0)):.2f}"
        for w in ["ohwx", "star", "circle", "square", "triangle", "red"]))

    groups = [
        ("a red {} on a blue background", ["sks", "star", "circle", "square", "triangle", "", "ohwx", "photo"]),
        ("a green {} on a white background", ["sks", "star", "circle", "square", "triangle", ""]),
    ]
    for tmpl, fills in groups:
        prompts = [tmpl.format(f).replace("  ", " ") for f in fills]
        e = embed(base, prompts)
        ref = 0  # the sks prompt
        print(f"\nconditioning (77 x D) of '{prompts[ref]}' vs:")
        for i, p in enumerate(prompts[1:], 1):
            print(f"  {p!r:45} cos={cos(e[ref], e[i]):.4f} relL2={rel(e[ref], e[i]):.3f}")
        # the base shapes among themselves, for scale
        sh = [i for i, f in enumerate(fills) if f in tw.BASE_SHAPES]
        pairs = [(a, b) for a in sh for b in sh if a < b]
        print("  for scale, base shapes among themselves: " + " ".join(
            f"{fills[a]}/{fills[b]} cos={cos(e[a], e[b]):.4f} relL2={rel(e[a], e[b]):.3f}" for a, b in pairs))
        # where the difference sits: per-token relative change sks vs circle
        ids = token_ids(base, prompts[0])
        n = ids.index(tok.eos_token_id) + 1
        ci = fills.index("circle")
        per = [(e[0, k] - e[ci, k]).norm() / e[ci, k].norm() for k in range(e.shape[1])]
        print("  sks vs circle, relative change per position: "
              + " ".join(f"{float(v):.2f}" for v in per[:n + 2]) + f" ... pad mean {float(torch.stack(per[n:]).mean()):.2f}")
    e = embed(base, ["", "a red sks on a blue background", "a red circle on a blue background"])
    print(f"\n'' vs sks prompt: cos={cos(e[0], e[1]):.4f}; '' vs circle prompt: cos={cos(e[0], e[2]):.4f}")


# ---------------------------------------------------------------- after training


def lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def unet_group(name: str) -> str:
    if ".attn2.to_k" in name or ".attn2.to_v" in name:
        return "xattn_kv"  # the only LoRA layers that read the text
    if ".attn1." in name or ".attn2." in name:
        return "attn_other"
    if "proj_in" in name or "proj_out" in name or ".ff." in name:
        return "proj_ff"
    if "conv" in name:
        return "conv"
    return "other"


class Enabled:
    """`with Enabled(layers, keep):` only the LoRA layers named in `keep` are on."""

    def __init__(self, layers: dict[str, torch.nn.Module], keep: set[str]):
        self.layers, self.keep = layers, keep

    def __enter__(self):
        for n, m in self.layers.items():
            m.enable_adapters(n in self.keep)

    def __exit__(self, *exc):
        for m in self.layers.values():
            m.enable_adapters(True)


def set_trigger_embedding(base, trigger: str, how: str) -> None:
    tok = base.pipe.tokenizer
    emb = base.pipe.text_encoder.get_input_embeddings().weight
    tid = tok.convert_tokens_to_ids(trigger + "</w>")
    trained = [tok.convert_tokens_to_ids(w + "</w>") for w in ["circle", "square", "triangle", "red", "blue",
                                                                "background", "on", "a", "white", "gray"]]
    target_norm = float(emb[trained].norm(dim=1).mean())
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        before = float(emb[tid].norm())
        if how == "random":
            v = torch.randn(emb.shape[1], generator=g)
            emb[tid] = v / v.norm() * target_norm
        elif how.startswith("copy:"):
            src = emb[tok.convert_tokens_to_ids(how[5:] + "</w>")].clone()
            v = torch.randn(emb.shape[1], generator=g)
            emb[tid] = src + 0.3 * target_norm * v / v.norm()
        else:
            raise SystemExit(f"--trigger-embedding: keep, random or copy:WORD, got {how}")
    print(f"trigger embedding '{trigger}': norm {before:.3f} -> {float(emb[tid].norm()):.3f} ({how})", flush=True)


@torch.no_grad()
def unet_probe(base, trigger_tmpl: str, n: int = 12) -> None:
    """Relative change of the noise prediction, by LoRA layer group, on base / trigger / '' prompts."""
    from diffusers import DDPMScheduler

    from training.trainer import AdaptersOff, encode_images

    pipe = base.pipe
    unet = pipe.unet
    layers = lora_layers(unet)
    groups: dict[str, set[str]] = {}
    for name in layers:
        groups.setdefault(unet_group(name), set()).add(name)
    te_layers = lora_layers(pipe.text_encoder)
    rng = __import__("random").Random(3)
    specs = [tw.sample_spec(rng) for _ in range(n)]
    base_prompts = [s.caption() for s in specs]
    trig_prompts = [trigger_tmpl.format(c=s.color, s=s.shape, b=s.background) for s in specs]
    imgs = [torch.from_numpy(__import__("numpy").asarray(tw.draw(s), dtype="float32")).permute(2, 0, 1) / 127.5 - 1
            for s in specs]
    lat = torch.stack(encode_images(base, imgs))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(lat.shape, generator=g)
    # text conditioning as the adapter sees it (TE LoRA on) and as the base sees it
    c_base = embed(base, base_prompts)
    c_trig = embed(base, trig_prompts)
    c_unc = embed(base, [""] * n)
    with AdaptersOff([pipe.text_encoder]):
        c_base0, c_trig0, c_unc0 = embed(base, base_prompts), embed(base, trig_prompts), embed(base, [""] * n)
    print(f"text encoder LoRA layers: {len(te_layers)}; conditioning change with it (rel L2, mean over prompts): "
          f"base {rel(c_base, c_base0):.3f}  trigger {rel(c_trig, c_trig0):.3f}  '' {rel(c_unc, c_unc0):.3f}")
    print("UNet LoRA: |eps_lora - eps_base| / |eps_base|  (TE LoRA on; guided = CFG 7 combination)")
    print(f"  {'t':>4} {'layers on':12} {'base':>7} {'trigger':>8} {'empty':>7} {'guided base':>12} "
          f"{'guided trig':>12} {'cos(dB,dT)':>11}")
    for t_val in (950, 750, 500, 250):
        t = torch.full((n,), t_val, dtype=torch.long)
        x = sched.add_noise(lat, noise, t)

        def eps(cond):
            return unet(x, t, cond).sample.float()

        with AdaptersOff([unet, pipe.text_encoder]):
            e0b, e0t, e0u = eps(c_base0), eps(c_trig0), eps(c_unc0)
        g0b = e0u + 7 * (e0b - e0u)
        g0t = e0u + 7 * (e0t - e0u)
        for gname in ["ALL", *sorted(groups)]:
            keep = set(layers) if gname == "ALL" else groups[gname]
            with Enabled(layers, keep):
                eb, et, eu = eps(c_base), eps(c_trig), eps(c_unc)
            gb, gt = eu + 7 * (eb - eu), eu + 7 * (et - eu)
            db, dt = eb - e0b, et - e0t
            print(f"  {t_val:>4} {gname + f'({len(keep)})':12} {rel(eb, e0b):7.3f} {rel(et, e0t):8.3f} "
                  f"{rel(eu, e0u):7.3f} {rel(gb, g0b):12.3f} {rel(gt, g0t):12.3f} {cos(db, dt):11.3f}")
        if te_layers:
            with Enabled(layers, set()):  # only the TE LoRA
                eb, et, eu = eps(c_base), eps(c_trig), eps(c_unc)
            gb, gt = eu + 7 * (eb - eu), eu + 7 * (et - eu)
            print(f"  {t_val:>4} {'TE only':12} {rel(eb, e0b):7.3f} {rel(et, e0t):8.3f} {rel(eu, e0u):7.3f} "
                  f"{rel(gb, g0b):12.3f} {rel(gt, g0t):12.3f} {cos(eb - e0b, et - e0t):11.3f}")


def preservation(base, evaluator, prompts, args, before) -> dict[str, float]:
    imgs, ip = q.generate_for_prompts(base, prompts, args)
    after = score(evaluator, imgs, ip)
    return {k: before[k] - after[k] for k in FIELDS}, imgs, ip, after


def run_train(args) -> None:
    from pipelines.base_models import DEFAULT_BASE, load_base
    from training.config import TrainConfig
    from training.trainer import train

    folder, trigger, preset, template, field, value = q.LORA_SETS[args.mode]
    images = Path(args.images) if args.images else ROOT / "sample_data" / folder
    q._quiet_loading()
    base = load_base(args.base or DEFAULT_BASE)
    evaluator = load_evaluator()
    prompts = q.pick_prompts(tw.all_base_prompts(), args.prompts, seed=args.seed)
    imgs, ip = q.generate_for_prompts(base, prompts, args)
    before = score(evaluator, imgs, ip)
    if args.trigger_embedding != "keep":
        set_trigger_embedding(base, trigger, args.trigger_embedding)
        imgs, ip = q.generate_for_prompts(base, prompts, args)
        b2 = score(evaluator, imgs, ip)
        print("base prompts after the embedding change (no LoRA): " + q.summary_line(b2)
              + " (unchanged: the trigger is not in them)")
    with tempfile.TemporaryDirectory() as lib:
        cfg = TrainConfig.from_dict({"images": str(images), "trigger": trigger, "preset": preset,
                                     "name": f"probe-{args.mode}", "output_dir": lib,
                                     "base": str(args.base or DEFAULT_BASE), **dict(args.set)})
        print(f"training {images.name}: preset {preset}, {cfg.max_steps} steps, lr_unet {cfg.lr_unet}, "
              f"TE {cfg.train_text_encoder} (lr {cfg.lr_text}), targets {cfg.unet_targets}, "
              f"min_snr {cfg.min_snr_gamma}, preserve {cfg.preserve_weight}", flush=True)
        t0 = time.time()
        train(cfg, base=base)
        print(f"trained in {(time.time() - t0) / 60:.1f} min", flush=True)
    base.pipe.unet.eval()
    pipe = base.pipe

    print("\n== 1+2. text encoder drift, UNet change of the noise prediction")
    trig_tmpl = template.replace("{s}", "{s}") if "{s}" in template else template
    unet_probe(base, trig_tmpl)

    print("\n== 3. preservation with parts of the adapter on (drops vs the base without adapter)", flush=True)
    tprompts = q.trigger_prompts(template, 16, args.seed)
    timgs, tip = q.generate_for_prompts(base, tprompts, args)
    preds = classify(evaluator, timgs)
    fidelity = sum(p[field] == value for p in preds) / len(preds)
    ulayers = lora_layers(pipe.unet)
    tlayers = lora_layers(pipe.text_encoder)
    allu = set(ulayers)
    by = {}
    for n in ulayers:
        by.setdefault(unet_group(n), set()).add(n)
    variants = [("whole adapter", allu, True)]
    if tlayers:
        variants += [("UNet LoRA only (TE LoRA off)", allu, False), ("TE LoRA only", set(), True)]
    if args.all_ablations:
        variants += [(f"UNet without {g}", allu - s, bool(tlayers)) for g, s in sorted(by.items())]
        variants += [(f"UNet {g} only", s, bool(tlayers)) for g, s in sorted(by.items())]
    else:  # the layers that cannot read the prompt vs the ones that can
        if "conv" in by:
            variants.append(("UNet without conv", allu - by["conv"], bool(tlayers)))
        if "xattn_kv" in by and len(by) > 1:
            variants.append(("UNet xattn_kv only", by["xattn_kv"], bool(tlayers)))
    rows = []
    for label, keep, te_on in variants:
        with Enabled(ulayers, keep), Enabled(tlayers, set(tlayers) if te_on else set()):
            d, imgs2, ip2, after = preservation(base, evaluator, prompts, args, before)
            t_imgs, _ = q.generate_for_prompts(base, tprompts, args)
            fid = sum(p[field] == value for p in classify(evaluator, t_imgs)) / len(t_imgs)
        rows.append((label, fid, d))
        print(f"  {label:34} fidelity={fid:.2f} drops: " + " ".join(f"{k}={v:+.2f}" for k, v in d.items())
              + f"  max={max(0.0, max(d.values())):.2f}", flush=True)
        if label == "whole adapter":
            whole = d
            for sh in tw.BASE_SHAPES:
                idx = [i for i, pr in enumerate(ip2) if tw.parse_caption(pr)["shape"] == sh]
                acc = sum(after["predictions"][i]["shape"] == sh for i in idx) / max(1, len(idx))
                seen = Counter(after["predictions"][i]["shape"] for i in idx)
                print(f"    asked {sh:8} ({len(idx)}): shape right {acc:.2f}; drawn as {dict(seen)}", flush=True)
            out = Path(args.out_dir)
            q.contact_sheet(imgs2, ip2, after["predictions"], out / f"probe_{args.mode}_preservation.png",
                            f"probe {args.mode}: base prompts with the adapter | " + q.summary_line(after))
            q.contact_sheet(timgs, tip, preds, out / f"probe_{args.mode}_fidelity.png",
                            f"probe {args.mode} fidelity={fidelity:.2f}")
    # control: an adapter of the same size per layer that learned nothing (each lora_B replaced by a random
    # matrix of the same Frobenius norm, A kept): the damage of a change this large, in no particular direction
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in [*ulayers.values(), *tlayers.values()]:
            for name, lin in m.lora_B.items():
                w = lin.weight
                r = torch.randn(w.shape, generator=g)
                w.copy_(r / r.norm() * w.norm())
    d, *_ = preservation(base, evaluator, prompts, args, before)
    t_imgs, _ = q.generate_for_prompts(base, tprompts, args)
    fid = sum(p[field] == value for p in classify(evaluator, t_imgs)) / len(t_imgs)
    rows.append(("random B, same norms", fid, d))
    print(f"  {'random B, same norms (control)':34} fidelity={fid:.2f} drops: "
          + " ".join(f"{k}={v:+.2f}" for k, v in d.items()) + f"  max={max(0.0, max(d.values())):.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "fidelity": fidelity}, indent=1))
    print(f"base without adapter: {q.summary_line(before)}")
    print(f"fidelity={fidelity:.2f} preservation_drop={max(0.0, max(whole.values())):.2f} "
          + " ".join(f"{k}_drop={v:+.2f}" for k, v in whole.items()), flush=True)


# ---------------------------------------------------------------- textual-inversion probe


def run_invert(args) -> None:
    """Train only the trigger's input embedding on the set, then score the trigger prompts."""
    from diffusers import DDPMScheduler

    from pipelines.base_models import DEFAULT_BASE, load_base
    from training import trainer as tr
    from training.config import TrainConfig
    from training.dataset import scan_folder

    folder, trigger, preset, template, field, value = q.lora_set(args.mode, args)
    q._quiet_loading()
    base = load_base(args.base or DEFAULT_BASE)
    if base.family == "sdxl":
        raise SystemExit("invert: SD 1.x/2.x bases only")
    pipe = base.pipe
    tok, te, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    ids = tok(trigger).input_ids[1:-1]
    if len(ids) != 1:
        raise SystemExit(f"invert: the trigger {trigger!r} is {len(ids)} tokens for this tokenizer; one is needed")
    tid = ids[0]
    cfg = TrainConfig.from_dict({"images": str(folder), "trigger": trigger, "preset": preset, "name": "probe",
                                 "base": str(args.base or DEFAULT_BASE)})
    scan = scan_folder(cfg.images, cfg.trigger, cfg.instance_template, cfg.caption_prefix_trigger)
    examples = tr.build_examples(cfg, base, scan, cfg.resolution or base.native_resolution)
    latents = torch.stack([e.latent for e in examples])
    text_ids = tok([e.caption for e in examples], padding="max_length", max_length=tok.model_max_length,
                   truncation=True, return_tensors="pt").input_ids.to(base.device)
    probe_prompts = q.pick_prompts(tw.all_base_prompts(), args.prompts, seed=args.seed)
    cond_before = embed(base, probe_prompts)
    emb = te.get_input_embeddings().weight
    for m in (te, unet, pipe.vae):
        m.requires_grad_(False)
    norm0 = float(emb[tid].norm())
    # only the trigger's row learns: the others' gradients are zeroed, and Adam without weight decay leaves a
    # parameter whose gradient is always zero exactly where it was
    mask = torch.zeros(emb.shape[0], 1, dtype=emb.dtype, device=emb.device)
    mask[tid] = 1
    emb.requires_grad_(True)
    hook = emb.register_hook(lambda grad: grad * mask)
    opt = torch.optim.Adam([emb], lr=args.lr_inv)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    v_pred = sched.config.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    print(f"inverting '{trigger}' on {len(examples)} images of {Path(folder).name}: {args.steps_inv} steps of 8, "
          f"lr {args.lr_inv}", flush=True)
    for step in range(args.steps_inv):
        idx = torch.randint(0, len(examples), (8,), generator=g)
        x0 = latents[idx].to(base.device, unet.dtype)
        noise = torch.randn(x0.shape, generator=g).to(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g).to(base.device)
        cond = te(text_ids[idx])[0]
        pred = unet(sched.add_noise(x0, noise, t), t, cond).sample
        target = sched.get_velocity(x0, noise, t) if v_pred else noise
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(f"  step {step + 1} loss {loss.item():.4f} embedding norm {float(emb[tid].norm()):.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    hook.remove()
    emb.requires_grad_(False)
    norm1 = float(emb[tid].norm())
    same = bool(torch.equal(cond_before, embed(base, probe_prompts)))
    print(f"trigger embedding norm {norm0:.3f} -> {norm1:.3f}; conditioning of {len(probe_prompts)} "
          f"trigger-free base prompts unchanged: {same}", flush=True)
    tprompts = q.trigger_prompts(template, 16, args.seed)
    timgs, tip = q.generate_for_prompts(base, tprompts, args)
    preds = classify(load_evaluator(), timgs)
    fidelity = sum(p[field] == value for p in preds) / len(preds)
    seen = Counter(p[field] for p in preds)
    print(f"trigger prompts drawn as: {dict(seen)}")
    sheet = Path(args.out_dir) / f"probe_invert_{args.mode}_{Path(folder).name}.png"
    q.contact_sheet(timgs, tip, preds, sheet, f"inverted '{trigger}' ({field} {value}) fidelity={fidelity:.2f}")
    print(f"contact sheet: {sheet}")
    print(f"inverted fidelity={fidelity:.2f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/bleed_probe.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["text", "train", "invert"])
    p.add_argument("mode", nargs="?", choices=list(q.LORA_SETS), default="concept")
    p.add_argument("--base", default=None)
    p.add_argument("--images", default=None, help="train on this folder instead of the shipped set")
    p.add_argument("--trigger", default=None, help="with --images: the set's trigger word")
    p.add_argument("--target", default=None, help="with --images: the shape or style the set shows")
    p.add_argument("--steps-inv", type=int, default=300, help="invert: embedding training steps")
    p.add_argument("--lr-inv", type=float, default=5e-3, help="invert: Adam learning rate of the embedding")
    p.add_argument("--trigger-embedding", default="keep")
    p.add_argument("--images-per-prompt", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--scheduler", default="DPM++ 2M Karras")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(q.OUT_DIR))
    p.add_argument("--json", default=None)
    p.add_argument("--all-ablations", action="store_true", help="every layer group off / alone (slow)")
    p.add_argument("--set", action="append", default=[], type=q._setting, metavar="KEY=VALUE")
    args = p.parse_args(argv)
    {"text": run_text, "train": run_train, "invert": run_invert}[args.what](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
