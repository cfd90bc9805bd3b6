"""CLIP vision (ViT-L/14) throughput and memory: stock ComfyUI's encode_image vs this pack's FP8 runtime.

    python bench/bench_vision_encode.py --comfy /path/to/ComfyUI --out bench/out-vision

Stock runs one batch size per fresh process (its GPU memory grows across calls made outside the executor);
the FP8 runtimes run every batch size in one process and report memory growth. Seeded random-weight ViT-L/14
at its real config. Writes results.json and results.md with ratios against stock.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_text_encode import (ROOT, boot, drop_cuda_graphs, eager_modelopt, gpu_weight_bytes,  # noqa: E402
                               load_pack, run_variants, write_results)

BATCHES = (1, 16, 64)


def fixture(path: Path) -> Path:
    if not path.exists():
        sys.path.insert(0, str(ROOT))
        from harness.fixtures import write_clip_vision
        write_clip_vision(path)
    return path


def images(n: int):
    sys.path.insert(0, str(ROOT))
    from quant.images import synthetic_images
    return synthetic_images(n, seed=31)[0]


def time_batch(cv, batch, n: int, warm: int = 3) -> dict:
    import torch

    for _ in range(warm):
        cv.encode_image(batch, crop=True)
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        cv.encode_image(batch, crop=True)
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(ts)
    return {"median_ms": med, "images_per_s": batch.shape[0] / med * 1e3, "all_ms": [round(t, 2) for t in ts],
            **gpu_state()}


def gpu_state() -> dict:
    """The GPU's SM clock and power draw right after a timing (NVML): a slow batch next to a low clock is the
    machine, not the code."""
    import torch

    try:
        return {"sm_clock_mhz": torch.cuda.clock_rate(), "power_w": torch.cuda.power_draw() / 1e3}
    except Exception as e:  # NVML missing: timings stand alone
        return {"gpu_state_error": f"{type(e).__name__}: {e}"}


def kernel_profile(cv, batch, calls: int = 3) -> str:
    """GPU kernels of `calls` encodes (CUDA-graph replays included), by total GPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cv.encode_image(batch, crop=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            cv.encode_image(batch, crop=True)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)


def memory(cv, batch) -> dict:
    import comfy.model_management as mm
    import torch

    mm.unload_all_models()
    drop_cuda_graphs(cv.patcher)
    mm.soft_empty_cache(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    mm.load_models_gpu([cv.patcher], force_full_load=True)
    cv.encode_image(batch[:1], crop=True)  # lazily placed weights (the pack's FP8 tower) count too
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() - base
    weights = gpu_weight_bytes(cv.model)
    cv.encode_image(batch, crop=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    cv.encode_image(batch, crop=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for _ in range(20):
        cv.encode_image(batch, crop=True)
    torch.cuda.synchronize()
    return {"weights_on_gpu_mb": weights / 2**20, "resident_mb": resident / 2**20, "peak_mb": peak / 2**20,
            "growth_over_20_calls_mb": (torch.cuda.memory_allocated() - before) / 2**20}


def run_variant(args) -> dict:
    import torch

    boot(Path(args.comfy), ["--gpu-only"] if args.gpu_only else [])
    import comfy.clip_vision

    out = {"variant": args.variant, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "gpu_only": args.gpu_only}
    cv = comfy.clip_vision.load(str(fixture(Path(args.fixture))))
    imgs = images(max(BATCHES))
    n = 20
    with torch.inference_mode():
        if args.variant.startswith("stock-b"):
            b = int(args.variant[len("stock-b"):])
            out["batch"] = b
            out["timing"] = time_batch(cv, imgs[:b], n)
            if args.profile_batch == b:
                (Path(args.out) / f"profile-stock-b{b}.txt").write_text(
                    f"stock ComfyUI, batch {b}\n{kernel_profile(cv, imgs[:b])}")
            out["memory"] = memory(cv, imgs[:b])
            return out
        pack = load_pack()
        from comfyui_fp8_clip.quant import runtime, vision
        from comfyui_fp8_clip.quant.recipe import Recipe

        eager_modelopt()
        t0 = time.perf_counter()
        fake, report = vision.quantize_clip_vision(cv, None, Recipe(keep=vision.DEFAULT_VISION_KEEP,
                                                                    fp8_embedding=False))
        out["calibration_s"] = time.perf_counter() - t0
        out["report"] = report.text()
        test = images(16)
        ref_e = vision.embed(cv, test)[0]
        fq_e = vision.embed(fake, test)[0]
        fq_e1 = vision.embed(fake, test, batch=1)[0]  # one image a call: 257 rows, the fp32-accumulating matmul
        out["runtimes"] = {}
        # (executor, activations, kernels between the matmuls); "plan": what `auto` picks on this machine; the
        # rest forced (torch.compile's kernels without CUDA graphs under cudaMallocAsync, as the plan runs them)
        variants = [("plan", "", ""), ("cuda_graph", "float16", "fused"), ("cuda_graph", "float32", "fused"),
                    ("cuda_graph", "float16", "torch"), ("compiled", "float16", "torch")]
        if args.quick:
            variants = variants[:1]
        out["allocator"] = torch.cuda.get_allocator_backend()
        async_alloc = out["allocator"] == "cudaMallocAsync"
        for executor, act, kernels in variants:
            name = f"fp8 scaled_mm, {executor}, {'fused' if kernels == 'fused' else 'unfused'} kernels, {act} activations"
            res: dict = {}
            try:
                fp8, plan = runtime.to_fp8_runtime(fake, "fp8")
                if executor == "plan":
                    name = f"fp8 auto: {plan.reason}"
                for m, _r in pack.quant.artifact.quantized_towers(fp8).values() if executor != "plan" else ():
                    m.configure(lambda d, e=executor, a=act, k=kernels: runtime.Plan(
                        "fp8", "scaled_mm", e, a, "bench", k, graphs=not async_alloc or e != "compiled"))
                t0 = time.perf_counter()
                got = vision.embed(fp8, test)[0]
                res["first_call_s"] = time.perf_counter() - t0
                cos = torch.nn.functional.cosine_similarity
                res["cos_vs_fakequant_min"] = float(cos(fq_e, got, dim=-1).min())
                res["cos_vs_original_min"] = float(cos(ref_e, got, dim=-1).min())
                res["cos_vs_fakequant_b1_min"] = float(cos(fq_e1, vision.embed(fp8, test, batch=1)[0], dim=-1).min())
                res["timing"] = {str(b): time_batch(fp8, imgs[:b], n) for b in BATCHES}
                if args.profile_batch:
                    slug = "".join(c if c.isalnum() else "-" for c in name)[:60]
                    try:
                        listing = kernel_profile(fp8, imgs[:args.profile_batch])
                    except Exception as e:  # the profiler failing must not lose the timings
                        listing = f"profiler failed: {type(e).__name__}: {e}"
                    (Path(args.out) / f"profile-{slug}.txt").write_text(f"{name}, batch {args.profile_batch}\n{listing}")
                res["memory"] = memory(fp8, imgs[:64])
            except Exception as e:  # one variant failing must not lose the others
                import traceback
                res["error"] = f"{type(e).__name__}: {e}"
                res["traceback"] = traceback.format_exc()[-3000:]
            out["runtimes"][name] = res
            print(json.dumps({name: {k: v for k, v in res.items() if k != "traceback"}}, indent=1), flush=True)
        out["fake_quant_report_cos_check"] = float(torch.nn.functional.cosine_similarity(ref_e, fq_e, dim=-1).min())
    return out


def table(results: list[dict]) -> str:
    stock = {r["batch"]: r for r in results if r["variant"].startswith("stock-b")}
    dev = next(iter(stock.values()))["device"] if stock else results[0]["device"]
    spread: list[str] = []
    gpu_only = " ComfyUI started with --gpu-only (outputs stay on the GPU)." if results and results[0].get("gpu_only") else ""
    lines = [f"Device: {dev}.{gpu_only} Median ms per encode_image call (images/s; ratio = this / stock throughput).", "",
             "| variant | " + " | ".join(f"batch {b}" for b in BATCHES) + " | weights on GPU MB | allocated after a "
             "batch-1 call MB | peak MB (b64) | growth over 20 calls MB |", "|---|" + "---|" * (len(BATCHES) + 4)]
    if stock:
        cells = [f"{stock[b]['timing']['median_ms']:.1f} ({stock[b]['timing']['images_per_s']:.0f}/s)" if b in stock
                 else "not run" for b in BATCHES]
        m = stock[max(BATCHES)]["memory"]
        lines.append("| stock ComfyUI (fp16 weights, fp32 compute; fresh process per batch) | " + " | ".join(cells) +
                     f" | {m['weights_on_gpu_mb']:.0f} | {m['resident_mb']:.0f} | {m['peak_mb']:.0f} | "
                     + ", ".join(f"b{b}: {stock[b]['memory']['growth_over_20_calls_mb']:.0f}" for b in stock) + " |")
    for r in results:
        for name, res in r.get("runtimes", {}).items():
            if "error" in res:
                lines.append(f"| pack: {name} | FAILED: {res['error'][:80]} |")
                continue
            cells = []
            for b in BATCHES:
                t = res["timing"][str(b)]
                ratio = t["images_per_s"] / stock[b]["timing"]["images_per_s"] if b in stock else float("nan")
                cells.append(f"{t['median_ms']:.1f} ({t['images_per_s']:.0f}/s, {ratio:.2f}x)")
            m = res["memory"]
            sm = stock[max(BATCHES)]["memory"]["weights_on_gpu_mb"] if stock else float("nan")
            lines.append(f"| pack: {name} | " + " | ".join(cells) +
                         f" | {m['weights_on_gpu_mb']:.0f} ({m['weights_on_gpu_mb'] / sm:.2f}x) | {m['resident_mb']:.0f} |"
                         f" {m['peak_mb']:.0f} |"
                         f" {m['growth_over_20_calls_mb']:.1f} |")
        for name, res in r.get("runtimes", {}).items():
            if "error" not in res:
                lines.append(f"\n{name}: image_embeds cosine vs the calibrated Q->DQ model {res['cos_vs_fakequant_min']:.5f}"
                             f" (worst of 16, batches of 8; one image a call: "
                             f"{res.get('cos_vs_fakequant_b1_min', float('nan')):.5f}), vs the original "
                             f"{res['cos_vs_original_min']:.5f}; first call "
                             f"{res['first_call_s']:.1f} s")
        spreads = [(name, res["timing"]) for name, res in r.get("runtimes", {}).items() if "error" not in res]
        if r["variant"].startswith("stock-b"):
            spreads = [("stock", {str(r["batch"]): r["timing"]})]
        for name, timing in spreads:
            for b, t in timing.items():
                if "all_ms" in t:
                    spread.append(f"- {name}, batch {b}: per call min / median / max {min(t['all_ms']):.1f} / "
                                  f"{t['median_ms']:.1f} / {max(t['all_ms']):.1f} ms; after it SM clock "
                                  f"{t.get('sm_clock_mhz', '?')} MHz, {t.get('power_w', float('nan')):.0f} W")
        if "report" in r:
            lines.append(f"\nCalibration (32 built-in images, on the GPU): {r['calibration_s']:.1f} s\n\n```\n{r['report']}\n```")
    if spread:
        lines += ["", "Spread of the timed calls and the GPU's state:", *spread]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out-vision"))
    ap.add_argument("--fixture", default=str(ROOT / ".cache" / "bench-clip-vit-l.safetensors"))
    ap.add_argument("--variant")
    ap.add_argument("--variants", default=",".join([f"stock-b{b}" for b in BATCHES] + ["pack"]))
    ap.add_argument("--quick", action="store_true", help="the pack's default runtime only")
    ap.add_argument("--gpu-only", action="store_true",
                    help="start ComfyUI with --gpu-only: encode_image's outputs stay on the GPU (no copies to the CPU)")
    ap.add_argument("--profile-batch", type=int, default=0,
                    help="also write each FP8 variant's GPU kernels at this batch size to OUT/profile-*.txt")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        (out / f"{args.variant}.json").write_text(json.dumps(run_variant(args), indent=1))
        return 0
    fixture(Path(args.fixture))
    extra = ((["--quick"] if args.quick else []) + (["--gpu-only"] if args.gpu_only else [])
             + (["--profile-batch", str(args.profile_batch)] if args.profile_batch else []))
    write_results(out, table(run_variants(__file__, args, extra)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
