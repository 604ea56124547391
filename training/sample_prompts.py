"""Sample prompts with kohya sd-scripts' per-prompt options.

A line of kohya's sample prompt file is a prompt followed by options: `--n` the negative prompt, `--w` / `--h` the
size, `--d` the seed, `--s` the sampler steps, `--l` the CFG scale and `--ss` the sampler (kohya's
`train_util.line_to_prompt_dict`). kohya_ss users' prompt files are full of them (`--n lowres, bad anatomy`), so
they are read here the same way; an option kohya has for other models (Flux, SD3, ControlNet) or one it does not
have at all is refused by name, never ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines.errors import ConfigError

# kohya's sampler names (--sample_sampler, --ss) -> this app's (A1111's) names
KOHYA_SAMPLERS = {
    "ddim": "DDIM", "pndm": "PNDM", "lms": "LMS", "k_lms": "LMS", "euler": "Euler", "k_euler": "Euler",
    "euler_a": "Euler a", "k_euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a", "dpmsolver": "DPM++ 2M", "dpmsolver++": "DPM++ 2M",
    "dpmsingle": "DPM++ SDE Karras",
}
# kohya's options for other models than SD 1.x/2.x/XL: their meaning does not carry over
_OTHER_MODELS = {"g": "Flux's distilled guidance", "cn": "a ControlNet image", "ctr": "Lumina's CFG truncation",
                 "rcfg": "Lumina's CFG renormalisation", "fs": "a flow-matching shift"}
OPTION_HELP = "--n negative prompt, --w width, --h height, --d seed, --s steps, --l CFG scale, --ss sampler"


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None


def sampler_name_of(name: str, field: str = "sample_sampler") -> str:
    """This app's sampler name for kohya's (`euler_a`, `k_dpm_2`) or an A1111 one (`Euler a`)."""
    from pipelines.samplers import scheduler_name

    key = name.strip().lower()
    if key in KOHYA_SAMPLERS:
        return KOHYA_SAMPLERS[key]
    try:
        return scheduler_name(name)
    except ConfigError:
        raise ConfigError(f"{field}: unknown sampler '{name}'; kohya's names ({', '.join(KOHYA_SAMPLERS)}) and this "
                          f"app's work") from None


def parse_sample_prompt(line: str, field: str = "sample_prompts") -> SamplePrompt:
    """One sample prompt, with kohya's options after it (split at ' --', as kohya does)."""
    prompt, *options = line.split(" --")
    got: dict = {}
    for opt in options:
        m = re.fullmatch(r"(\w+)(?:\s+(.*))?", opt.strip(), re.DOTALL)
        key, value = (m.group(1).lower(), (m.group(2) or "").strip()) if m else (opt.strip(), "")
        where = f"{field}: '{line.strip()}'"
        if key in _OTHER_MODELS:
            raise ConfigError(f"{where}: --{key} is {_OTHER_MODELS[key]}, an option kohya has for other models; "
                              "remove it")
        if key not in ("n", "w", "h", "d", "s", "l", "ss"):
            raise ConfigError(f"{where}: unknown option --{key} (kohya's sample prompt options: {OPTION_HELP})")
        if not value and key != "n":
            raise ConfigError(f"{where}: --{key} needs a value")
        if key == "ss":
            got["sampler"] = sampler_name_of(value, f"{where}: --ss")
            continue
        try:
            if key == "n":
                got["negative_prompt"] = value
            elif key in ("w", "h"):
                v = int(value)
                if v < 8 or v % 8:
                    raise ValueError
                got["width" if key == "w" else "height"] = v
            elif key == "d":
                got["seed"] = int(value)
            elif key == "s":
                got["steps"] = max(1, min(500, int(value)))  # kohya clamps too (to 1000)
            else:
                got["guidance"] = float(value)
        except ValueError:
            what = {"w": "a width (a multiple of 8)", "h": "a height (a multiple of 8)", "d": "a whole seed",
                    "s": "a whole number of steps", "l": "a CFG scale"}[key]
            raise ConfigError(f"{where}: --{key} must be {what}, got '{value}'") from None
    return SamplePrompt(prompt.strip(), **got)


def read_prompt_file(path: str) -> list[str]:
    """kohya's sample prompt file (.txt): a prompt a line, with its options; empty and # lines left out. Each line is
    checked, an error naming the file and the line."""
    from pathlib import Path

    p = Path(path).expanduser()
    if p.suffix.lower() in (".toml", ".json"):
        raise ConfigError(f"sample_prompts_file: {p}: kohya's .toml and .json prompt files are not read here; write "
                          "the prompts a line each, with their options (--n, --w, --h, --d, --s, --l, --ss), in a "
                          ".txt file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"sample_prompts_file: {p}: cannot be read ({type(e).__name__}: {e})") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parse_sample_prompt(line)
        except ConfigError as e:
            raise ConfigError(f"sample_prompts_file: {p}, line {i}: {str(e).split(': ', 2)[-1]}") from None
        out.append(line)
    return out
