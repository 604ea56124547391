"""The optimizers a run can use, and their extra arguments as kohya's `--optimizer_args` gives them.

- adamw: torch's AdamW (the default everywhere).
- adamw8bit: bitsandbytes' 8-bit AdamW (CUDA only): optimizer state in a quarter of the memory.
- prodigy: Prodigy (Mishchenko & Defazio 2023, the `prodigyopt` package), which estimates its own step size; its
  learning rate is a multiplier of that estimate, 1.0 as recommended by its authors and kohya's docs.
- adafactor: transformers' Adafactor with a fixed learning rate (scale_parameter, relative_step and warmup_init
  off, the usual LoRA recipe; `relative_step=True` in the arguments lets it choose its own rate instead).
- lion: Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), written here from the paper's
  algorithm: the sign of an interpolated momentum; typically 3-10x smaller learning rates than AdamW.

Extra arguments are `key=value` strings (`betas=0.9,0.99`, `d_coef=2`, `use_bias_correction=True`), checked
against the optimizer's own signature before any training starts, so a typo is an error naming the key.
"""

from __future__ import annotations

import ast
import inspect
import re
import shlex
from typing import Any

import torch

from pipelines.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "lion")
ADAPTIVE = frozenset({"prodigy"})  # the learning rate is a multiplier of the optimizer's own estimate
ADAPTIVE_MIN_LR = 0.1  # below this an adaptive optimizer's "lr" is surely an AdamW rate typed by habit
LABELS = {"adamw": "AdamW", "adamw8bit": "AdamW 8-bit", "prodigy": "Prodigy", "adafactor": "Adafactor",
          "lion": "Lion"}
# set by their own fields: an argument would silently fight them (weight_decay is allowed: kohya has no option for
# it but --optimizer_args, so its configs carry it there, and there it wins over the weight_decay field)
_OWN_FIELDS = {"lr": "lr_unet / lr_text", "params": None}
_PAIR = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)")


class Lion(torch.optim.Optimizer):
    """Lion: update = sign(beta1 * m + (1 - beta1) * g); p -= lr * (update + weight_decay * p);
    m = beta2 * m + (1 - beta2) * g. The paper's defaults: betas (0.9, 0.99)."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ValueError(f"Lion: lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Lion: betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                update = m.mul(b1).add_(p.grad, alpha=1 - b1).sign_()
                p.add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


def optimizer_class(name: str) -> type:
    """The class behind a name (imports its package: bitsandbytes only here, when adamw8bit is used)."""
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        import bitsandbytes as bnb  # only reachable on CUDA (the trainer checks the device first)

        return bnb.optim.AdamW8bit
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    if name == "lion":
        return Lion
    raise ConfigError(f"optimizer: must be one of {', '.join(OPTIMIZERS)}, got '{name}'")


def _value(text: str) -> Any:
    """A Python literal (1e-6, True, 'x', (0.9, 0.99)); `0.9,0.99` is a tuple; true/false as in TOML."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word (e.g. a mode name): a string


def parse_args(lines: list[str]) -> dict[str, Any]:
    """`key=value` strings (one per line, or several on a line separated by spaces, as kohya's
    `--optimizer_args "d_coef=2" "betas=0.9,0.99"`) as a dict. An entry that is not key=value, or a key given
    twice, is a ConfigError naming it."""
    out: dict[str, Any] = {}
    for line in lines:
        try:  # kohya_ss writes them shell-quoted: "d0=1e-5" "d_coef=1.0"
            tokens = shlex.split(line)
        except ValueError as e:
            raise ConfigError(f"optimizer_args: {line.strip()!r}: {e}") from None
        pairs: list[str] = []
        for tok in tokens:
            if "=" not in tok and pairs and pairs[-1].endswith(","):  # betas=0.9, 0.99
                pairs[-1] += tok
            else:
                pairs.append(tok)
        for pair in pairs:
            m = _PAIR.fullmatch(pair)
            if m is None:
                raise ConfigError(f"optimizer_args: {pair!r} is not key=value (e.g. d_coef=2 or betas=0.9,0.99)")
            key = m.group(1)
            if key in out:
                raise ConfigError(f"optimizer_args: {key} is given twice")
            out[key] = _value(m.group(2))
    return out


def _kind_ok(value: Any, default: Any) -> bool:
    """A value fits a parameter whose default is `default` (None: anything)."""
    if default is None or default is inspect.Parameter.empty:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list)) and len(value) == len(default) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    return isinstance(value, type(default))


def check_args(name: str, lines: list[str]) -> dict[str, Any]:
    """The parsed arguments, each checked against the optimizer's signature: an unknown key, a key that a
    field sets, or a value of the wrong kind is a ConfigError. Without arguments nothing is imported."""
    args = parse_args(lines)
    if not args:
        return args
    for key in args:
        if key in _OWN_FIELDS:
            where = _OWN_FIELDS[key]
            raise ConfigError(f"optimizer_args: {key} is set by {where}, not here" if where else
                              f"optimizer_args: {key} cannot be set")
    try:
        cls = optimizer_class(name)
    except ImportError:  # adamw8bit without bitsandbytes: the device check says so when the run starts
        return args
    params = inspect.signature(cls.__init__).parameters
    known = [p for p in params if p not in ("self", "params", "lr")
             and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    for key, value in args.items():
        if key not in params:
            raise ConfigError(f"optimizer_args: {LABELS[name]} has no argument {key!r}; it takes "
                              f"{', '.join(known)}")
        if not _kind_ok(value, params[key].default):
            raise ConfigError(f"optimizer_args: {key}={value!r} does not fit {LABELS[name]}'s {key} "
                              f"(default {params[key].default!r})")
    return args


def check_rates(cfg: Any) -> None:
    """An adaptive optimizer (Prodigy) takes a multiplier as its learning rate, the same for every group."""
    if cfg.optimizer not in ADAPTIVE:
        return
    label = LABELS[cfg.optimizer]
    if cfg.lr_unet < ADAPTIVE_MIN_LR:
        raise ConfigError(f"lr_unet: {label} finds its own step size; its learning rate is a multiplier of it, "
                          f"usually 1.0 (got {cfg.lr_unet:g}, an AdamW-sized rate)")
    if cfg.train_text_encoder and cfg.lr_text != cfg.lr_unet:
        raise ConfigError(f"lr_text: {label} takes one learning rate for the UNet and the text encoder; set "
                          f"lr_text to lr_unet ({cfg.lr_unet:g}), got {cfg.lr_text:g}")
    if (getattr(cfg, "pivotal", False) or getattr(cfg, "textual_inversion", False)) and cfg.lr_ti != cfg.lr_unet:
        raise ConfigError(f"lr_ti: {label} takes one learning rate for the LoRA and the trigger's embedding; set "
                          f"lr_ti to lr_unet ({cfg.lr_unet:g}), got {cfg.lr_ti:g}")


def build(name: str, groups: list[dict], lr: float, weight_decay: float, lines: list[str]) -> torch.optim.Optimizer:
    """The optimizer over the parameter groups (each with its own "lr")."""
    args = check_args(name, lines)
    weight_decay = args.pop("weight_decay", weight_decay)  # kohya's place for it wins
    cls = optimizer_class(name)
    if name == "adafactor":
        args = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **args}
        if args["relative_step"]:  # Adafactor's own time-dependent rate: no fixed one may be given
            opt = cls([{**g, "lr": None} for g in groups], lr=None, weight_decay=weight_decay, **args)
            for g, given in zip(opt.param_groups, groups):
                g["lr"] = given["lr"]  # unused by Adafactor then; the schedulers need a number there
            return opt
    return cls(groups, lr=lr, weight_decay=weight_decay, **args)


def describe(name: str, lines: list[str]) -> str:
    """kohya's ss_optimizer: the class's module and name, then its arguments in brackets."""
    cls_name = {"adamw": "torch.optim.adamw.AdamW", "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
                "prodigy": "prodigyopt.prodigy.Prodigy",
                "adafactor": "transformers.optimization.Adafactor", "lion": "training.optimizers.Lion"}[name]
    args = parse_args(lines)
    return cls_name + (f"({','.join(f'{k}={v}' for k, v in args.items())})" if args else "")


def step_size(optimizer: torch.optim.Optimizer) -> float:
    """The UNet group's learning rate now; for Prodigy the step it takes (its estimate d times lr)."""
    group = optimizer.param_groups[0]
    if group.get("relative_step"):  # Adafactor choosing its own: its rate for the first trained weight
        from transformers.optimization import Adafactor

        state = next((optimizer.state[p] for p in group["params"] if optimizer.state.get(p)), None)
        return float(Adafactor._get_lr(group, state)) if state else 0.0
    lr = group.get("lr") or 0.0
    return float(group.get("d", 1.0) * lr)
