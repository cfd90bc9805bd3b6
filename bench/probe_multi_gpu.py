"""The FP8 CLIP on a second GPU, as a multi-GPU node pack runs it: the CLIP's load device is cuda:1 while
cuda:0 stays the current device (ComfyUI's own default). Needs two GPUs.

    [PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync] python bench/probe_multi_gpu.py --comfy /path/to/ComfyUI
        --out OUT

Cases, each compared with the same work on cuda:0 (same GPU model, same kernels: expected bit-identical):
1. text, calibrated and run on cuda:1;
2. text, calibrated on cuda:0, saved with the pack's Save node's function, loaded onto cuda:1;
3. vision (ViT-L/14), calibrated and run on cuda:1.
For each: whether it ran, the plan, max |difference| and worst cosine against cuda:0, median ms per encode on
both GPUs, and how much memory it left on cuda:0 (nothing of a cuda:1 model belongs there).
"""
import argparse
import faulthandler
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_text_encode import boot, eager_modelopt, fixture, load_pack  # noqa: E402

PROMPTS = ["a photograph of an astronaut riding a horse", "a (red:1.3) lighthouse on a (stormy:0.8) sea",
           ", ".join(f"intricate detail number {i}" for i in range(36))]


def sync() -> None:
    import torch

    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def allocated(i: int) -> int:
    import torch

    return torch.cuda.memory_allocated(i) if torch.cuda.is_available() else 0


def timed(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def compare(a, b) -> dict:
    import torch

    a, b = a.float().cpu(), b.float().cpu()
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)
    return {"bit_identical": bool(torch.equal(a, b)), "max_abs_diff": float((a - b).abs().max()),
            "worst_cosine": float(cos.min())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--fixture", type=Path, default=Path("/tmp/fx/bench-clip_l.safetensors"))
    ap.add_argument("--vision-fixture", type=Path, default=Path("/tmp/fx/bench-clip_vision.safetensors"))
    ap.add_argument("--cpu-dry-run", action="store_true", help="both 'GPUs' are the CPU: checks the script only")
    ap.add_argument("--cases", default="text,file,vision", help="which of: text, file, vision")
    args = ap.parse_args()
    faulthandler.enable()  # an abort in CUDA's allocator still shows the Python frames
    import torch

    boot(args.comfy, ["--cpu"] if args.cpu_dry_run else [])
    if torch.cuda.device_count() < 2 and not args.cpu_dry_run:
        print("needs two GPUs", flush=True)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    eager_modelopt()
    load_pack()
    import comfy.clip_vision
    import comfy.model_management as mm
    import comfy.sd
    from comfyui_fp8_clip.quant import artifact, calibrate, runtime, serialize, vision
    from comfyui_fp8_clip.quant.images import synthetic_images
    from comfyui_fp8_clip.quant.recipe import Recipe

    if args.cpu_dry_run:
        gpu = [torch.device("cpu")] * 2
        res: dict = {"device": ["cpu (dry run)"] * 2, "allocator": "cpu", "current_device": None}
    else:
        gpu = [torch.device("cuda", i) for i in range(2)]
        res = {"device": [torch.cuda.get_device_name(i) for i in range(2)],
               "allocator": torch.cuda.get_allocator_backend(), "current_device": torch.cuda.current_device()}
    res.update({"torch": torch.__version__, "cases": {}})
    files = [str(f) for f in fixture(args.fixture)]

    def text_clip(dev):
        return comfy.sd.load_clip(ckpt_paths=files, model_options={"load_device": dev})

    def encode_all(clip):
        return torch.cat([calibrate.encode(clip, p)[0].flatten(0, 1) for p in PROMPTS])

    def towers_on(model) -> list[str]:
        return sorted({str(p.device) for m, _ in artifact.quantized_towers(model).values() for p in m.parameters()})

    def case(key, name, make_gpu1, make_gpu0, run):
        """make_*: the runtime model on that GPU; run(model) -> the output tensor compared."""
        out: dict = {}
        if key not in args.cases.split(","):
            return
        step = lambda what: print(f"  [{name}] {what}", flush=True)  # noqa: E731 - where an abort happened
        try:
            with torch.inference_mode():
                mm.unload_all_models()
                sync()
                before0 = allocated(0)
                step("making the model on cuda:1")
                m1, plan1 = make_gpu1()
                step("encoding on cuda:1")
                y1 = run(m1)
                out["plan"] = plan1.reason
                out["tower_devices_after_encode"] = towers_on(m1)
                out["ms_cuda1"] = timed(lambda: run(m1))
                sync()
                out["cuda0_memory_left_by_cuda1_model_mb"] = (allocated(0) - before0) / 2**20
                step("unloading")
                mm.unload_all_models()
                step("making the model on cuda:0")
                m0, _ = make_gpu0()
                step("encoding on cuda:0")
                y0 = run(m0)
                out["ms_cuda0"] = timed(lambda: run(m0))
                out.update(compare(y1, y0))
                out["ran"] = True
                step("unloading")
                mm.unload_all_models()
                del m0, m1
                step("done")
        except Exception as e:  # noqa: BLE001 - the probe reports what failed and goes on
            out["ran"] = False
            out["error"] = f"{type(e).__name__}: {e}"
            out["traceback"] = traceback.format_exc()[-3000:]
        print(name, json.dumps({k: v for k, v in out.items() if k != "traceback"}, indent=1), flush=True)
        if "traceback" in out:
            print(out["traceback"], flush=True)
        res["cases"][name] = out

    recipe = Recipe()
    prompts = ["a cat on a mat", "a watercolor city at night", "portrait of an old man, 85mm, bokeh",
               "a red fox in the snow"]

    def quantized(dev):
        fake, _ = calibrate.quantize_clip(text_clip(dev), prompts, recipe, held_out=["a house by a lake"])
        return runtime.to_fp8_runtime(fake, "auto")

    case("text", "text: calibrated and run on cuda:1", lambda: quantized(gpu[1]), lambda: quantized(gpu[0]), encode_all)

    saved: dict = {}

    if "file" in args.cases.split(","):  # made before the case: its memory on cuda:0 is not the case's
        with torch.inference_mode():
            fp8, saved["plan"] = quantized(gpu[0])
            saved["paths"] = serialize.save_fp8_clip(fp8, Path(tempfile.mkdtemp(prefix="fp8clip-multigpu-")), "probe")
            del fp8
            mm.unload_all_models()

    def from_file(dev):
        clip, _ = serialize.load_fp8_clip(saved["paths"], model_options={"load_device": dev})
        return clip, saved["plan"]

    case("file", "text: calibrated on cuda:0, saved, loaded onto cuda:1", lambda: from_file(gpu[1]),
         lambda: from_file(gpu[0]), encode_all)

    vfile = args.vision_fixture
    if not vfile.exists():
        from harness.fixtures import write_clip_vision
        write_clip_vision(vfile)
    images = synthetic_images(16, seed=31)[0]

    def vision_model(dev):
        real = mm.text_encoder_device
        mm.text_encoder_device = lambda: dev  # what multi-GPU node packs do around ComfyUI's loaders
        try:
            cv = comfy.clip_vision.load(str(vfile))
        finally:
            mm.text_encoder_device = real
        fake, _ = vision.quantize_clip_vision(cv, None, Recipe(keep=vision.DEFAULT_VISION_KEEP, fp8_embedding=False))
        return runtime.to_fp8_runtime(fake, "auto")

    case("vision", "vision: calibrated and run on cuda:1", lambda: vision_model(gpu[1]), lambda: vision_model(gpu[0]),
         lambda cv: vision.embed(cv, images)[0])

    name = "multi_gpu_" + {"cudaMallocAsync": "async", "cpu": "cpu_dry_run"}.get(res["allocator"], "native") + ".json"
    (args.out / name).write_text(json.dumps(res, indent=1))
    return 0 if all(c.get("ran") for c in res["cases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
