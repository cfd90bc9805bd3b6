"""GPU time and accuracy of the text attention's options (77 tokens, 12 heads of 64, fp32 inputs), each
ending in out_proj's FP8 codes: the host path (q/k/v-bias kernel, PyTorch SDPA, quantize kernel) vs
fp8_fused's attention kernel in several configurations. CUDA-graph replays, so launch cost is left out.

    python bench/probe_attention.py [--out OUT]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location("fp8clip_probe", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    sys.modules.setdefault("fp8clip_probe", importlib.util.module_from_spec(spec))
    return importlib.import_module(f"fp8clip_probe.quant.{name}")


def gpu_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    ts = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / reps)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    fused, ops, encoder = load("fp8_fused"), load("fp8_ops"), load("fp8_encoder")
    dev = torch.device("cuda")
    lines = [f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}; GPU us per layer's attention "
             "(median of CUDA-graph replays); FP8 codes that differ from fp64 attention's, per million"]
    for b in (1, 2, 8):
        t, heads, width = 77, 12, 768
        g = torch.Generator(device=dev).manual_seed(b)
        q, k, v = (torch.randn(b * t, width, device=dev, generator=g) * 2 for _ in range(3))
        biases = tuple(torch.randn(width, device=dev, generator=g) for _ in range(3))
        mask = torch.full((t, t), -torch.finfo(torch.float32).max, device=dev).triu_(1)
        inv = torch.tensor(448 / 4.0, device=dev)
        qh, kh, vh = ((z + bb).double().view(b, t, heads, -1).transpose(1, 2) for z, bb in zip((q, k, v), biases))
        exact = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.double())
        ref = ops.quantize_input(exact.transpose(1, 2).reshape(b * t, width).float(), inv).view(torch.uint8)

        def host():  # last: its bias kernel adds in place (fresh matmul outputs in the encoder), so q, k, v change
            qq, kk, vv = fused.qkv_bias(q, k, v, biases, torch.float32)
            o = encoder.sdpa_attention(qq.view(b, t, width), kk.view(b, t, width), vv.view(b, t, width), heads, mask)
            return fused.quantize(o, inv)

        variants = {}
        for prec in ("tf32x3", "ieee"):
            for bm in (16, 32):
                for nw in (2, 4):
                    variants[f"attention kernel {prec}, BLOCK_M {bm}, {nw} warps"] = (
                        lambda p=prec, m=bm, w=nw: fused.attention_quant(q, k, v, biases, (b, t, width), heads, mask,
                                                                          inv, block_m=m, precision=p, num_warps=w))
        variants["host: bias kernel + SDPA (fp32) + quantize kernel"] = host
        for name, fn in variants.items():
            try:
                wrong = int((fn().view(torch.uint8) != ref).sum()) * 1e6 / ref.numel()
                lines.append(f"batch {b}: {name}: {gpu_ms(fn) * 1e3:.1f} us, {wrong:.0f}/M codes off fp64")
            except Exception as e:  # noqa: BLE001
                lines.append(f"batch {b}: {name}: FAILED {type(e).__name__}: {str(e)[:200]}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "attention_probe.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
