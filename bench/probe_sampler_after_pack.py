"""Does the pack slow the sampler that runs after it? KSampler times in one process, before and after the pack.

    python bench/probe_sampler_after_pack.py --comfy /path/to/ComfyUI --out OUT [--steps 20] [--reps 4] [--small]

The example-workflows benchmark timed SD1.5's KSampler slower in the pack's graph than in the stock graph run
before it in the same process (H200: 833-845 vs 493 ms). This probe separates the machine's drift from the
pack: on the SD1.5 example checkpoint (seeded, real config, 512x512, `--steps` steps) it times KSampler with the
stock conditioning, `--reps` times per stage, through these stages in order:
  before      nothing of the pack has run
  fake-quant  after 'Quantize CLIP to FP8' with runtime fake-quant (ModelOpt calibration)
  auto        after the same node with runtime auto (FP8 runtime, CUDA graphs) and one encode
  pack-cond   the same, sampling with the pack's conditioning
  released    the pack's CLIPs and conditionings dropped, garbage collected
  before-2    a stock re-encode: the drift of the machine over the run
and per stage what could carry over in the process (threads, trace/profile hooks, torch function modes, grad
mode, matmul precision, allocator state), plus a cProfile of one KSampler in `before` and `auto`.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def state() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {"threads": sorted(t.name for t in threading.enumerate()),
            "trace": repr(sys.gettrace()), "profile": repr(sys.getprofile()),
            "torch_function_modes": torch._C._len_torch_function_stack(),
            "grad_enabled": torch.is_grad_enabled(), "inference_mode": torch.is_inference_mode_enabled(),
            "fp32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "allocated_mb": round(torch.cuda.memory_allocated() / 2 ** 20) if cuda else None,
            "reserved_mb": round(torch.cuda.memory_reserved() / 2 ** 20) if cuda else None,
            "segments": len(torch.cuda.memory_snapshot()) if cuda else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--small", action="store_true", help="small UNet, 64x64 (CPU dry run)")
    ap.add_argument("--fixtures", type=Path, default=Path("/tmp/fp8clip-example-fixtures"))
    args = ap.parse_args()
    import torch

    from bench_example_workflows import boot_host, checkpoint

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    host, base = boot_host(args.comfy, args.fixtures, dynamic_vram=False)
    N = host.nodes.NODE_CLASS_MAPPINGS
    ckpt = checkpoint(base, "sd15", args.small)
    model, clip, _ = N["CheckpointLoaderSimple"]().load_checkpoint(ckpt)[:3]
    size = 64 if args.small else 512
    latent = N["EmptyLatentImage"]().generate(size, size, 1)[0]
    prompt, negative = "a lighthouse on a cliff at dusk, oil painting", "blurry, low quality"

    def encode(c) -> tuple:
        enc = N["CLIPTextEncode"]()
        return tuple(getattr(enc, enc.FUNCTION)(c, t)[0] for t in (prompt, negative))

    def sample(cond: tuple, reps: int, prof_name: str | None = None) -> list[float]:
        ks = N["KSampler"]()
        out = []
        for i in range(reps):
            prof = cProfile.Profile() if prof_name and i == reps - 1 else None
            sync()
            t0 = time.perf_counter()
            if prof:
                prof.enable()
            ks.sample(model, 1, args.steps, 7.0, "euler", "normal", cond[0], cond[1], latent)
            sync()
            if prof:
                prof.disable()
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
                (args.out / f"profile_{prof_name}.txt").write_text(buf.getvalue())
            out.append(round((time.perf_counter() - t0) * 1e3, 1))
        return out

    args.out.mkdir(parents=True, exist_ok=True)
    stock = encode(clip)
    sample(stock, 1)  # loads the UNet, warms cuDNN
    stages: dict[str, dict] = {}

    def stage(name: str, cond: tuple, prof: bool = False) -> None:
        ms = sample(cond, args.reps, name if prof else None)
        stages[name] = {"ksampler_ms": ms, "median_ms": statistics.median(ms), "state": state()}
        print(f"{name:11s} KSampler median {statistics.median(ms):8.1f} ms  {ms}", flush=True)

    stage("before", stock, prof=True)
    q = N["FP8CLIPQuantize"]()
    defaults = {k: v[1]["default"] for k, v in q.INPUT_TYPES()["required"].items() if k != "clip"}
    fq = getattr(q, q.FUNCTION)(clip, **{**defaults, "runtime": "fake-quant"})["result"][0]
    encode(fq)
    stage("fake-quant", stock)
    pk = getattr(q, q.FUNCTION)(clip, **{**defaults, "runtime": "auto"})["result"][0]
    pack = encode(pk)
    stage("auto", stock, prof=True)
    stage("pack-cond", pack)
    del fq, pk, pack
    gc.collect()
    stage("released", stock)
    stock = encode(clip)
    stage("before-2", stock)
    device = torch.cuda.get_device_name() if cuda else "CPU"
    (args.out / "sampler_after_pack.json").write_text(json.dumps({"device": device, "steps": args.steps,
                                                                  "stages": stages}, indent=1))
    for name, s in stages.items():
        print(name, json.dumps(s["state"]))


if __name__ == "__main__":
    main()
