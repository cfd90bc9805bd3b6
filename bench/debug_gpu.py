"""One-off GPU diagnosis: where an encode spends its time (stock and FP8), per cProfile."""
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_text_encode as b

COMFY, FX, EXECUTOR = sys.argv[1], sys.argv[2], sys.argv[3]
b.boot(Path(COMFY), [])
import comfy.sd
import torch

clip = comfy.sd.load_clip(ckpt_paths=[str(b.fixture(Path(FX)))], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
pack = b.load_pack()
from comfyui_fp8_clip.quant import calibrate, runtime
from comfyui_fp8_clip.quant.recipe import Recipe
import modelopt.torch.quantization.tensor_quant as tq

tq.get_cuda_ext_fp8 = lambda *a, **k: None


def prof(c, label):
    t = "a watercolor painting of a lighthouse"
    for _ in range(20):
        b.clip_text_encode(c, t)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        b.clip_text_encode(c, t)
    torch.cuda.synchronize()
    print(f"== {label}: {(time.perf_counter() - t0) / 50 * 1e3:.2f} ms per encode")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(20):
        b.clip_text_encode(c, t)
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("cumulative").print_stats(28)
    pstats.Stats(pr).sort_stats("tottime").print_stats(12)


with torch.inference_mode():
    prof(clip, "stock")
    fake, rep = calibrate.quantize_clip(clip, ["a cat", "a dog on a beach", "(a castle:1.2)"], Recipe(), held_out=["a house"])
    fp8, plan = runtime.to_fp8_runtime(fake, "fp8")
    for m, _ in pack.quant.artifact.quantized_towers(fp8).values():
        m.configure(lambda d: runtime.Plan("fp8", "scaled_mm", EXECUTOR, "float32", "debug"))
    prof(fp8, f"fp8 {EXECUTOR}")
    import comfy.model_management as mm
    mm.unload_all_models()  # moves weights: graphs must be recaptured in a fresh pool
    prof(fp8, f"fp8 {EXECUTOR} after unload")
