"""Calibrations remembered for the model they came from, so that changing only the runtime or the warning
threshold of a quantize node does not calibrate again.

ComfyUI runs a node again when any of its inputs changes, and hands it the very same CLIP object while the
loader's output stays cached. An entry holds what calibration found (every quantizer's amax: a few KB) and
the report, never a model copy; it lives as long as that CLIP object does (a weak reference) and is not used
for another object (re-loaded, LoRA, CLIPSetLastLayer: each a new clone) or other prompts or recipe.
"""
from __future__ import annotations

import hashlib
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

import torch

PER_MODEL = 4  # calibrations kept per model: a few recipes tried one after the other

_lock = threading.Lock()
_memo: "weakref.WeakKeyDictionary[Any, OrderedDict[str, Calibration]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Calibration:
    amax: dict[str, torch.Tensor]  # quantizer name -> calibrated amax (CPU)
    report: Any  # the QualityReport / VisionReport of that calibration
    at: float  # time.time() of the calibration


def key(*parts: Any) -> str:
    """One string for everything a calibration depends on besides the model object itself."""
    h = hashlib.sha256()
    for p in parts:
        items: Iterable[Any] = p if isinstance(p, (list, tuple)) else (p,)
        h.update(b"\x01")
        for item in items:
            h.update(b"\x00" + str(item).encode())
    return h.hexdigest()


def recall(model: Any, k: str) -> Calibration | None:
    with _lock:
        entries = _memo.get(model)
        hit = entries.get(k) if entries is not None else None
        if hit is not None:
            entries.move_to_end(k)
        return hit


def remember(model: Any, k: str, amax: dict[str, torch.Tensor], report: Any) -> None:
    with _lock:
        entries = _memo.setdefault(model, OrderedDict())
        entries[k] = Calibration(amax, report, time.time())
        entries.move_to_end(k)
        while len(entries) > PER_MODEL:
            entries.popitem(last=False)


def forget_all() -> None:
    with _lock:
        _memo.clear()


def reused_line(c: Calibration, weights_only: bool = False) -> str:
    same = ("same model, recipe and evaluation data; weights only uses no calibration data" if weights_only else
            "same model, calibration data, recipe and evaluation data; only the runtime or min_cosine changed")
    return f"Calibration and report reused from the run at {time.strftime('%H:%M:%S', time.localtime(c.at))} ({same})"
