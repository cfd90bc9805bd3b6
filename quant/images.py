"""Calibration and evaluation images for CLIP vision: checking what the graph wires in, and a built-in set.

The built-in set is synthetic (no images can ship or be downloaded with the pack): seeded procedural scenes
of ten kinds (gradients, stripes, checkerboards, discs, blobs, noise textures, ...) in many colours, sizes and
frequencies, so activation statistics cover flat areas, edges and textures. For a real use, wire your own
reference images: they calibrate better.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import FP8ClipError

KINDS = ("gradient", "stripes", "checker", "disc", "rings", "blobs", "noise", "grid", "triangle", "plasma")


def check_images(images: torch.Tensor | None, what: str = "calibration images") -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in 0..1 -> RGB float tensor; a clear error for anything else."""
    if images is None:
        raise FP8ClipError(f"No {what}: connect an IMAGE (e.g. Load Image) or leave the input empty for the "
                           "built-in set.")
    if not torch.is_tensor(images) or images.ndim != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise FP8ClipError(f"The {what} must be an IMAGE batch [batch, height, width, channels], got {shape}. "
                           "Connect a Load Image or Batch Images output.")
    b, h, w, c = images.shape
    if b == 0:
        raise FP8ClipError(f"The {what} batch is empty.")
    if c not in (1, 3, 4):
        raise FP8ClipError(f"The {what} have {c} channels; CLIP vision takes RGB (3), grayscale (1) or RGBA "
                           "(4, alpha is dropped). Convert them first.")
    if h < 16 or w < 16:
        raise FP8ClipError(f"The {what} are {w}x{h} pixels; use images of at least 16x16 (CLIP resizes them to "
                           "its input size).")
    images = images.float()
    if c == 1:
        images = images.expand(b, h, w, 3)
    elif c == 4:
        images = images[..., :3]
    return images.clamp(0, 1).contiguous()


def one_batch(batches: Sequence[torch.Tensor], size: int, what: str = "calibration images") -> torch.Tensor:
    """The IMAGE batches of a list input (a folder loader's images) as one batch. Batches of one size are joined
    as they are; of several sizes, each is first scaled and center-cropped to the encoder's `size` as
    CLIPVisionEncode (crop: center) does, so that calibration sees what the encoder will."""
    if not batches:
        raise FP8ClipError(f"The list of {what} is empty: wire images, or leave the input empty for the "
                           "built-in set.")
    checked = [check_images(b, what) for b in batches]
    if len({tuple(b.shape[1:3]) for b in checked}) > 1:
        checked = [center_crop(b, size) for b in checked]
    return torch.cat(checked)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """ComfyUI's `clip_preprocess` with crop, before its normalization: the shorter side scaled to `size`
    (bicubic, antialiased), the center cut out. Its later rounding to 8 bits then gives the same pixels."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    x = images.movedim(-1, 1)
    scale = size / min(x.shape[2], x.shape[3])
    x = torch.nn.functional.interpolate(x, size=(round(scale * x.shape[2]), round(scale * x.shape[3])),
                                        mode="bicubic", antialias=True)
    h, w = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    return x[:, :, h:h + size, w:w + size].movedim(1, -1).clamp(0, 1).contiguous()


def _scene(kind: str, g: torch.Generator, size: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    r = lambda: float(torch.rand((), generator=g))  # noqa: E731
    c1, c2 = torch.rand(3, generator=g), torch.rand(3, generator=g)
    if kind == "gradient":
        a = r() * 2 * math.pi
        t = (x * math.cos(a) + y * math.sin(a)).clamp(0, 1)
    elif kind == "stripes":
        f, a = 3 + 20 * r(), r() * math.pi
        t = (torch.sin((x * math.cos(a) + y * math.sin(a)) * f * 2 * math.pi) > 0).float()
    elif kind == "checker":
        n = int(2 + 14 * r())
        t = (((x * n).floor() + (y * n).floor()) % 2).float()
    elif kind == "disc":
        cx, cy, rad = r(), r(), 0.1 + 0.35 * r()
        t = (((x - cx) ** 2 + (y - cy) ** 2).sqrt() < rad).float()
    elif kind == "rings":
        cx, cy, f = r(), r(), 4 + 16 * r()
        t = 0.5 + 0.5 * torch.sin(((x - cx) ** 2 + (y - cy) ** 2).sqrt() * f * 2 * math.pi)
    elif kind == "blobs":
        t = torch.zeros(size, size)
        for _ in range(5):
            cx, cy, s = r(), r(), 0.05 + 0.2 * r()
            t = t + torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
        t = (t / t.max()).clamp(0, 1)
    elif kind == "noise":
        k = int(4 + 60 * r())
        t = torch.nn.functional.interpolate(torch.rand(1, 1, k, k, generator=g), size=(size, size), mode="bicubic",
                                            align_corners=False)[0, 0].clamp(0, 1)
    elif kind == "grid":
        n, wdt = int(3 + 12 * r()), 0.05 + 0.2 * r()
        t = (((x * n) % 1 < wdt) | ((y * n) % 1 < wdt)).float()
    elif kind == "triangle":
        a, b = r(), r()
        t = ((y > a * x) & (y < 1 - b * x)).float()
    else:  # plasma
        t = (torch.sin(x * (5 + 10 * r())) + torch.sin(y * (5 + 10 * r())) + torch.sin((x + y) * (5 + 10 * r()))) / 6 + 0.5
    img = c1.view(1, 1, 3) * (1 - t).unsqueeze(-1) + c2.view(1, 1, 3) * t.unsqueeze(-1)
    img = img + torch.randn(size, size, 3, generator=g) * 0.02 * r()
    return img.clamp(0, 1)


def synthetic_images(count: int, seed: int, size: int = 224, kinds: tuple[str, ...] = KINDS) -> tuple[torch.Tensor, list[str]]:
    """`count` images cycling through `kinds`, as a ComfyUI IMAGE batch, with each image's kind."""
    g = torch.Generator().manual_seed(seed)
    labels = [kinds[i % len(kinds)] for i in range(count)]
    return torch.stack([_scene(k, g, size) for k in labels]), labels


def calibration_images(count: int = 32) -> torch.Tensor:
    return synthetic_images(count, seed=1234)[0]


def held_out_images(count: int = 20) -> tuple[torch.Tensor, list[str]]:
    """Images of the same kinds with other seeds: the zero-shot-style agreement check needs their labels."""
    return synthetic_images(count, seed=98765)
