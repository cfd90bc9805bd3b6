"""Errors a user can act on: each message names the problem and the fix."""


class FP8ClipError(ValueError):
    """Bad input to the pack. ComfyUI shows the message in the UI, so it must say what to change."""


class UnsupportedModelError(FP8ClipError):
    """A model the pack does not know how to quantize."""
