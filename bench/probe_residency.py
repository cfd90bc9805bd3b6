"""Several quantized encoders on one GPU, as in unCLIP / IP-Adapter workflows (a quantized CLIP and a quantized
CLIP vision) or when comparing two recipes (two quantized CLIPs): where each FP8 tower is after each encode, that
every encode still gives the very tensors it gave first (the towers move between the GPU and the offload device
and their CUDA graphs are captured again), and what a switch costs.

    python bench/probe_residency.py --comfy /path/to/ComfyUI --out OUT [--dynamic-vram]

The CPU tests cannot see this: there the load and offload devices are the same. A diagnosis, written to
OUT/residency.txt.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_text_encode import ROOT, boot, eager_modelopt, load_fixture_clip, load_pack  # noqa: E402
from bench_vision_encode import fixture as vision_fixture, images  # noqa: E402

PROMPT = "a watercolor painting of a lighthouse on a cliff at sunrise, soft light, seagulls"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fixture", default=str(ROOT / ".cache" / "bench-clip_l.safetensors"))
    ap.add_argument("--vision-fixture", default=str(ROOT / ".cache" / "bench-clip-vit-l.safetensors"))
    ap.add_argument("--dynamic-vram", action="store_true")
    args = ap.parse_args()
    boot(Path(args.comfy), [], args.dynamic_vram)
    import comfy.clip_vision
    import comfy.model_management as mm
    import torch

    pack = load_pack()
    from comfyui_fp8_clip.quant import calibrate, runtime, vision
    from comfyui_fp8_clip.quant.prompts import CALIBRATION_PROMPTS
    from comfyui_fp8_clip.quant.recipe import Recipe

    eager_modelopt()
    lines = [f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
             f"{'dynamic VRAM' if args.dynamic_vram else 'static patcher'}", ""]
    with torch.inference_mode():
        clip = load_fixture_clip(Path(args.fixture))
        cv = comfy.clip_vision.load(str(vision_fixture(Path(args.vision_fixture))))
        cal = list(CALIBRATION_PROMPTS)
        a = runtime.to_fp8_runtime(calibrate.quantize_clip(clip, cal, Recipe())[0], "fp8")[0]
        b = runtime.to_fp8_runtime(calibrate.quantize_clip(clip, cal, Recipe(scope="weights only"))[0], "fp8")[0]
        v = runtime.to_fp8_runtime(vision.quantize_clip_vision(cv, None, Recipe(
            keep=vision.DEFAULT_VISION_KEEP, fp8_embedding=False))[0], "fp8")[0]
        imgs = images(4)
        models = {"text A (W8A8)": a, "text B (weights only)": b, "vision": v}
        encoders = {"text A (W8A8)": lambda: calibrate.encode(a, PROMPT),
                    "text B (weights only)": lambda: calibrate.encode(b, PROMPT),
                    "vision": lambda: vision.embed(v, imgs),
                    "original CLIP-L": lambda: calibrate.encode(clip, PROMPT)}  # A's and B's input, stock

        def where() -> str:
            out = []
            for name, m in models.items():
                devs = {str(next(t.parameters()).device)
                        for t, _ in pack.quant.artifact.quantized_towers(m).values()}
                out.append(f"{name.split(' (')[0]}: {'/'.join(sorted(devs))}")
            return ", ".join(out)

        def timed(fn):
            """fn's result and its synchronized wall time in ms."""
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            got = fn()
            torch.cuda.synchronize()
            return got, (time.perf_counter() - t0) * 1e3

        def run(name: str):
            return timed(encoders[name])

        first = {n: run(n)[0] for n in encoders}  # also compiles and captures everything once
        lines.append("Each encode vs the first result of the same encoder (torch.equal on every output), and where "
                     "each model's FP8 towers are afterwards:")
        mismatches = 0
        order = ["text A (W8A8)", "vision", "text A (W8A8)", "text A (W8A8)", "text B (weights only)",
                 "text A (W8A8)", "original CLIP-L", "text A (W8A8)", "original CLIP-L", "vision", "vision",
                 "text B (weights only)", "original CLIP-L", "unload_all_models", "text A (W8A8)", "vision",
                 "original CLIP-L"]
        for step in order:
            if step == "unload_all_models":
                mm.unload_all_models()
                lines.append(f"  unload_all_models -> {where()}")
                continue
            got, ms = run(step)
            same = all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(first[step], got) if x is not None)
            mismatches += not same
            lines.append(f"  {step}: {'equal' if same else 'DIFFERENT'} ({ms:.1f} ms) -> {where()}")
        lines.append(f"Mismatches: {mismatches}")

        # The cost of a switch: an encode right after the same encoder vs right after another one.
        lines += ["", "Median ms of an encode (15 each), synchronized:"]
        for name, other in (("text A (W8A8)", "vision"), ("vision", "text A (W8A8)"),
                            ("text A (W8A8)", "text B (weights only)"), ("text A (W8A8)", "original CLIP-L"),
                            ("original CLIP-L", "text A (W8A8)")):
            again, switched = [], []
            for _ in range(15):
                run(name)
                again.append(run(name)[1])
                run(other)
                switched.append(run(name)[1])
            lines.append(f"  {name}: after itself {statistics.median(again):.2f}, right after {other} "
                         f"{statistics.median(switched):.2f}")

        # What moving costs, where it happens (ComfyUI unloading a model; with dynamic VRAM, any switch): the
        # other model's towers leaving, this one's leaving and arriving, the first encode after the move (CUDA
        # graphs captured again), the next one.
        def proxies(m):
            return [m.patcher.object_patches[p] for p in pack.quant.artifact.quantized_towers(m)]

        lines += ["", "Towers sent back and brought to the GPU again, step by step (ms; median of 7):"]
        for name, other in (("text A (W8A8)", "vision"), ("vision", "text A (W8A8)")):
            parts: dict[str, list[float]] = {"other's towers to the offload device": [],
                                             "this model's towers to the offload device": [],
                                             "this model's towers to the GPU": [], "first encode after": [],
                                             "second encode": []}
            for _ in range(7):
                run(other)
                vals = [timed(lambda: [p.offload_now() for p in proxies(models[other])])[1],
                        timed(lambda: [p.offload_now() for p in proxies(models[name])])[1],
                        timed(lambda: [p.place(p.load_device) for p in proxies(models[name])])[1],
                        run(name)[1], run(name)[1]]
                for k, val in zip(parts, vals):
                    parts[k].append(val)
            lines.append(f"  {name} after {other}: " + ", ".join(f"{k} {statistics.median(v):.1f}"
                                                               for k, v in parts.items()))
        lines.append(f"GPU memory allocated at the end: {torch.cuda.memory_allocated() / 2**20:.0f} MB")
    text = "\n".join(lines) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"residency{'_dynamic' if args.dynamic_vram else ''}.txt").write_text(text)
    print(text)
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
