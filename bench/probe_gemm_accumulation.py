"""How precisely, and how fast, FP8 matmuls of CLIP's shapes can accumulate on this GPU: cuBLAS's
`torch._scaled_mm` against the Triton kernels of quant/fp8_gemm.py (FP8 instruction, FP8 with each K block
promoted to fp32, FP8 codes widened to fp16) and an fp32 GEMM of the dequantized operands. Written to
OUT/gemm_accumulation.txt.

    python bench/probe_gemm_accumulation.py --out OUT

Operands: activations with a few outlier channels and weights of CLIP's scale, quantized per tensor to E4M3 as
the calibrated model does. Error: max |y - fp64| / max |fp64| over the same FP8 operands; flips: elements whose
next static FP8 rounding (scale amax / 448) differs from fp64's, per million. Time: median GPU time per call of
a CUDA graph of 20 calls (launch cost as inside the pack's captured encoder).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_attention import gpu_ms, load  # noqa: E402 - the pack's quant/ without ComfyUI; CUDA-graph timing

fp8_gemm = load("fp8_gemm")

FP8 = torch.float8_e4m3fn
TEXT = [(768, 768), (2304, 768), (3072, 768), (768, 3072)]  # CLIP-L: q/k/v as one, out_proj, fc1, fc2
VISION = [(1024, 1024), (4096, 1024), (1024, 4096)]  # ViT-L/14
CONFIGS = [(64, 64, 128, 4, 3), (64, 32, 128, 4, 3), (64, 128, 128, 4, 3), (32, 64, 128, 4, 3),
           (16, 64, 128, 4, 3), (16, 32, 128, 4, 4), (128, 128, 128, 8, 3), (128, 256, 128, 8, 3),
           (16, 32, 256, 4, 3), (16, 16, 128, 4, 4), (16, 16, 256, 2, 3), (32, 32, 128, 4, 4), (16, 32, 128, 2, 4),
           (32, 64, 256, 4, 3)]


def operands(m: int, n: int, k: int, dev: torch.device, seed: int):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(m, k, device=dev, generator=g)
    x[:, torch.randperm(k, device=dev, generator=g)[:6]] *= 30  # outlier channels, as real CLIPs have
    w = torch.randn(n, k, device=dev, generator=g) * 0.02
    sa, sb = x.abs().max() / 448, w.abs().max() / 448
    return (x / sa).to(FP8), (w / sb).to(FP8), sa.float().reshape(()), sb.float().reshape(())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--all-modes", action="store_true", help="also the FP8-instruction modes (first run)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    import triton
    lines = [f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}"]
    lines.append("shape m x n x k: impl error, flips/M, us per call (GPU time in a CUDA graph)")
    cases = [(m, n, k) for m in (77, 154, 616) for n, k in TEXT] + [(16 * 257, n, k) for n, k in VISION]
    for i, (m, n, k) in enumerate(cases):
        a, w, sa, sb = operands(m, n, k, dev, i)
        exact = (a.double() * sa.double()) @ (w.double() * sb.double()).t()
        big = exact.abs().max()
        s_next = float(big) / 448
        q_exact = (exact / s_next).clamp(-448, 448).float().to(FP8).float()

        def score(y):
            err = float((y.double() - exact).abs().max() / big)
            flips = float(((y / s_next).clamp(-448, 448).to(FP8).float() != q_exact).float().mean()) * 1e6
            return err, flips

        row = []
        impls = {
            "scaled_mm": lambda: torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32),
            "scaled_mm fast": lambda: torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32,
                                                       use_fast_accum=True),
        }
        af, wf = a.float() * sa, w.float() * sb
        impls["fp32 dequantized (no TF32)"] = lambda: F.linear(af, wf)
        for name, fn in impls.items():
            err, flips = score(fn())
            row.append(f"{name} {err:.1e} {flips:.0f}/M {gpu_ms(fn) * 1e3:.1f}us")
        for mode in (fp8_gemm.MODES if args.all_modes else ['fp16']):
            best = None
            for cfg in CONFIGS:
                if (m > 1024) != (cfg[0] >= 64 and cfg[1] >= 64):
                    continue
                try:
                    y = fp8_gemm.matmul(a, w, sa, sb, mode=mode, block=cfg)
                    err, flips = score(y)
                    t = gpu_ms(lambda: fp8_gemm.matmul(a, w, sa, sb, mode=mode, block=cfg))
                except Exception as e:  # noqa: BLE001 - a config the compiler refuses: skip it, say so
                    row.append(f"triton {mode} {cfg} failed: {type(e).__name__}: {str(e)[:120]}")
                    continue
                lines.append(f"    {m}x{n}x{k} triton {mode} {cfg}: {err:.1e} {flips:.0f}/M {t * 1e3:.1f}us")
                if best is None or t < best[0]:
                    best = (t, cfg, err, flips)
            if best:
                row.append(f"triton {mode} {best[2]:.1e} {best[3]:.0f}/M {best[0] * 1e3:.1f}us {best[1]}")
        cfg = fp8_gemm.block_for(m, n, k)
        if m <= fp8_gemm.MAX_ROWS:
            err, flips = score(fp8_gemm.matmul(a, w, sa, sb, block=cfg))
            t = gpu_ms(lambda: fp8_gemm.matmul(a, w, sa, sb, block=cfg))
            row.append(f"the pack's choice {cfg} {err:.1e} {flips:.0f}/M {t * 1e3:.1f}us")
        lines.append(f"{m}x{n}x{k}: " + "; ".join(row))
        print(lines[-1], flush=True)
    fusions(dev, lines)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gemm_accumulation.txt").write_text("\n".join(lines) + "\n")


def fusions(dev: torch.device, lines: list) -> None:
    """The launches the fused encoder makes on the GPU vs what it made before: q, k and v in one launch vs three
    cuBLAS FP8 GEMMs; fc1 with its bias, GELU and fc2's quantizer vs a cuBLAS FP8 GEMM and the fused kernel."""
    from types import SimpleNamespace

    fused = load("fp8_fused")
    lines.append("\nCLIP-L's fused launches, us per call (GPU time in a CUDA graph): before (cuBLAS) / now")
    for m in (77, 154, 231, 616):
        lins = []
        for i in range(3):
            a, w, sa, sb = operands(m, 768 if i < 2 else 3072, 768, dev, 100 + i)
            lins.append(SimpleNamespace(weight=w, input_scale=sa, weight_scale=sb,
                                        bias=torch.randn(w.shape[0], device=dev) * 0.1))
        qkv_out = torch.empty(3, m, 768, device=dev)
        y = torch.empty(m, 3072, device=dev)
        codes = torch.empty(m, 3072, device=dev, dtype=FP8)
        inv = torch.tensor(448 / 3.0, device=dev)

        def qkv_before():
            for i in range(3):
                torch._scaled_mm(a, lins[0].weight.t(), scale_a=sa, scale_b=lins[0].weight_scale,
                                 out_dtype=torch.float32, out=qkv_out[i])

        def fc1_before():
            torch._scaled_mm(a, lins[2].weight.t(), scale_a=sa, scale_b=lins[2].weight_scale, out_dtype=torch.float32,
                             out=y)
            fused.bias_act_quant(y, lins[2].bias, "quick_gelu", inv, codes=codes)

        t = [gpu_ms(f) * 1e3 for f in (
            qkv_before, lambda: fp8_gemm.matmul_projections(a, (lins[0], lins[0], lins[1]), qkv_out),
            fc1_before, lambda: fp8_gemm.matmul_act_quant(a, lins[2], "quick_gelu", inv, codes))]
        lines.append(f"  {m} rows: q/k/v {t[0]:.1f} / {t[1]:.1f}; fc1 + bias + GELU + quantize {t[2]:.1f} / "
                     f"{t[3]:.1f}")
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
