"""A seeded SD1.5 checkpoint that ComfyUI's CheckpointLoaderSimple takes, to run whole example workflows.

The CLIP-L is the full-size text-encoder fixture (what the pack quantizes); the VAE has the real SD VAE
architecture; the UNet is a small one that ComfyUI still detects as SD1.5 (one resolution level, 320
channels, 768-wide cross-attention), so a whole text-to-image graph samples in seconds on a CPU. Weights are
seeded random: the images are noise, but the same noise for the same conditioning, which is what a workflow
test compares. Built with the host's own modules, so its keys are the ones the host's loader reads.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

# ComfyUI's unet config for SD1.5, shrunk to one level; model_channels, context_dim, heads and the conv
# transformer are what ComfyUI's SD15 detection checks.
MINI_SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
                      transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
                      channel_mult=[1], context_dim=768, num_heads=8,
                      num_head_channels=-1, use_linear_in_transformer=False, use_spatial_transformer=True,
                      legacy=False, adm_in_channels=None, use_temporal_resblock=False,
                      use_temporal_attention=False)
SD_VAE = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
          'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


def _seeded(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Fill every parameter deterministically (host modules are built uninitialized) and return fp16 weights.

    Matrices and kernels get std 1/sqrt(fan_in) so activations keep their scale through the network; norm
    weights are 1 and biases 0.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.state_dict().items():
        if p.ndim >= 2:
            t = torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5)
        elif name.endswith("weight"):
            t = torch.ones(p.shape)
        else:
            t = torch.zeros(p.shape)
        out[name] = t.to(torch.float16).contiguous()
    return out


def sd15_state_dict(clip_l_file: str | os.PathLike, seed: int = 30) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: needs ComfyUI importable (`comfy` on sys.path, arguments parsed)."""
    from safetensors.torch import load_file

    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**MINI_SD15_UNET, dtype=torch.float32, device="cpu",
                     operations=comfy.ops.disable_weight_init)
    vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    sd = {"model.diffusion_model." + k: v for k, v in _seeded(unet, seed).items()}
    sd.update({"first_stage_model." + k: v for k, v in _seeded(vae, seed + 1).items()})
    # SD1.5 checkpoints carry the HF CLIP text model without its projection.
    sd.update({"cond_stage_model.transformer." + k: v for k, v in load_file(str(clip_l_file)).items()
               if k.startswith("text_model.")})
    return sd


def write_sd15_checkpoint(path: str | os.PathLike, clip_l_file: str | os.PathLike) -> Path:
    """Build the checkpoint in a child process that boots the host on the CPU (the test process may not)."""
    path = Path(path)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    subprocess.run([sys.executable, "-m", "harness.checkpoints", str(path), str(clip_l_file)], check=True,
                   cwd=Path(__file__).resolve().parent.parent, env=env)
    return path


def _main(path: str, clip_l_file: str) -> None:
    import tempfile

    from harness.fixtures import save_atomic
    from harness.host import boot_in_process

    with tempfile.TemporaryDirectory() as base:
        boot_in_process(Path(base))
        save_atomic(sd15_state_dict(clip_l_file), path,
                    {"fixture": "seeded random weights, not a trained model; mini UNet, SD1.5 CLIP-L and VAE"})


if __name__ == "__main__":
    _main(*sys.argv[1:3])
