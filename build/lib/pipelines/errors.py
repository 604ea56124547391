"""Domain errors of LoRA Studio. Only `app/` turns these into UI messages."""

from __future__ import annotations


class LoraStudioError(Exception):
    """Base class: a problem the user can act on, with a message that names the file or field."""


class ConfigError(LoraStudioError, ValueError):
    """An invalid option value; the message names the field."""


class ModelLoadError(LoraStudioError):
    """A base model could not be loaded (missing path, unsupported architecture, offline hub...)."""


class CorruptWeightsError(LoraStudioError):
    """A weights file is truncated, malformed, not safetensors, or holds non-finite values."""


class PickleRefusedError(LoraStudioError):
    """A pickle-based weights file was given without an explicit allow_pickle."""


class UnsafeNameError(LoraStudioError, ValueError):
    """A model or adapter name that would resolve outside its library folder."""


class IncompatibleAdapterError(LoraStudioError):
    """An adapter that does not fit the loaded base model (family or keys)."""


class DatasetError(LoraStudioError):
    """A training image folder that cannot be used (empty, missing, no valid image)."""


class TrainingError(LoraStudioError):
    """Training stopped on a problem (NaN loss, resume mismatch, out of memory)."""
