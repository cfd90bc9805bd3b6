"""An FP8 CLIP whose CUDA-graph capture fails: the encode still runs (eagerly), and later encodes do not try to
capture again (each would fail the same way).

    python bench/probe_capture_failure.py --comfy /path/to/ComfyUI [--fixture PATH]

Makes `torch.cuda.graph` raise on entry (what a kernel that cannot be captured does), encodes a prompt of a new
shape, then other shapes, and prints whether each encode ran, whether it equals the same encode with CUDA graphs
disabled from the start, and how many captures were tried.
"""
import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_text_encode import boot, load_fixture_clip, load_pack  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--comfy", required=True, type=Path)
ap.add_argument("--fixture", type=Path, default=Path("/tmp/fx/bench-clip_l.safetensors"))
args = ap.parse_args()
import torch  # noqa: E402

logging.basicConfig(level=logging.WARNING)
boot(args.comfy, [] if torch.cuda.is_available() else ["--cpu"])
clip = load_fixture_clip(args.fixture)
pack = load_pack()
from comfyui_fp8_clip.quant import calibrate, runtime  # noqa: E402
from comfyui_fp8_clip.quant.proxy import unwrap  # noqa: E402

with torch.inference_mode():
    fake, _ = calibrate.quantize_clip(clip, ["a cat", "a dog on a sofa"], held_out=["a house"])
    fp8, plan = runtime.to_fp8_runtime(fake, "fp8")
print("plan:", plan.reason, flush=True)
tower = unwrap(fp8.patcher.get_model_object("clip_l.transformer"))
prompts = ["a red fox in the snow", "a castle " * 40, "a castle " * 80]  # 1, 2 and 3 rows of 77 tokens
with torch.inference_mode():
    first = calibrate.encode(fp8, "a photo of a cat")[0]  # a graph for one row, captured normally
print("captured before:", len(tower._graphs), flush=True)

real_graph, tries = torch.cuda.graph, []


class failing_graph:
    def __init__(self, *a, **k):
        tries.append(1)

    def __enter__(self):
        raise RuntimeError("operation not permitted when stream is capturing (simulated)")

    def __exit__(self, *exc):
        return False


torch.cuda.graph = failing_graph
got = []
for p in prompts:
    try:
        with torch.inference_mode():
            got.append(calibrate.encode(fp8, p)[0])
        print(f"encode of {len(p)} chars ran; graphs now {tower.graphs}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"encode of {len(p)} chars FAILED: {type(e).__name__}: {e}", flush=True)
        got.append(None)
torch.cuda.graph = real_graph
print("captures tried while failing:", len(tries), flush=True)
with torch.inference_mode():
    tower._device = None  # replan: graphs on again, as for a fresh tower
    eager = [calibrate.encode(fp8, p)[0] for p in prompts]
    again = calibrate.encode(fp8, "a photo of a cat")[0]
for p, g, e in zip(prompts, got, eager):
    print(f"{len(p)} chars: equal to the encode with working graphs: {g is not None and torch.equal(g, e)}", flush=True)
print("one-row encode unchanged:", torch.equal(first, again), flush=True)
