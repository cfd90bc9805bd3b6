"""Seeded random-weight CLIP files at the real configurations.

No weights can be downloaded here, so tests and the demo build models from the published configs with seeded
random weights. Random weights have no activation outliers; `add_outlier_channels` plants a few, as real CLIPs
have, for the stress fixture.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

# OpenAI CLIP ViT-L/14 text tower (SD1.5's clip_l), as in its config.json.
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                   projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


# OpenCLIP ViT-bigG/14 text tower (SDXL's clip_g), as in ComfyUI's clip_config_bigg.json.
CLIP_G_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
                   projection_dim=1280, bos_token_id=0, eos_token_id=49407, pad_token_id=1)


# OpenCLIP ViT-H/14 text tower (SD2.x and SD2.1 unCLIP), as in ComfyUI's sd2_clip_config.json.
CLIP_H_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                   projection_dim=1024, bos_token_id=0, eos_token_id=49407, pad_token_id=1)


# OpenAI CLIP ViT-L/14 and OpenCLIP ViT-H/14 vision towers, as in ComfyUI's clip_vision_config_*.json.
CLIP_VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")


def _seeded_fp16(model_cls, config_cls, config: dict, seed: int, num_hidden_layers: int | None,
                 device: str = "cpu") -> dict[str, torch.Tensor]:
    cfg = {**config, **({} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers})}
    torch.manual_seed(seed)
    with torch.device(device):  # "cuda" draws other numbers (same seed), in seconds instead of a minute
        model = model_cls(config_cls(**cfg))
    return {k: v.detach().to(torch.float16).cpu().contiguous() for k, v in model.state_dict().items()
            if not k.endswith("position_ids")}


def clip_vision_state_dict(config: dict = CLIP_VIT_L, seed: int = 20, num_hidden_layers: int | None = None,
                           device: str = "cpu") -> dict[str, torch.Tensor]:
    """A transformers CLIPVisionModelWithProjection with seeded random weights, as an fp16 state dict."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return _seeded_fp16(CLIPVisionModelWithProjection, CLIPVisionConfig, config, seed, num_hidden_layers, device)


def write_clip_vision(path: str | os.PathLike, config: dict = CLIP_VIT_L, seed: int = 20,
                      num_hidden_layers: int | None = None) -> Path:
    """A CLIP vision file (IP-Adapter's image encoder) as CLIPVisionLoader reads it."""
    return save_atomic(clip_vision_state_dict(config, seed, num_hidden_layers), path,
                       {"fixture": "seeded random weights, not a trained model", "seed": str(seed)})


def clip_text_state_dict(config: dict = CLIP_L_TEXT, seed: int = 0, num_hidden_layers: int | None = None,
                         device: str = "cpu") -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection with seeded random weights, as an fp16 state dict."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return _seeded_fp16(CLIPTextModelWithProjection, CLIPTextConfig, config, seed, num_hidden_layers, device)


STRESS_LAYERS = tuple(range(1, 12))


def add_outlier_channels(sd: dict[str, torch.Tensor], layers: tuple[int, ...] = STRESS_LAYERS,
                         channels: int = 3, gain: float = 20000.0, seed: int = 1) -> dict[str, torch.Tensor]:
    """Plant massive activations in a few MLP channels of every block after the first, as real CLIPs have.

    In each chosen layer, 3 of the 3072 fc1 output channels are scaled up by `gain`, so the fc2 input carries
    a few channels around 1e4 while the rest stay below 1; the matching fc2 input columns are scaled down to
    keep the block's output in range. One per-tensor FP8 scale for such an fc2 input pushes the ordinary
    channels into FP8's subnormal range, and the fc1 weight's scale is set by its few huge rows.
    """
    g = torch.Generator().manual_seed(seed)
    out = dict(sd)
    for i in layers:
        p = f"text_model.encoder.layers.{i}.mlp."
        fc1_w, fc1_b = out[p + "fc1.weight"].float().clone(), out[p + "fc1.bias"].float().clone()
        fc2_w = out[p + "fc2.weight"].float().clone()
        idx = torch.randperm(fc1_w.shape[0], generator=g)[:channels]
        fc1_w[idx] *= gain
        fc1_b[idx] = fc1_b[idx].abs() * gain + gain * 0.5  # positive: quick_gelu passes them, as outliers do
        fc2_w[:, idx] /= gain
        out[p + "fc1.weight"], out[p + "fc1.bias"] = fc1_w.half(), fc1_b.half()
        out[p + "fc2.weight"] = fc2_w.half()
    return out


def save_atomic(sd: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def write_clip_l(path: str | os.PathLike, seed: int = 0, stress: bool = False) -> Path:
    """The SD1.5 CLIP-L text encoder fixture as a safetensors file CLIPLoader reads."""
    sd = clip_text_state_dict(CLIP_L_TEXT, seed=seed)
    if stress:
        sd = add_outlier_channels(sd)
    return save_atomic(sd, path, {"fixture": "seeded random weights, not a trained model", "seed": str(seed),
                                  "stress": str(stress)})


def write_clip_g(path: str | os.PathLike, seed: int = 10) -> Path:
    """SDXL's CLIP-G text encoder (695M parameters) with seeded random weights, as DualCLIPLoader reads it."""
    sd = clip_text_state_dict(CLIP_G_TEXT, seed=seed)
    return save_atomic(sd, path, {"fixture": "seeded random weights, not a trained model", "seed": str(seed)})


def write_lora_clip_l(path: str | os.PathLike, rank: int = 8, seed: int = 2, scale: float = 0.05) -> Path:
    """A kohya-format LoRA for SD1.5's CLIP-L (q/v projections and fc1 of every layer), seeded random."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    w, inter = CLIP_L_TEXT["hidden_size"], CLIP_L_TEXT["intermediate_size"]
    for i in range(CLIP_L_TEXT["num_hidden_layers"]):
        for mod, (out_f, in_f) in (("self_attn_q_proj", (w, w)), ("self_attn_v_proj", (w, w)),
                                   ("mlp_fc1", (inter, w))):
            k = f"lora_te_text_model_encoder_layers_{i}_{mod}"
            sd[k + ".lora_down.weight"] = (torch.randn(rank, in_f, generator=g) * scale).half()
            sd[k + ".lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * scale).half()
            sd[k + ".alpha"] = torch.tensor(float(rank))
    return save_atomic(sd, path)


def write_embedding(path: str | os.PathLike, vectors: int = 2, width: int = 768, seed: int = 3) -> Path:
    """A textual-inversion embedding (`embedding:<name>` in a prompt), seeded random at token-embedding scale."""
    g = torch.Generator().manual_seed(seed)
    return save_atomic({"emb_params": (torch.randn(vectors, width, generator=g) * 0.05)}, path)


def write_t5_base_stub(path: str | os.PathLike) -> Path:
    """A file ComfyUI's CLIPLoader takes for a T5-base text encoder: a CLIP type the pack does not quantize."""
    return save_atomic({"encoder.block.0.layer.0.SelfAttention.k.weight": torch.zeros(768, 768,
                                                                                    dtype=torch.float16)}, path)


FIXTURE_VERSION = 1  # bump when a generator changes, so cached files are rebuilt


def cached(name: str, make, cache_dir: str | os.PathLike | None = None) -> Path:
    """`make(path)` once per fixture version; later calls reuse the file (6 s per full-size CLIP-L saved)."""
    d = Path(cache_dir or Path(__file__).resolve().parent.parent / ".cache" / "fixtures")
    path = d / f"v{FIXTURE_VERSION}-{name}"
    if not path.exists():
        make(path)
    return path


def link_into(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        try:
            os.link(src, dst)
        except OSError:
            import shutil
            shutil.copyfile(src, dst)
    return dst


def populate(base: Path, only: tuple[str, ...] | None = None) -> dict[str, str]:
    """Put every fixture (or those named in `only`) into a ComfyUI base directory; returns the names the loaders
    see. All of them make about 3 GB in the cache; the demo needs CLIP-L's 247 MB."""
    files = {
        "clip_l": ("text_encoders", "fp8clip-fixture-clip_l.safetensors", lambda p: write_clip_l(p)),
        "clip_l_stress": ("text_encoders", "fp8clip-fixture-clip_l-outliers.safetensors",
                          lambda p: write_clip_l(p, stress=True)),
        "clip_g": ("text_encoders", "fp8clip-fixture-clip_g.safetensors", lambda p: write_clip_g(p)),
        "vit_l": ("clip_vision", "fp8clip-fixture-clip-vit-l-14.safetensors", lambda p: write_clip_vision(p)),
        "vit_h_4layers": ("clip_vision_reduced", "fp8clip-fixture-clip-vit-h-14-4layers.safetensors",
                          lambda p: write_clip_vision(p, CLIP_VIT_H, seed=21, num_hidden_layers=4)),
        "t5_stub": ("text_encoders", "fp8clip-fixture-t5base-stub.safetensors", write_t5_base_stub),
        "lora": ("loras", "fp8clip-fixture-clip_l-lora.safetensors", write_lora_clip_l),
        "embedding": ("embeddings", "fp8clip-fixture-emb.safetensors", write_embedding),
    }
    from harness.checkpoints import write_sd15_checkpoint

    files["sd15_ckpt"] = ("checkpoints", "fp8clip-fixture-sd15-mini.safetensors",
                          lambda p: write_sd15_checkpoint(p, cached(files["clip_l"][1], files["clip_l"][2])))
    out = {}
    for key, (folder, name, make) in files.items():
        if only is not None and key not in only:
            continue
        link_into(cached(name, make), base / "models" / folder / name)
        out[key] = name
    return out
