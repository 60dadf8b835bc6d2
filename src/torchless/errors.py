"""Errors a user can cause. The CLI prints these as one line; anything else is a bug."""


class TorchlessError(ValueError):
    """Base class: bad input from the user or a bad file, never a bug in torchless."""


class ModelFileError(TorchlessError):
    """A model file is truncated, corrupt, or not what it claims to be."""


class UnsupportedModelError(TorchlessError):
    """A well-formed file that torchless cannot run (architecture, quantization type)."""


class ContextOverflowError(TorchlessError):
    """A prompt or generation that does not fit in the model's context."""
