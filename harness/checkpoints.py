"""Seeded checkpoints that ComfyUI's checkpoint loaders take, to run the example workflows whole.

The text and vision encoders are the real-config fixtures (what the pack quantizes); the VAE has the real SD
VAE architecture; the UNet is the family's real one (on a GPU) or a small one that ComfyUI still detects as
SD1.5 (one resolution level, 320 channels, 768-wide cross-attention), so a whole text-to-image graph samples
in seconds on a CPU. Weights are seeded random: the images are noise, but the same noise for the same
conditioning, which is what a workflow test compares. Tensors are named by the host's own savers
(`process_*_state_dict_for_saving`), so the keys are the ones its loaders read.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

_LDM = dict(use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True,
            legacy=False, model_channels=320, use_temporal_attention=False, use_temporal_resblock=False)
_SD2 = dict(_LDM, use_linear_in_transformer=True, context_dim=1024, num_head_channels=64,
            num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4],
            transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
# ComfyUI's detected unet configs (comfy/model_detection.py), by family; "-mini": one level, one block.
UNETS = {
    "sd15": dict(_SD2, use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1,
                 adm_in_channels=None),
    "sd15-mini": dict(_LDM, use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1,
                      adm_in_channels=None, num_res_blocks=[1], transformer_depth=[1], channel_mult=[1],
                      transformer_depth_middle=1, transformer_depth_output=[1, 1]),
    "sdxl": dict(_LDM, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                 transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]),
    "sd21-unclip-h": dict(_SD2, num_classes="sequential", adm_in_channels=2048),
    "sd21-unclip-h-mini": dict(_SD2, num_classes="sequential", adm_in_channels=2048, num_res_blocks=[1],
                               transformer_depth=[1], channel_mult=[1], transformer_depth_output=[1, 1]),
}
MODEL_CONFIGS = {"sd15": "SD15", "sd15-mini": "SD15", "sdxl": "SDXL", "sd21-unclip-h": "SD21UnclipH",
                 "sd21-unclip-h-mini": "SD21UnclipH"}
SD_VAE = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
          'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


def _seeded(module: torch.nn.Module, seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Fill every tensor deterministically (host modules are built uninitialized) and return fp16 weights.

    Matrices and kernels get std 1/sqrt(fan_in) so activations keep their scale through the network; norm
    weights are 1 and biases 0.
    """
    g = torch.Generator(device).manual_seed(seed)
    out = {}
    for name, p in module.state_dict().items():
        if p.ndim >= 2:
            t = torch.randn(p.shape, generator=g, device=device) / (p[0].numel() ** 0.5)
        elif name.endswith("weight"):
            t = torch.ones(p.shape)
        else:
            t = torch.zeros(p.shape)
        out[name] = t.to(torch.float16).cpu().contiguous()
    return out


def checkpoint_state_dict(kind: str, text: dict[str, dict[str, torch.Tensor]],
                          vision: dict[str, torch.Tensor] | None = None, seed: int = 30, device: str = "cpu"
                          ) -> dict[str, torch.Tensor]:
    """A `kind` checkpoint (a key of UNETS) around the given encoders; needs ComfyUI imported and set up.

    `text` maps the host's encoder names ("clip_l", "clip_g", "clip_h") to transformers CLIPTextModel
    state dicts; `vision` is a transformers CLIPVisionModelWithProjection state dict (unCLIP).
    """
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = getattr(comfy.supported_models, MODEL_CONFIGS[kind])(dict(UNETS[kind]))
    with torch.device("meta"):  # shapes only: _seeded draws the values
        unet = UNetModel(**UNETS[kind], dtype=torch.float16, operations=comfy.ops.disable_weight_init)
        vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    sd = config.process_unet_state_dict_for_saving(_seeded(unet, seed, device))
    sd.update(config.process_vae_state_dict_for_saving(_seeded(vae, seed + 1, device)))
    clip = {f"{name}.transformer.{k}": v for name, tsd in text.items() for k, v in tsd.items()}
    sd.update(config.process_clip_state_dict_for_saving(clip))
    if vision is not None:
        sd.update(config.process_clip_vision_state_dict_for_saving(dict(vision)))
    return {k: v.contiguous() for k, v in sd.items()}


def write_sd15_checkpoint(path: str | os.PathLike, clip_l_file: str | os.PathLike) -> Path:
    """The small SD1.5 checkpoint, built in a child process that boots the host on the CPU (the test process
    may not have it imported)."""
    path = Path(path)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    subprocess.run([sys.executable, "-m", "harness.checkpoints", str(path), str(clip_l_file)], check=True,
                   cwd=Path(__file__).resolve().parent.parent, env=env)
    return path


def _main(path: str, clip_l_file: str) -> None:
    import tempfile

    from safetensors.torch import load_file

    from harness.fixtures import save_atomic
    from harness.host import boot_in_process

    with tempfile.TemporaryDirectory() as base:
        boot_in_process(Path(base))
        sd = checkpoint_state_dict("sd15-mini", {"clip_l": load_file(clip_l_file)})
        save_atomic(sd, path, {"fixture": "seeded random weights, not a trained model; small UNet, real CLIP-L "
                                          "and VAE"})


if __name__ == "__main__":
    _main(*sys.argv[1:3])
