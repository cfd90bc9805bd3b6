"""Which GELU a ComfyUI CLIP layer uses. ComfyUI stores it as a bare lambda, so it is identified by what it
computes; the names are those of the checkpoints' configs (`hidden_act`)."""
from __future__ import annotations

from typing import Callable

import torch

GELUS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda a: a * torch.sigmoid(1.702 * a),
    "gelu": lambda a: torch.nn.functional.gelu(a),
    "gelu_pytorch_tanh": lambda a: torch.nn.functional.gelu(a, approximate="tanh"),
}


def activation_name(fn: Callable) -> str | None:
    """The name in GELUS of what `fn` computes, or None."""
    x = torch.linspace(-6, 6, 97)
    try:
        with torch.no_grad():
            y = fn(x)
    except Exception:  # noqa: BLE001 - not a tensor function: unknown
        return None
    for name, ref in GELUS.items():
        if torch.allclose(y, ref(x), atol=1e-6):
            return name
    return None
