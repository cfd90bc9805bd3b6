"""Glue to ComfyUI's progress bar and interrupt button, kept out of quant/."""
from __future__ import annotations

from typing import Callable


def progress_bar() -> Callable[[int, int], None]:
    import comfy.utils

    bar: list = []

    def update(done: int, total: int) -> None:
        if not bar:
            bar.append(comfy.utils.ProgressBar(total))
        bar[0].update_absolute(done, total)
    return update


def interrupt_check() -> Callable[[], None]:
    import comfy.model_management

    return comfy.model_management.throw_exception_if_processing_interrupted
