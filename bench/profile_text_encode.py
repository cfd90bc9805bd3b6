"""Where one CLIPTextEncode spends its time on the GPU: ComfyUI's own work vs the transformer, stock vs FP8.

    python bench/profile_text_encode.py --comfy /path/to/ComfyUI --out OUT [--dynamic-vram]

Times (median ms, synchronized): tokenize; a full encode for stock, for a clone whose transformer returns
preallocated outputs at once (ComfyUI's own per-encode work: model management, token processing, output
copies), and for each FP8 executor; the FP8 transformer call alone and its CUDA-graph replay alone; kernels per
forward. Plus cProfile listings of the floor and the FP8 encode. A diagnosis, written to OUT/profile*.txt.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_text_encode as b  # noqa: E402

TEXT = "a watercolor painting of a lighthouse on a cliff at sunrise, soft light, seagulls"


def med(fn, n: int = 60, warm: int = 10) -> float:
    import torch

    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def listing(fn, n: int = 30, top: int = 30) -> str:
    import torch

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(top)
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(15)
    return s.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fixture", default=str(b.ROOT / ".cache" / "bench-clip_l.safetensors"))
    ap.add_argument("--dynamic-vram", action="store_true")
    ap.add_argument("--gpu-only", action="store_true", help="ComfyUI started with --gpu-only")
    ap.add_argument("--executors", default="fused,cuda_graph,compiled",
                    help="fused: CUDA graph of the fused kernels (the default plan); cuda_graph: unfused kernels")
    ap.add_argument("--family", choices=("sd15", "sdxl"), default="sd15",
                    help="sdxl: SDXL's CLIP-L + CLIP-G; the transformer figures are CLIP-G's, no floor breakdown")
    ap.add_argument("--cases", default="1 prompt (1x77)",
                    help="comma-separated names of bench_text_encode.CASES (one prompt each); the listings and the "
                         "kernel table are written for the first")
    args = ap.parse_args()
    b.boot(Path(args.comfy), ["--gpu-only"] if args.gpu_only else [], args.dynamic_vram)
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("dynamic" if args.dynamic_vram else "static") + ("_gpu_only" if args.gpu_only else "")
    report: list[str] = [f"# {tag} patcher, {torch.cuda.get_device_name(0)}, torch {torch.__version__}"]
    listings: list[str] = []
    clip = b.load_fixture_clip(Path(args.fixture), family=args.family)
    tower = "clip_g" if args.family == "sdxl" else "clip_l"
    cases = {name: b.CASES[name][0] for name in args.cases.split(",")}

    def enc(c, tokens):
        return lambda: c.encode_from_tokens_scheduled(tokens)

    with torch.inference_mode():
        for i, (case, text) in enumerate(cases.items()):
            tokens = clip.tokenize(text)
            report.append(f"\n## {case}: {len(tokens['l'])} rows of 77")
            report.append(f"tokenize: {med(lambda: clip.tokenize(text)):.3f} ms")
            report.append(f"stock encode (tokens given): {med(enc(clip, tokens)):.3f} ms")
            try:
                if args.family == "sd15":
                    floor_breakdown(clip, tokens, enc, report, listings if i == 0 else None)
            except Exception:
                import traceback
                report.append(f"floor FAILED\n{traceback.format_exc()}")

        pack = b.load_pack()
        from comfyui_fp8_clip.quant import calibrate, runtime
        from comfyui_fp8_clip.quant.proxy import unwrap
        from comfyui_fp8_clip.quant.recipe import Recipe

        b.eager_modelopt()
        fake, _ = calibrate.quantize_clip(clip, ["a cat", "a dog on a beach", "(a castle:1.2)", TEXT],
                                          Recipe(), held_out=["a house"])
        for ex in args.executors.split(","):
            try:
                profile_executor(ex, fake, cases, enc, report, listings, pack, runtime, unwrap, tower)
            except Exception:
                import traceback
                report.append(f"[{ex}] FAILED\n{traceback.format_exc()}")
    (out / f"profile_{tag}.txt").write_text("\n".join(report) + "\n")
    (out / f"listing_{tag}.txt").write_text("\n".join(listings))
    print("\n".join(report))


def floor_breakdown(clip, tokens, enc, report, listings: list[str] | None) -> None:
    import torch

    # ComfyUI's floor: the same path with a transformer that costs nothing.
    real = clip.patcher.get_model_object("clip_l.transformer")

    class Instant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            dev = clip.patcher.load_device
            self.outs = (torch.zeros(1, 77, 768, device=dev), torch.zeros(1, 768, device=dev))

        def get_input_embeddings(self):
            return real.get_input_embeddings()

        def __getattr__(self, name):  # weight names (the dynamic-VRAM patcher walks them) reach the real tower
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(real, name)

        def forward(self, *a, embeds=None, **k):
            z, p = self.outs
            return z.expand(embeds.shape[0], -1, -1).clone(), None, p.expand(embeds.shape[0], -1).clone(), None

    floor = clip.clone()
    floor.patcher.add_object_patch("clip_l.transformer", Instant())
    report.append(f"floor: encode with an instant transformer: {med(enc(floor, tokens)):.3f} ms")
    if listings is not None:
        listings.append("## floor\n" + listing(enc(floor, tokens)))
    import comfy.model_management as mm
    report.append(f"  of which load_model_gpu: {med(lambda: mm.load_model_gpu(floor.patcher)):.3f} ms")
    sd1 = clip.cond_stage_model.clip_l
    ids = [[t[0] for t in row] for row in tokens["l"]]
    report.append(f"  of which process_tokens: {med(lambda: sd1.process_tokens(ids, floor.patcher.load_device)):.3f} ms")
    del floor


def profile_executor(ex, fake, cases, enc, report, listings, pack, runtime, unwrap, tower="clip_l") -> None:
    import torch
    fp8, _ = runtime.to_fp8_runtime(fake, "fp8")
    for m, _ in pack.quant.artifact.quantized_towers(fp8).values():
        executor, kernels = ("cuda_graph", "fused") if ex == "fused" else (ex, "torch")
        m.configure(lambda d, e=executor, k=kernels: runtime.Plan("fp8", "scaled_mm", e, "float32", "profile", k))
    impl = unwrap(fp8.patcher.get_model_object(f"{tower}.transformer"))
    proxy = fp8.patcher.get_model_object(f"{tower}.transformer")
    for i, (case, text) in enumerate(cases.items()):
        tokens = fp8.tokenize(text)
        t0 = time.perf_counter()
        fp8.encode_from_tokens_scheduled(tokens)
        first = time.perf_counter() - t0
        report.append(f"\n[{ex}] {case}: first encode {first:.1f} s; encode (tokens given): "
                      f"{med(enc(fp8, tokens)):.3f} ms; with tokenize: "
                      f"{med(lambda: fp8.encode_from_tokens_scheduled(fp8.tokenize(text))):.3f} ms")
        ids = torch.tensor([[t[0] for t in row] for row in tokens[tower[-1]]], device=fp8.patcher.load_device)
        emb = impl.get_input_embeddings()(ids, out_dtype=torch.float32)
        kw = dict(embeds=emb, num_tokens=[77] * ids.shape[0], intermediate_output=None,
                  final_layer_norm_intermediate=True, dtype=torch.float32)
        report.append(f"[{ex}] {tower} transformer call alone (proxy): {med(lambda: proxy(None, None, **kw)):.3f} ms; "
                      f"impl: {med(lambda: impl(None, None, **kw)):.3f} ms")
        x = emb.float()
        report.append(f"[{ex}] run_core alone: {med(lambda: impl.run_core(x, None, None, True)):.3f} ms")
        key = next((k for k in impl._graphs if k[0] == tuple(x.shape)), None)
        if key is not None:
            g = impl._graphs[key][0]
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            ts = []
            for _ in range(50):
                s.record()
                g.replay()
                e.record()
                e.synchronize()
                ts.append(s.elapsed_time(e))
            report.append(f"[{ex}] graph replay GPU time: {statistics.median(ts):.3f} ms")
        fn = impl._compiled if ex == "compiled" and impl._compiled is not None else impl._core
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(x, None, None, True)
            torch.cuda.synchronize()
        kernels = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
        gpu_us = sum(ev.device_time for ev in kernels)
        report.append(f"[{ex}] kernels per forward: {len(kernels)}, summed kernel time {gpu_us / 1e3:.3f} ms")
        report.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16))
        if i == 0 or ex == "fused":
            listings.append(f"## {ex} encode, {case}\n" + listing(enc(fp8, tokens)))
    del fp8, impl, proxy


if __name__ == "__main__":
    main()
