"""An FP8 CLIP after ComfyUI unloads it: encode, unload (outside inference mode, as /free and the UI's
"Unload Models" do, then inside it), encode again: the fake-quant runtime, and the FP8 runtime with and
without the FP8 token table.

    [PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync] python bench/probe_unload.py --comfy /path/to/ComfyUI
        [--dynamic-vram] [--fixture PATH] [--old-lookup]

Prints each tower's first tensors (device, dtype, inference tensor or not) after each step, whether the encode
after the unload matches the one before, on which device its token lookups ran and how long it took, and,
where the token lookup fails, which lookups fail. Found by
bench/probe_http_server.py; see bench/results/http_server_gpu.md.
"""
import argparse
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_text_encode import boot, load_fixture_clip, load_pack  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--comfy", required=True, type=Path)
ap.add_argument("--dynamic-vram", action="store_true")
ap.add_argument("--fixture", type=Path, default=Path("/tmp/fx/bench-clip_l.safetensors"))
ap.add_argument("--old-lookup", action="store_true", help="the token-table hand-out as before 2026-11-28")
args = ap.parse_args()
import torch  # noqa: E402

boot(args.comfy, [] if torch.cuda.is_available() else ["--cpu"], dynamic_vram=args.dynamic_vram)
print("allocator", torch.cuda.get_allocator_backend() if torch.cuda.is_available() else "CPU",
      "dynamic VRAM" if args.dynamic_vram else "static patcher", flush=True)
clip = load_fixture_clip(args.fixture)
pack = load_pack()
import comfy.model_management as mm  # noqa: E402
from comfyui_fp8_clip.quant import calibrate, fp8_ops, runtime  # noqa: E402
from comfyui_fp8_clip.quant.recipe import Recipe  # noqa: E402

_lookup = fp8_ops.FP8Embedding.forward


def traced_lookup(self, input, out_dtype=None):
    """The FP8 token lookup, saying on failure what its tensors are and which lookups fail."""
    try:
        return _lookup(self, input, out_dtype)
    except Exception as e:
        ws = self.weight_scale
        print("LOOKUP FAILED:", e, "| inference mode", torch.is_inference_mode_enabled(), "| input", input.device,
              "inference" if input.is_inference() else "normal", "| scales", ws.device,
              "inference" if ws.is_inference() else "normal", "pinned" if ws.is_pinned() else "", flush=True)
        idx = input.to(ws.device)
        for name, fn in (("index_select", lambda: ws.index_select(0, idx.flatten())), ("getitem", lambda: ws[idx]),
                         ("clone getitem", lambda: ws.clone()[idx])):
            try:
                fn()
                print("   ", name, "ok", flush=True)
            except Exception as e2:
                print("   ", name, "fails:", e2, flush=True)
        raise


fp8_ops.FP8Embedding.forward = traced_lookup


def show(fp8) -> None:
    for path, (m, _) in pack.quant.artifact.quantized_towers(fp8).items():
        for n, p in list(m.named_parameters())[:3]:
            print("  ", path, n, p.device, p.dtype, "inference" if p.is_inference() else "normal", flush=True)


def lookup_devices(model) -> list:
    """Devices the token lookups of `model`'s towers ran on in the next encode (a forward hook on each table)."""
    seen, hooks = [], []
    for path, (m, _) in pack.quant.artifact.quantized_towers(model).items():
        hooks.append(m.get_input_embeddings().register_forward_hook(lambda mod, i, o: seen.append(str(o.device))))
    return seen, hooks


if args.old_lookup:  # the proxy as before 2026-11-28: it handed out the table wherever the tower was
    from comfyui_fp8_clip.quant.proxy import TowerProxy  # noqa: E402
    TowerProxy.get_input_embeddings = lambda self: self.impl.get_input_embeddings()

cases = [("fake-quant", False), ("auto", True), ("auto", False)]
for runtime_name, fp8_embedding in cases:
    with torch.inference_mode():  # as in ComfyUI's executor
        fake, _ = calibrate.quantize_clip(clip, ["a cat", "a dog on a sofa"], Recipe(fp8_embedding=fp8_embedding),
                                          held_out=["a house"])
        fp8, plan = runtime.to_fp8_runtime(fake, runtime_name)
        print(f"runtime={runtime_name} plan:", plan.reason, flush=True)
        before = calibrate.encode(fp8, "a red fox")[0]
    show(fp8)
    for where in ("outside", "inside"):
        if where == "outside":
            mm.unload_all_models()
        else:
            with torch.inference_mode():
                mm.unload_all_models()
        print(f"runtime={runtime_name} fp8_embedding={fp8_embedding}: unloaded {where} inference mode", flush=True)
        show(fp8)
        seen, hooks = lookup_devices(fp8)
        try:
            with torch.inference_mode():
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                after = calibrate.encode(fp8, "a red fox")[0]
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) * 1e3
            cos = torch.nn.functional.cosine_similarity(before.flatten().double().cpu(),
                                                        after.flatten().double().cpu(), dim=0).item()
            print(f"  encode OK in {ms:.1f} ms, token lookups on {seen}, output on {after.device}, "
                  f"equal: {torch.equal(before.cpu(), after.cpu())} (cosine {cos:.6f})", flush=True)
        except Exception:
            traceback.print_exc()
            sys.stdout.flush()
        finally:
            for h in hooks:
                h.remove()
    del fake, fp8
