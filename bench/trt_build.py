"""What building TensorRT engines for the FP8 CLIP-L costs on this machine (no GPU needed).

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.trt_build [--repeats 3] [--out bench/results/trt_build_cpu.md]

In a real in-process ComfyUI, on the seeded random-weight full-size CLIP-L fixture: quantize (the node's
defaults), ONNX export, TensorRT for RTX parse + build (portable engine, profile 1..8 rows), engine sizes FP8 vs
FP16, a cache hit, and what a LoRA change costs (the LoRA goes before the quantize node, so it means quantizing
again, exporting and building). Engine execution is not measured: TensorRT for RTX does not run on this
project's GPUs (compute capability 9.0) and there is none here.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="builds of each engine (median reported)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "trt_build_cpu.md")
    args = ap.parse_args()
    command = "OMP_NUM_THREADS=%s .venv/bin/python -m bench.trt_build --repeats %d" % (
        os.environ.get("OMP_NUM_THREADS", "?"), args.repeats)

    import torch

    from harness import fixtures, host

    base = Path(tempfile.mkdtemp(prefix="fp8clip-trt-bench-"))
    files = fixtures.populate(base)
    h = host.boot_in_process(base)
    pack = sys.modules[str(base / "custom_nodes" / host.PACK_NAME).replace(".", "_x_")]

    def mod(name):
        return importlib.import_module(f"{pack.__name__}.{name}")

    artifact = mod("quant.artifact")
    ox, build, av, cache_mod, pipeline = (mod(f"trt_runtime.{n}") for n in
                                          ("onnx_export", "build", "availability", "cache", "pipeline"))
    support = av.build_only_support()
    if not support.ok:
        print(support.reason)
        return 1

    def node(node_id, **inputs):
        n = h.nodes.NODE_CLASS_MAPPINGS[node_id]()
        with torch.inference_mode():
            out = getattr(n, n.FUNCTION)(**inputs)
        return out["result"] if isinstance(out, dict) else out

    def quantize(clip):
        """The quantize node with every widget at its default."""
        n = h.nodes.NODE_CLASS_MAPPINGS["FP8CLIPQuantize"]
        defaults = {k: (v[1].get("default") if len(v) > 1 and isinstance(v[1], dict) and "default" in v[1]
                        else v[0][0]) for k, v in n.INPUT_TYPES()["required"].items() if k != "clip"}
        return node("FP8CLIPQuantize", clip=clip, **defaults)[0]

    rows: list[tuple[str, str]] = []
    (clip,) = node("CLIPLoader", clip_name=files["clip_l"], type="stable_diffusion")
    qclip, t_quant = timed(lambda: quantize(clip))
    rows.append(("Quantize node, defaults (64 calibration + 24 held-out prompts, fp8 runtime)", f"{t_quant:.1f} s"))
    ((module, record),) = artifact.quantized_towers(qclip).values()

    spec, t_spec = timed(lambda: ox.spec_from_module(module, record))
    _, t_digest = timed(lambda: spec.digest(torch.float32, True))
    onnx8, t_export = timed(lambda: ox.build_onnx(spec, compute_dtype=torch.float32, fp8=True))
    data8, t_ser = timed(onnx8.SerializeToString)
    onnx8h = ox.build_onnx(spec, compute_dtype=torch.float16, fp8=True)
    onnx16 = ox.build_onnx(ox.spec_from_module(module, None), compute_dtype=torch.float16, fp8=False)
    rows += [("Read weights and scales from the module", f"{t_spec:.2f} s"),
             ("Cache key (sha256 of every exported tensor)", f"{t_digest:.2f} s"),
             ("ONNX export (graph + FP8 initializers) + serialize", f"{t_export + t_ser:.2f} s"),
             ("ONNX size FP8 / FP16",
              f"{len(data8) / 2**20:.1f} MB / {len(onnx16.SerializeToString()) / 2**20:.1f} MB")]

    profile = build.Profile(max_rows=8)

    def builds(model):
        res = [build.build_engine(model, profile, support.flavour, target=support.target) for _ in range(args.repeats)]
        return res[-1], statistics.median(r.parse_seconds for r in res), statistics.median(r.build_seconds for r in res)

    r8, p8, b8 = builds(onnx8)
    r8h, p8h, b8h = builds(onnx8h)
    r16, p16, b16 = builds(onnx16)
    params = sum(lin.weight.numel() for lin in spec.linears())
    label, n = support.flavour.label, args.repeats
    rows += [(f"{label} parse, FP8 engine (median of {n})", f"{p8:.2f} s"),
             (f"{label} build, FP8 engine, float32 activations (the node's default; median of {n})", f"{b8:.2f} s"),
             (f"{label} parse + build, FP8 engine, float16 activations (median of {n})", f"{p8h + b8h:.2f} s"),
             (f"{label} parse + build, FP16 engine (no FP8; median of {n})", f"{p16 + b16:.2f} s"),
             ("Engine size FP8, float32 activations",
              f"{len(r8.engine) / 2**20:.1f} MB ({len(r8.engine) / len(r16.engine):.2f}x the FP16 engine)"),
             ("Engine size FP8, float16 activations",
              f"{len(r8h.engine) / 2**20:.1f} MB ({len(r8h.engine) / len(r16.engine):.2f}x the FP16 engine)"),
             ("Engine size FP16", f"{len(r16.engine) / 2**20:.1f} MB"),
             ("Linear weights in the engine", f"{params / 1e6:.1f}M ({params / 2**20:.0f} MB in FP8, "
                                              f"{2 * params / 2**20:.0f} MB in FP16)")]

    cache = cache_mod.EngineCache(base / "models" / "tensorrt")
    first, t_first = timed(lambda: pipeline.prepare_engine(module, record, profile=profile, support=support,
                                                           cache=cache))
    hit, t_hit = timed(lambda: pipeline.prepare_engine(module, record, profile=profile, support=support,
                                                       cache=cache))
    assert first.built and not hit.built
    rows += [("Node on a cache miss: key + export + build + write", f"{t_first:.1f} s"),
             ("Node on a cache hit: key + manifest + sha256 of the engine", f"{t_hit:.2f} s")]

    _, lclip = node("LoraLoader", model=None, clip=clip, lora_name=files["lora"], strength_model=0.0,
                    strength_clip=1.0)
    lq, t_lq = timed(lambda: quantize(lclip))
    ((lmodule, lrecord),) = artifact.quantized_towers(lq).values()
    lora, t_lora = timed(lambda: pipeline.prepare_engine(lmodule, lrecord, profile=profile, support=support,
                                                         cache=cache))
    assert lora.built and lora.key != first.key
    rows += [("LoRA change: quantize node again (defaults)", f"{t_lq:.1f} s"),
             ("LoRA change: new key, export + build + write", f"{t_lora:.1f} s"),
             ("LoRA change: total", f"{t_lq + t_lora:.1f} s")]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    text = "\n".join([
        "# TensorRT engine build for the FP8 CLIP-L, on a CPU-only machine",
        "",
        f"Command: `{command}` (from the repository root, after `bash harness/setup.sh`).",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores visible, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"no GPU. torch {torch.__version__}, {support.flavour.label} (`tensorrt_rtx_bindings`), "
        f"ComfyUI host {h.host.name}.",
        "",
        "Model: the seeded random-weight full-size CLIP-L fixture (ViT-L/14 text config, 123M parameters), "
        "quantized by the pack's node (W8A8, `*text_projection` kept, default runtime). Engines: strongly typed, "
        "FP8 Q/DQ from the pack's ONNX export with float32 (default) or float16 between the FP8 matmuls; the "
        "FP16 engine is the same model without Q/DQ in fp16. Profile 1/2/8 rows of 77 tokens, TensorRT for RTX "
        "portable target (what builds without a GPU).",
        "",
        "| step | measured |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        f"| Peak RSS of the whole run | {rss:.1f} GB |",
        "",
        "Not measured: running the engine (TensorRT for RTX refuses compute capability 9.0, the only GPUs this "
        "project has, and there is no GPU here), GPU memory, encode latency. A LoRA on the CLIP is baked in "
        "before quantizing, so changing it costs the quantize node's calibration plus one engine build; the "
        "engine build itself is a few seconds of that.",
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
