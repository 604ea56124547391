"""Make an image again from its generation parameters: AUTOMATIC1111's "PNG Info → Send to txt2img".

The `parameters` text of a PNG made here, by AUTOMATIC1111 or by a tool that writes the same format (pasted from
a model page, or read from the image) becomes a request and the adapters it used, with notes on what cannot be
reproduced exactly: an adapter missing from the library or present there in another version (its hash differs),
a sampler or option this app does not have, another base model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from .errors import ConfigError, UnsafeNameError
from .generation import HIRES_UPSCALERS, SCHEDULERS, GenerationRequest, parse_parameters, scheduler_name
from .stack import StackEntry, parse_lora_hashes, parse_lora_tags
from .schedule import NOISE_SCHEDULE_KEY, ZERO_TERMINAL_SNR

# A1111 options that change the picture but have no equivalent here: named in a note rather than dropped silently
UNSUPPORTED = ("Refiner", "ENSD", "Eta", "Face restoration", "ControlNet 0", "ADetailer model")
_KEYS = ("Steps", "Sampler", "CFG scale", "Seed", "Size")


@dataclass
class Recalled:
    request: GenerationRequest  # the prompt without its <lora:...> tags
    entries: list[StackEntry]  # the adapters, in the recorded order, with their weights and step ranges
    model: str | None = None  # the base model's name as recorded ("Model: ...")
    vae: str | None = None  # a separate VAE's file name as recorded ("VAE: ..."; the caller looks for it)
    a1111: bool = True  # made by AUTOMATIC1111 (or another tool), not by this app (which records "Model family")
    notes: list[str] = field(default_factory=list)

    @property
    def tagged_prompt(self) -> str:
        """The prompt with every adapter as a tag again (what the CLI runs)."""
        return " ".join([self.request.prompt] + [e.tag() for e in self.entries]).strip()


def read_parameters(path: str | os.PathLike) -> str:
    """The generation parameters stored in an image: a PNG's `parameters` text chunk (this app, AUTOMATIC1111,
    Forge), or the EXIF UserComment that AUTOMATIC1111 writes into JPEG and WebP files."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            text = im.info.get("parameters")
            if not text:
                raw = im.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD, UserComment
                text = _user_comment(raw) if raw else None
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:  # named by the file's name: an upload's server-side folder is nobody's business
        raise ConfigError(f"{path.name}: not an image this app can read ({str(e).replace(str(path), path.name)})"
                          ) from None
    if not text or not text.strip():
        raise ConfigError(f"{path.name}: the image carries no generation parameters (a PNG made by this app or "
                          "AUTOMATIC1111 has them; most other tools, and most image hosts, remove them)")
    return text


def _user_comment(raw) -> str | None:
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes):
        return None
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):  # piexif writes UTF-16, big-endian; some writers use little-endian
        be, le = body.decode("utf-16-be", "replace"), body.decode("utf-16-le", "replace")
        return be if sum(c.isascii() for c in be) >= sum(c.isascii() for c in le) else le
    if head.startswith(b"ASCII"):
        return body.decode("ascii", "replace")
    if head == b"\0" * 8:  # the "undefined" character code: the text follows as it is
        return body.decode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


def recall(text: str, library=None, num_images: int = 1, embeddings=None) -> Recalled:
    """The request and adapters that `text` (A1111 `parameters`) describes; with `library`, each adapter is
    looked up there and its hash compared with the recorded one; with `embeddings` (a folder), each embedding
    the image used (A1111's `TI hashes`) is looked for there."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("parameters: paste the generation parameters of an image, or read them from its PNG")
    p = parse_parameters(text)
    if not any(k in p for k in _KEYS):
        raise ConfigError("parameters: no 'Steps: …, Sampler: …, Seed: …' line found: this is not the parameters "
                          "text of a generated image")
    notes: list[str] = []
    clean, tagged = parse_lora_tags(p.get("Prompt", ""))
    entries: list[StackEntry] = []
    for e in tagged:  # an adapter tagged twice: A1111 applies both; here a stack holds it once
        first = next((x for x in entries if x.name.casefold() == e.name.casefold()), None)
        if first is not None:
            notes.append(f"adapter '{e.name}' is tagged more than once: only its first tag, {first.tag()}, is used")
            continue
        entries.append(e)
    sampler = _sampler(p, notes)
    width = height = None
    if size := p.get("Size"):
        try:
            width, height = (int(v) for v in size.lower().split("x"))
        except ValueError:
            notes.append(f"size '{size}' is not WIDTHxHEIGHT: the model's own size is used")
    req = GenerationRequest(
        prompt=clean, negative_prompt=p.get("Negative prompt", ""), steps=_number(p, "Steps", 20, int),
        guidance=_number(p, "CFG scale", 7.0, float), seed=_number(p, "Seed", -1, int), width=width,
        height=height, num_images=num_images, scheduler=sampler, clip_skip=_clip_skip(p, notes),
        **_hires(p, width, notes), **_variation(p, notes), tiling=p.get("Tiling", "").strip().lower() == "true",
        **_schedule(p, notes))
    if p.get("Model family"):  # recorded by this app
        req = for_family(req, p["Model family"], notes, a1111=False)
    if "Seed" not in p:
        notes.append("no seed recorded: a random one is used")
    skipped = [k for k in UNSUPPORTED if k in p]
    if skipped:
        notes.append("not applied here: " + ", ".join(f"{k} {p[k]}" for k in skipped) + " (the picture will differ)")
    if library is not None:
        notes += _adapter_notes(entries, parse_lora_hashes(p.get("Lora hashes", "")), library)
    if embeddings is not None:
        from .embeddings import embedding_files

        have = embedding_files(embeddings)
        for name in parse_lora_hashes(p.get("TI hashes", "")):  # the same 'name: hash, …' form
            if name.lower() not in have:
                notes.append(f"the image used the embedding '{name}', which is not in {Path(embeddings).name}/ "
                             "(put the file there): its word stays text, so the picture will differ")
    return Recalled(req, entries, p.get("Model"), vae=p.get("VAE") or None, notes=notes,
                    a1111=not p.get("Model family"))


def for_family(req: GenerationRequest, family: str | None, notes: list[str], a1111: bool = True
               ) -> GenerationRequest:
    """`req` as it can run on a base model of `family`. AUTOMATIC1111 records its Clip skip setting on every image,
    but applies it to SD 1.x only (SDXL takes its penultimate layer already; its SD 2.x encoder ignores the
    setting), so an A1111 image's (`a1111`) is dropped on those, with a note; this app's own SD 2.x images had it
    applied and keep it."""
    if req.clip_skip > 1 and (family == "sdxl" or (family == "sd2" and a1111)):
        why = ("SDXL models take the text encoders' penultimate layer already (AUTOMATIC1111 applies no clip "
               "skip to them either)" if family == "sdxl" else "AUTOMATIC1111 records it on SD 2.x images but does "
               "not apply it there")
        notes.append(f"Clip skip {req.clip_skip} is left out: {why}")
        return replace(req, clip_skip=1)
    return req


def _hires(p: dict[str, str], width: int | None, notes: list[str]) -> dict:
    """The Hires fix settings A1111 recorded (Hires upscale, or Hires resize WxH; its steps, upscaler and
    denoising strength); an img2img image's denoising strength is named: its starting picture is not recorded."""
    strength = _number(p, "Denoising strength", 0.7, float)
    if not 0 < strength <= 1:
        notes.append(f"Denoising strength {strength:g} is out of range (above 0, at most 1): 0.7 is used")
        strength = 0.7
    scale = _number(p, "Hires upscale", 0.0, float)
    if not scale and (resize := p.get("Hires resize")):
        try:
            scale = int(resize.lower().split("x")[0]) / width if width else 0.0
        except ValueError:
            scale = 0.0
        if not scale:
            notes.append(f"Hires resize '{resize}' cannot be read as a scale of the size: no Hires fix is applied")
    if not scale:
        if "Denoising strength" in p:
            how = (f"inpainting with a mask (mask blur {p['Mask blur']}), denoising strength {strength:g}"
                   if "Mask blur" in p else f"img2img, denoising strength {strength:g}")
            notes.append(f"the image was made from another picture ({how}), which its parameters do not hold: it "
                         "is made from the prompt alone here (give that picture as the starting image"
                         + (", and the mask," if "Mask blur" in p else "") + " to make it again)")
        blur = _number(p, "Mask blur", 4, int)
        return {"denoising_strength": strength, "mask_blur": blur if 0 <= blur <= 64 else 4}
    if not 1 <= scale <= 4:
        notes.append(f"Hires upscale {scale:g} is outside 1 to 4: no Hires fix is applied")
        return {}
    upscaler = p.get("Hires upscaler", "Latent")
    if upscaler not in HIRES_UPSCALERS:
        use = "Latent" if upscaler.lower().startswith("latent") else "Lanczos"
        notes.append(f"Hires upscaler '{upscaler}' is not available here: {use} is used (available: "
                     f"{', '.join(HIRES_UPSCALERS)})")
        upscaler = use
    steps = _number(p, "Hires steps", 0, int)
    return dict(hires_scale=scale, hires_steps=steps if 0 <= steps <= 500 else 0, hires_upscaler=upscaler,
                denoising_strength=strength)


def _variation(p: dict[str, str], notes: list[str]) -> dict:
    """A1111's variation seed ("Variation seed" and its strength), when the image has one."""
    strength = _number(p, "Variation seed strength", 0.0, float)
    if not 0 <= strength <= 1:
        notes.append(f"Variation seed strength {strength:g} is out of range (0 to 1): no variation is applied")
        return {}
    if strength == 0 or "Variation seed" not in p:
        return {}
    if "Denoising strength" in p and "Hires upscale" not in p and "Hires resize" not in p:
        notes.append("the image was made from another picture with a variation seed: made from the prompt here, "
                     "the variation seed is kept")
    return {"subseed": _number(p, "Variation seed", -1, int), "subseed_strength": strength}


# CFG rescale's keys: the A1111 extension's ("CFG Rescale"; "CFG Rescale φ" / "phi" in its older versions), Forge's
# builtin ("Rescale CFG")
_CFG_RESCALE_KEYS = ("CFG Rescale", "Rescale CFG", "CFG Rescale φ", "CFG Rescale phi")


def _schedule(p: dict[str, str], notes: list[str]) -> dict:
    """CFG rescale and A1111's "Noise Schedule: Zero Terminal SNR", when the image has them."""
    out: dict = {}
    key = next((k for k in _CFG_RESCALE_KEYS if k in p), None)
    if key is not None:
        phi = _number(p, key, 0.0, float)
        if 0 <= phi <= 1:
            out["cfg_rescale"] = phi
        else:
            notes.append(f"{key} {phi:g} is out of range (0 to 1): no CFG rescale is applied")
    if p.get(NOISE_SCHEDULE_KEY, "").strip().lower() == ZERO_TERMINAL_SNR.lower():
        out["zero_terminal_snr"] = True
    return out


def _clip_skip(p: dict[str, str], notes: list[str]) -> int:
    n = _number(p, "Clip skip", 1, int)
    if not 1 <= n <= 12:
        notes.append(f"Clip skip {n} is out of range (1 to 12): 1 is used")
        return 1
    return n


def _number(p: dict[str, str], key: str, default, kind):
    text = p.get(key)
    if text is None:
        return default
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"parameters: {key} '{text}' is not {what}") from None


def _sampler(p: dict[str, str], notes: list[str]) -> str:
    """The recorded sampler in this app's names; AUTOMATIC1111 1.9+ writes the schedule apart ('Sampler: DPM++
    2M, Schedule type: Karras')."""
    name = p.get("Sampler", "DPM++ 2M Karras")
    schedule = p.get("Schedule type", "")
    if schedule and schedule.lower() not in ("automatic", "uniform") and not name.lower().endswith(schedule.lower()):
        name = f"{name} {schedule}"
    try:
        return scheduler_name(name)
    except ConfigError:
        pass
    if name != p.get("Sampler", name):  # the sampler is here, its schedule is not
        try:
            plain = scheduler_name(p["Sampler"])
            notes.append(f"schedule '{schedule}' is not available here: {plain} with its own schedule is used")
            return plain
        except ConfigError:
            pass
    notes.append(f"sampler '{name}' is not available here: DPM++ 2M Karras is used (available: "
                 f"{', '.join(SCHEDULERS)})")
    return "DPM++ 2M Karras"


def _adapter_notes(entries: list[StackEntry], hashes: dict[str, str], library) -> list[str]:
    notes = []
    for e in entries:
        try:
            path = library.find(e.name)
        except UnsafeNameError:
            notes.append(f"adapter '{e.name}': not a name a library file can have, so it cannot be here")
            continue
        if path is None:
            notes.append(f"adapter '{e.name}' is not in the library: import it (Library tab, or "
                         "`lora-studio loras import FILE`) before generating")
            continue
        want = hashes.get(e.name.replace(":", "").replace(",", ""), "")
        if want:
            have = library.info(path.stem).short_hash
            if have and have.lower()[:len(want)] != want.lower()[:len(have)]:
                notes.append(f"adapter '{e.name}': the image was made with file hash {want}, the library's "
                             f"'{path.stem}' has {have} (another version): the picture will differ")
    return notes


__all__ = ["Recalled", "read_parameters", "recall", "for_family"]
