"""Text-encoder speed and memory: stock ComfyUI's CLIP encode path vs this pack's FP8 runtime, side by side.

    python bench/bench_text_encode.py --comfy /path/to/ComfyUI --out bench/out [--quick] [--family sdxl|sd3|sd3-t5|flux]

Each variant runs in a fresh process (stock ComfyUI's GPU memory grows across calls made outside its
executor), through ComfyUI's own CLIPTextEncode path (tokenize + encode_from_tokens_scheduled), on a
seeded random-weight CLIP-L at the real ViT-L/14 text config (`--family sdxl`: SDXL's CLIP-L + CLIP-G pair,
loaded as DualCLIPLoader does; `--family sd3`: the same two files as SD3's CLIP pair, without T5; the fused and
unfused FP8 plans only; `--family sd3-t5`: with a seeded T5-XXL at its real config, as TripleCLIPLoader loads
the three; `--family flux`: CLIP-L and that T5-XXL, as DualCLIPLoader's `flux` loads them; these two the default
FP8 plan only: the T5 passes through unquantized). Writes results.json and a markdown table with
ratios against stock. Absolute times are only meaningful from a GPU run; see bench/results/.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    # name: list of prompts encoded one after another (one CLIPTextEncode each)
    "1 prompt (1x77)": ["a watercolor painting of a lighthouse on a cliff at sunrise, soft light, seagulls"],
    "positive + negative (2 encodes)": ["a watercolor painting of a lighthouse on a cliff at sunrise, soft light",
                                        "blurry, low quality, watermark, text"],
    "weighted prompt (2 rows)": ["a (red:1.3) lighthouse on a (stormy:0.8) sea"],
    "long prompt (3x77)": [", ".join(f"intricate detail number {i}" for i in range(36))],
    "8 rows of 77": [", ".join(f"intricate detail number {i}" for i in range(100))],
}


def boot(comfy: Path, extra: list[str], dynamic_vram: bool = False):
    sys.path.insert(0, str(comfy))
    sys.argv = ["main.py", *extra]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    if dynamic_vram:  # what ComfyUI v0.29's main.py does by default on NVIDIA GPUs
        import comfy_aimdo.control
        try:
            comfy_aimdo.control.init(simple_vram_headroom=None)
        except TypeError:
            comfy_aimdo.control.init()
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    if dynamic_vram:
        import comfy.memory_management
        import comfy.model_patcher
        devices = comfy.model_management.get_all_torch_devices()
        try:
            ok = comfy_aimdo.control.init_devices((d.index, 0) for d in devices)
        except TypeError:
            ok = comfy_aimdo.control.init_devices(d.index for d in devices)
        if not ok:
            raise RuntimeError("comfy-aimdo did not initialise: dynamic VRAM unavailable")
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True


def load_pack():
    import importlib.util

    spec = importlib.util.spec_from_file_location("comfyui_fp8_clip", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_fp8_clip"] = mod
    spec.loader.exec_module(mod)
    return mod


def fixture(path: Path, stress: bool = False, family: str = "sd15") -> list[Path]:
    """The seeded CLIP-L file at `path` (written on first use; `stress`: the one with outlier channels) and the
    family's other encoders beside it (SDXL's CLIP-G, T5-XXL), in the order the family's loader takes them."""
    sys.path.insert(0, str(ROOT))
    from harness.fixtures import write_clip_g, write_clip_l
    if not path.exists():
        write_clip_l(path, stress=stress)
    g, t5 = path.with_name("bench-clip_g.safetensors"), path.with_name("bench-t5xxl.safetensors")
    files = {"sd15": [path], "flux": [path, t5], "sd3-t5": [path, g, t5]}.get(family, [path, g])
    if g in files and not g.exists():
        write_clip_g(g)
    if t5 in files and not t5.exists():
        write_t5_xxl(t5)
    return files


def t5_xxl_shapes(layers: int = 24, d: int = 4096, inner: int = 4096, ff: int = 10240, vocab: int = 32128
                  ) -> dict[str, tuple[int, ...]]:
    """T5-XXL's encoder tensors as ComfyUI reads them (comfy/text_encoders/t5_config_xxl.json)."""
    shapes: dict[str, tuple[int, ...]] = {"shared.weight": (vocab, d), "encoder.final_layer_norm.weight": (d,),
                                          "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                                              (32, inner // 64)}
    for i in range(layers):
        b = f"encoder.block.{i}.layer"
        shapes.update({f"{b}.0.SelfAttention.{n}.weight": (inner, d) if n != "o" else (d, inner) for n in "qkvo"})
        shapes.update({f"{b}.1.DenseReluDense.wi_0.weight": (ff, d), f"{b}.1.DenseReluDense.wi_1.weight": (ff, d),
                       f"{b}.1.DenseReluDense.wo.weight": (d, ff), f"{b}.0.layer_norm.weight": (d,),
                       f"{b}.1.layer_norm.weight": (d,)})
    return shapes


def write_t5_xxl(path: Path, seed: int = 30) -> Path:
    """T5-XXL's encoder (4.7B parameters) with seeded random fp16 weights (a 9.5 GB file: made on the device
    machine only, drawn on its GPU: a minute less than on the CPU)."""
    import torch
    from harness.fixtures import save_atomic

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(dev).manual_seed(seed)
    sd = {k: torch.ones(s, dtype=torch.float16) if "layer_norm" in k
          else (torch.randn(s, generator=g, device=dev) * 0.02).half().cpu() for k, s in t5_xxl_shapes().items()}
    return save_atomic(sd, path, {"fixture": "seeded random weights, not a trained model", "seed": str(seed)})


def load_fixture_clip(path: Path, stress: bool = False, family: str = "sd15"):
    import comfy.sd

    clip_type = {"sd3": comfy.sd.CLIPType.SD3, "sd3-t5": comfy.sd.CLIPType.SD3,
                 "flux": comfy.sd.CLIPType.FLUX}.get(family, comfy.sd.CLIPType.STABLE_DIFFUSION)
    return comfy.sd.load_clip(ckpt_paths=[str(f) for f in fixture(path, stress, family)], clip_type=clip_type)


def eager_modelopt() -> None:
    """ModelOpt's eager FP8 formula for calibration: no CUDA-extension JIT build or Triton kernel on the device."""
    import modelopt.torch.quantization.tensor_quant as tq

    tq.get_cuda_ext_fp8 = lambda *a, **k: None
    tq.DISABLE_TRITON_KERNEL = True


def clip_text_encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))  # what CLIPTextEncode runs


def time_case(clip, prompts, n: int, warm: int = 5) -> dict:
    import torch

    for _ in range(warm):
        for p in prompts:
            clip_text_encode(clip, p)
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        for p in prompts:
            clip_text_encode(clip, p)
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "p90_ms": sorted(ts)[int(0.9 * len(ts))]}


def gpu_weight_bytes(model) -> int:
    """Bytes of weights on the GPU: the model's parameters and buffers, plus the FP8 towers the pack keeps
    outside ComfyUI's module tree (quant/proxy.py)."""
    seen, total = set(), 0
    for m in model.modules():
        for root in (m, m.__dict__.get("impl")):
            if root is None:
                continue
            for t in [*root.parameters(recurse=root is not m), *root.buffers(recurse=root is not m)]:
                if t.is_cuda and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


def drop_cuda_graphs(patcher) -> None:
    """Free the CUDA graphs (and their memory pools) the pack's FP8 towers captured earlier in this process:
    they would be freed when the tower is placed again, which would hide that much of what an encode allocates.
    The towers are found among the patcher's object patches (they are patched out after an unload)."""
    for obj in patcher.object_patches.values():
        impl = getattr(obj, "__dict__", {}).get("impl")
        if hasattr(impl, "free_device_memory"):
            impl.free_device_memory()


def memory(clip, prompts) -> dict:
    """Memory after loading this CLIP alone and encoding once: the weights on the GPU, and all that stays
    allocated (weights that load lazily, as dynamic VRAM's and the pack's FP8 towers do, and the CUDA graphs'
    memory pool included); peak during an encode; growth over 50 encodes."""
    import comfy.model_management as mm
    import torch

    mm.unload_all_models()
    drop_cuda_graphs(clip.patcher)
    mm.soft_empty_cache(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    mm.load_models_gpu([clip.patcher], force_full_load=True)
    clip_text_encode(clip, prompts[0])
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated() - base
    weights = gpu_weight_bytes(clip.cond_stage_model)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    clip_text_encode(clip, prompts[0])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for _ in range(50):
        clip_text_encode(clip, prompts[0])
    torch.cuda.synchronize()
    return {"weights_on_gpu_mb": weights / 2**20, "resident_mb": resident / 2**20, "peak_during_encode_mb": peak / 2**20,
            "growth_over_50_encodes_mb": (torch.cuda.memory_allocated() - before) / 2**20}


def run_variant(args) -> dict:
    import torch

    extra = []
    if args.variant == "stock-fp8":
        extra.append("--fp8_e4m3fn-text-enc")
    if args.gpu_only:
        extra.append("--gpu-only")
    boot(Path(args.comfy), extra, args.dynamic_vram)

    out = {"variant": args.variant, "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "dynamic_vram": args.dynamic_vram, "gpu_only": args.gpu_only,
           "allocator": torch.cuda.get_allocator_backend()}
    clip = load_fixture_clip(Path(args.fixture), family=args.family)
    out["patcher"] = type(clip.patcher).__name__
    out["family"] = args.family
    n = 10 if args.quick else 40
    with torch.inference_mode():
        if args.variant.startswith("stock"):
            out["cases"] = {k: time_case(clip, v, n) for k, v in CASES.items()}
            out["memory"] = memory(clip, CASES["1 prompt (1x77)"])
            return out
        # the pack: calibrate on the 64 built-in prompts, then each FP8 executor
        pack = load_pack()
        from comfyui_fp8_clip.quant import calibrate, runtime
        from comfyui_fp8_clip.quant.prompts import CALIBRATION_PROMPTS, HELD_OUT_PROMPTS
        from comfyui_fp8_clip.quant.recipe import Recipe

        eager_modelopt()
        t0 = time.perf_counter()
        fake, report = calibrate.quantize_clip(clip, list(CALIBRATION_PROMPTS), Recipe())
        out["calibration_s"] = time.perf_counter() - t0
        out["report"] = report.text()
        held = list(HELD_OUT_PROMPTS)
        ref = {p: calibrate.encode(clip, p) for p in held}
        fq = {p: calibrate.encode(fake, p) for p in held}
        # (executor, activations, kernels between the matmuls); "plan": what `auto` picks on this machine; the
        # rest forced (torch.compile's kernels without CUDA graphs under cudaMallocAsync, as the plan runs them)
        variants = [("plan", "", ""), ("cuda_graph", "float32", "fused"), ("cuda_graph", "float32", "torch"),
                    ("compiled", "float32", "torch"), ("eager", "float32", "fused")]
        if args.quick or args.family in ("sd3-t5", "flux"):
            variants = variants[:1]
        elif args.family != "sd15":
            variants = variants[:3]
        out["runtimes"] = {}
        for executor, act, kernels in variants:
            name = f"fp8 scaled_mm, {executor}, {'fused' if kernels == 'fused' else 'unfused'} kernels, {act} activations"
            res: dict = {}
            try:
                fp8, plan = runtime.to_fp8_runtime(fake, "fp8")
                if executor == "plan":
                    name = f"fp8 auto: {plan.reason}"
                for m, _ in pack.quant.artifact.quantized_towers(fp8).values() if executor != "plan" else ():
                    m.configure(lambda d, e=executor, a=act, k=kernels: runtime.Plan(
                        "fp8", "scaled_mm", e, a, "bench", k, graphs=runtime.compiled_in_graphs()[0] or e != "compiled"))
                t0 = time.perf_counter()
                calibrate.encode(fp8, held[0])
                res["first_encode_s"] = time.perf_counter() - t0  # includes graph capture / compilation
                from comfyui_fp8_clip.quant.fidelity import score
                got = {p: calibrate.encode(fp8, p) for p in held}
                vs_fq = [score(p, fq[p], got[p]) for p in held]
                vs_ref = [score(p, ref[p], got[p]) for p in held]
                res["cos_vs_fakequant_min"] = min(s.cond_cosine for s in vs_fq)
                res["pooled_cos_vs_fakequant_min"] = min(s.pooled_cosine for s in vs_fq)
                res["cos_vs_original_min"] = min(s.cond_cosine for s in vs_ref)
                res["cos_vs_original_mean"] = sum(s.cond_cosine for s in vs_ref) / len(held)
                res["cases"] = {k: time_case(fp8, v, n) for k, v in CASES.items()}
                res["memory"] = memory(fp8, CASES["1 prompt (1x77)"])
            except Exception as e:  # one variant failing must not lose the others
                import traceback
                res["error"] = f"{type(e).__name__}: {e}"
                res["traceback"] = traceback.format_exc()[-3000:]
            out["runtimes"][name] = res
            print(json.dumps({name: {k: v for k, v in res.items() if k != "traceback"}}, indent=1), flush=True)
        fq_scores = [calibrate.encode(fake, p) for p in held[:1]]  # keep fake alive to here
        del fq_scores
    return out


def table(results: list[dict]) -> str:
    stock = next(r for r in results if r["variant"] == "stock")
    rows = [("stock ComfyUI (fp16 weights, fp32 compute)", stock["cases"], stock["memory"])]
    for r in results:
        if r["variant"] == "stock-fp8":
            rows.append(("stock --fp8_e4m3fn-text-enc", r["cases"], r["memory"]))
        for name, res in r.get("runtimes", {}).items():
            if "cases" in res:
                rows.append((f"pack: {name}", res["cases"], res["memory"]))
    cases = list(CASES)
    lines = [f"Device: {stock['device']}, torch {stock['torch']}, {stock.get('family', 'sd15')} text encoder, "
             f"ComfyUI patcher {stock.get('patcher')}"
             f"{' (dynamic VRAM)' if stock.get('dynamic_vram') else ''}"
             f"{', started with --gpu-only (conditioning stays on the GPU)' if stock.get('gpu_only') else ''}"
             f", allocator {stock.get('allocator', 'native')}. "
             "Median ms per case (ratio: stock / this).", "",
             "| variant | " + " | ".join(cases) + " | weights on GPU MB | allocated after an encode MB | peak MB | "
             "growth over 50 calls MB |",
             "|---|" + "---|" * (len(cases) + 4)]
    for name, c, mem in rows:
        cells = [f"{c[k]['median_ms']:.2f} ({stock['cases'][k]['median_ms'] / c[k]['median_ms']:.1f}x)" for k in cases]
        w, w0 = mem["weights_on_gpu_mb"], stock["memory"]["weights_on_gpu_mb"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {w:.0f}" + (f" ({w / w0:.2f}x)" if w0 >= 1 else "") +
                     f" | {mem['resident_mb']:.0f} | {mem['peak_during_encode_mb']:.0f} | "
                     f"{mem['growth_over_50_encodes_mb']:.1f} |")
    for r in results:
        for name, res in r.get("runtimes", {}).items():
            if "error" in res:
                lines.append(f"\n{name}: FAILED {res['error']}")
            else:
                lines.append(f"\n{name}: cosine vs the calibrated Q->DQ model (worst held-out prompt) "
                             f"{res['cos_vs_fakequant_min']:.5f} (pooled {res['pooled_cos_vs_fakequant_min']:.5f}); "
                             f"vs the original {res['cos_vs_original_min']:.4f} worst / {res['cos_vs_original_mean']:.4f} "
                             f"mean; first encode {res['first_encode_s']:.1f} s")
        if "calibration_s" in r:
            lines.append(f"\nCalibration (64 prompts, on the GPU): {r['calibration_s']:.1f} s\n\n```\n{r['report']}\n```")
    return "\n".join(lines)


def run_variants(script: str, args: argparse.Namespace, flags: list[str]) -> list[dict]:
    """Each of args.variants in a fresh process of `script` (which writes OUT/<variant>.json); the results."""
    out, results = Path(args.out), []
    for v in args.variants.split(","):
        print("==>", v, flush=True)
        subprocess.run([sys.executable, script, "--comfy", args.comfy, "--out", str(out), "--fixture", args.fixture,
                        "--variant", v, *flags], check=False)
        f = out / f"{v}.json"
        if f.exists():
            results.append(json.loads(f.read_text()))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def write_results(out: Path, md: str) -> None:
    (out / "results.md").write_text(md + "\n")
    print(md)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--fixture", default=str(ROOT / ".cache" / "bench-clip_l.safetensors"))
    ap.add_argument("--variant")
    ap.add_argument("--variants", default="stock,stock-fp8,pack")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dynamic-vram", action="store_true", help="ComfyUI v0.29's default on NVIDIA (comfy-aimdo)")
    ap.add_argument("--gpu-only", action="store_true",
                    help="start ComfyUI with --gpu-only: everything on the GPU, conditioning included")
    ap.add_argument("--family", choices=("sd15", "sdxl", "sd3", "sd3-t5", "flux"), default="sd15")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        res = run_variant(args)
        (out / f"{args.variant}.json").write_text(json.dumps(res, indent=1))
        return 0
    fixture(Path(args.fixture), family=args.family)
    flags = ((["--quick"] if args.quick else []) + (["--dynamic-vram"] if args.dynamic_vram else [])
             + (["--gpu-only"] if args.gpu_only else [])
             + ["--family", args.family])
    write_results(out, table(run_variants(__file__, args, flags)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
