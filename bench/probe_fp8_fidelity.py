"""Why the GPU FP8 path differs from the calibrated Q->DQ model it came from, and how far that model agrees
with itself: a diagnosis of the fidelity target (cosine >= 0.999), written to OUT/fidelity_probe.txt.

    python bench/probe_fp8_fidelity.py --comfy /path/to/ComfyUI --out OUT

On the held-out prompts, at the transformer (same input embeddings for every variant), mean per-token cosine
of the last hidden state against the Q->DQ model on the GPU at batch 1:
- the Q->DQ model itself at batch 2 (another cuBLAS kernel, same math) and on the CPU: its own reproducibility;
- the FP8 runtime: the fused Triton kernels between the matmuls and quant/fp8_gemm.py's exactly accumulating
  matmul (the default), the same on cuBLAS's FP8 GEMM, and unfused
  (CUDA graph and eager; and with the input multiplier of file format 1), scaled_mm with fast accumulation,
  dequantized fp32 GEMMs.
And for single GEMMs, the error of each arithmetic against an fp64 reference of the same FP8 operands.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_text_encode as b  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fixture", default=str(b.ROOT / ".cache" / "bench-clip_l.safetensors"))
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--calibration-prompts", type=int, default=64)
    ap.add_argument("--stress", action="store_true", help="the fixture with outlier channels, as real CLIPs have")
    args = ap.parse_args()
    b.boot(Path(args.comfy), [])
    import torch
    import torch.nn.functional as F

    lines = [f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
             f"{', CLIP-L with outlier channels' if args.stress else ''}"]
    fixture = Path(args.fixture)
    if args.stress:
        fixture = fixture.with_name("bench-clip_l-outliers.safetensors")
    clip = b.load_fixture_clip(fixture, stress=args.stress)
    b.load_pack()  # importable as comfyui_fp8_clip from here on
    from comfyui_fp8_clip.quant import calibrate, runtime
    from comfyui_fp8_clip.quant.fp8_ops import FP8Linear, quantize_input
    from comfyui_fp8_clip.quant.prompts import CALIBRATION_PROMPTS, HELD_OUT_PROMPTS
    from comfyui_fp8_clip.quant.proxy import unwrap
    from comfyui_fp8_clip.quant.recipe import Recipe

    b.eager_modelopt()
    dev = torch.device(clip.patcher.load_device)
    with torch.inference_mode():
        from comfyui_fp8_clip.quant import fp8_fused
        xs = torch.cat([torch.randn(1 << 20, device=dev) * s for s in (1e-4, 1e-2, 1.0, 100.0, 1000.0)])
        one = torch.tensor(1.0, device=dev)
        differ = int((fp8_fused.quantize(xs[None], one).view(torch.uint8)
                      != quantize_input(xs[None], one).view(torch.uint8)).sum())
        lines.append(f"Fused kernels' FP8 rounding vs PyTorch's cast, {xs.numel()} values from 1e-4 to 1e3 (with "
                     f"subnormals and saturation): {differ} codes differ")
        fake, _ = calibrate.quantize_clip(clip, list(CALIBRATION_PROMPTS)[: args.calibration_prompts], Recipe())
        held = list(HELD_OUT_PROMPTS)[: args.prompts]
        calibrate.encode(fake, held[0])
        fq = unwrap(fake.patcher.get_model_object("clip_l.transformer"))
        fq_cpu = copy.deepcopy(fq).cpu()
        sd1 = clip.cond_stage_model.clip_l

        def inputs(p: str):
            ids = [[t[0] for t in clip.tokenize(p)["l"][0]]]
            e, _, n, _ = sd1.process_tokens(ids, dev)
            return e.float(), n

        data = [inputs(p) for p in held]

        def run(model, e, n):
            return model(None, None, embeds=e, num_tokens=n, intermediate_output=None,
                         final_layer_norm_intermediate=True, dtype=torch.float32)[0].float()

        def cos(a, b_):
            return float(F.cosine_similarity(a.flatten(0, -2).cpu(), b_.flatten(0, -2).cpu(), dim=-1).mean())

        ref = [run(fq, e, n) for e, n in data]
        variants = {}
        variants["Q->DQ model, batch 2 (row 0)"] = [
            run(fq, torch.cat([e, data[(i + 1) % len(data)][0]]), n + data[(i + 1) % len(data)][1])[0:1]
            for i, (e, n) in enumerate(data)]
        variants["Q->DQ model on the CPU"] = [run(fq_cpu, e.cpu(), n) for e, n in data]
        del fq_cpu
        for matmul, executor, fast, derived_inv, kernels in [
                ("scaled_mm", "cuda_graph", False, False, "fused"),
                ("scaled_mm", "cuda_graph", False, False, "torch"), ("scaled_mm", "cuda_graph", False, True, "torch"),
                ("scaled_mm", "eager", False, False, "torch"), ("scaled_mm", "eager", True, False, "torch"),
                ("dequant", "eager", False, False, "torch"), ("dequant", "cuda_graph", False, False, "torch")]:
            fp8, _ = runtime.to_fp8_runtime(fake, "fp8")
            impl = unwrap(fp8.patcher.get_model_object("clip_l.transformer"))
            if derived_inv:  # what format 1 did: 1 / input_scale, an ulp off ModelOpt's 448 / amax for some layers
                for m in impl.modules():
                    if isinstance(m, FP8Linear) and m.input_scale is not None:
                        m.input_scale_inv.copy_(1.0 / m.input_scale)
            impl.configure(lambda d, m=matmul, e=executor, k=kernels: runtime.Plan("fp8", m, e, "float32", "probe", k))
            if fast:
                orig = torch._scaled_mm
                torch._scaled_mm = lambda *a, **k: orig(*a, use_fast_accum=True, **k)
            try:
                variants[f"FP8 runtime: {matmul}, {executor}, {'fused kernels, exact matmul' if impl.fused else 'unfused kernels'}"
                         f"{', fast accumulation' if fast else ''}"
                         f"{', 1/input_scale as in format 1' if derived_inv else ''}"] = [
                    run(impl, e, n) for e, n in data]
            finally:
                if fast:
                    torch._scaled_mm = orig
            if matmul == "scaled_mm" and executor == "eager" and not fast:
                gemm_errors(impl, fq, data[0], lines, quantize_input, FP8Linear)
            del fp8, impl
        from comfyui_fp8_clip.quant import fp8_gemm
        exact_for = fp8_gemm.exact_for
        fp8_gemm.exact_for = lambda *a: False  # the fused plan on cuBLAS's FP8 GEMM, as before fp8_gemm.py
        try:
            fp8, _ = runtime.to_fp8_runtime(fake, "fp8")
            impl = unwrap(fp8.patcher.get_model_object("clip_l.transformer"))
            impl.configure(lambda d: runtime.Plan("fp8", "scaled_mm", "cuda_graph", "float32", "probe", "fused"))
            variants["FP8 runtime: scaled_mm, cuda_graph, fused kernels, cuBLAS FP8 GEMM in them"] = [
                run(impl, e, n) for e, n in data]
            del fp8, impl
        finally:
            fp8_gemm.exact_for = exact_for
        lines.append("\nMean per-token cosine of the last hidden state vs the Q->DQ model on the GPU, batch 1 "
                     f"({len(held)} held-out prompts): worst / mean")
        for name, outs in variants.items():
            cs = [cos(r, o) for r, o in zip(ref, outs)]
            lines.append(f"  {name}: {min(cs):.5f} / {statistics.mean(cs):.5f}")
    text = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"fidelity_probe{'_stress' if args.stress else ''}.txt").write_text(text)
    print(text)


def gemm_errors(impl, fq, sample, lines, quantize_input, FP8Linear) -> None:
    """Each FP8 GEMM of layers 0 and 11 on its real input: error vs fp64 on the same FP8 operands."""
    import torch
    import torch.nn.functional as F
    from comfyui_fp8_clip.quant import fp8_gemm

    captured = {}

    def keep(name):
        def hook(mod, args, out):
            captured.setdefault(name, args[0].detach().clone())  # returns None: the output stays
        return hook

    hooks = [m.register_forward_hook(keep(k))
             for k, m in impl.named_modules() if isinstance(m, FP8Linear) and (".0." in k or ".11." in k)]
    impl(None, None, embeds=sample[0], num_tokens=sample[1], intermediate_output=None, dtype=torch.float32)
    for h in hooks:
        h.remove()
    lines.append("\nSingle GEMMs on their real input, relative error vs fp64 of the same FP8 operands "
                 "(max |err| / max |y|; elements whose next FP8 rounding differs from fp64's, per million)")
    for k, x in captured.items():
        m = dict(impl.named_modules())[k]
        if m.input_scale is None:
            continue
        x2 = x.reshape(-1, x.shape[-1]).float()
        qx = quantize_input(x2, m.input_scale_inv)
        sa, sb = m.input_scale, m.weight_scale
        exact = (qx.double() * sa.double()) @ (m.weight.double() * sb.double()).t() + m.bias.double()
        outs = {
            "scaled_mm": torch._scaled_mm(qx, m.weight.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32) + m.bias,
            "scaled_mm fast accum": torch._scaled_mm(qx, m.weight.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32,
                                                     use_fast_accum=True) + m.bias,
            "fp32 GEMM of dequantized": F.linear(qx.float() * sa, m.weight.float() * sb, m.bias),
            "Triton, FP8 codes on fp16 tensor cores": fp8_gemm.matmul(qx, m.weight, sa, sb) + m.bias,
        }
        scale = exact.abs().max()
        # how often a downstream static FP8 quantization (scale ~ amax/448) would round differently
        s_next = float(exact.abs().max()) / 448
        q_exact = (exact.float() / s_next).clamp(-448, 448).to(torch.float8_e4m3fn).float()
        parts = []
        for name, y in outs.items():
            err = float((y.double() - exact).abs().max() / scale)
            flips = float(((y / s_next).clamp(-448, 448).to(torch.float8_e4m3fn).float() != q_exact).float().mean()) * 1e6
            parts.append(f"{name} {err:.1e}, {flips:.0f}/M")
        lines.append(f"  {k}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
