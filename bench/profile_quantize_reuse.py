"""Where 'Quantize CLIP Vision to FP8' spends its time when the calibration is remembered, and how soon it stops.

    python bench/profile_quantize_reuse.py --comfy /path/to/ComfyUI --out OUT [--dynamic-vram]

The HTTP-server probe of 2026-11-29 (v0.29 defaults, H200) found the unCLIP example's quantize node, re-queued with
only min_cosine changed (the calibration reused), stopping 10.1 s after an interrupt sent at 0.5 s, and the run
after it taking longer than the first, calibrated one. On the unCLIP example checkpoint's ViT-H (seeded, real
config), in one process: the node with its defaults (calibrates), then with another min_cosine under cProfile
(reuses; top functions by cumulative time written to OUT), then with a third min_cosine and ComfyUI's interrupt
flag set 0.5 s in from another thread, as /interrupt does: prints each call's time and the interrupt's latency.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dynamic-vram", action="store_true", help="v0.29's default on NVIDIA (comfy-aimdo)")
    ap.add_argument("--fixtures", type=Path, default=Path("/tmp/fp8clip-example-fixtures"))
    args = ap.parse_args()
    import torch

    from bench_example_workflows import boot_host, checkpoint

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    host, base = boot_host(args.comfy, args.fixtures, args.dynamic_vram)
    import comfy.model_management as mm

    N = host.nodes.NODE_CLASS_MAPPINGS
    ckpt = checkpoint(base, "unclip", small=False)
    cv = N["unCLIPCheckpointLoader"]().load_checkpoint(ckpt)[3]
    q = N["FP8CLIPVisionQuantize"]()
    req = q.INPUT_TYPES()["required"]
    inputs = {k: v[1]["default"] for k, v in req.items() if len(v) > 1 and "default" in v[1]}
    run = q.quantize  # the node's function for plain inputs (its FUNCTION takes ComfyUI's input lists)
    args.out.mkdir(parents=True, exist_ok=True)
    out: dict = {"device": torch.cuda.get_device_name() if cuda else "CPU", "dynamic_vram": args.dynamic_vram}

    def timed(label: str, **kw) -> str:
        sync()
        t0 = time.perf_counter()
        res = run(cv, **{**inputs, **kw})
        sync()
        out[label + "_s"] = round(time.perf_counter() - t0, 2)
        text = res["result"][1]
        print(f"{label}: {out[label + '_s']} s; {'reused' if 'reused' in text else 'calibrated'}", flush=True)
        return text

    timed("first")
    prof = cProfile.Profile()
    prof.enable()
    out["reuse_report"] = timed("reuse", min_cosine=0.985)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(60)
    (args.out / "profile_reuse.txt").write_text(buf.getvalue())

    sent: list[float] = []
    timer = threading.Timer(0.5, lambda: (sent.append(time.perf_counter()), mm.interrupt_current_processing(True)))
    t0 = time.perf_counter()
    timer.start()
    try:
        run(cv, **{**inputs, "min_cosine": 0.98})
        out["interrupt"] = "not interrupted: the node ran to the end"
    except mm.InterruptProcessingException:
        out["interrupt_latency_s"] = round(time.perf_counter() - sent[0], 2)
        out["interrupt"] = f"stopped {out['interrupt_latency_s']} s after the flag was set"
    finally:
        timer.cancel()
        mm.interrupt_current_processing(False)
    out["interrupt_call_s"] = round(time.perf_counter() - t0, 2)
    print(out["interrupt"], flush=True)
    (args.out / "quantize_reuse.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
