"""Fused kernels without CUDA graphs on cuda:1 while cuda:0 is current (the path after a failed capture).

On a machine with two GPUs, from the repository root (torch and Triton only):
    python3 bench/probe_fused_other_gpu.py runner   # through FP8Runner.run_layers: equal to a run with cuda:1
                                                    # current, and still fused
    python3 bench/probe_fused_other_gpu.py before   # the kernels called as the runner did before 0c6f891
Small seeded layers (tests/test_fused_kernels.py: small_fp8_layers). Result: cuda_malloc_async_fused_h200.md.
"""
import importlib, sys
import torch
sys.path[:0] = ["tests", "."]
tfk = importlib.import_module("test_fused_kernels")
enc = importlib.import_module("quant.fp8_encoder")
fused = importlib.import_module("quant.fp8_fused")
mode = sys.argv[1]
layers = tfk.small_fp8_layers(64, 4).to("cuda:1")
for m in layers.modules():
    if hasattr(m, "mode"):
        m.mode = "scaled_mm"
class R(enc.FP8Runner):
    def encoder_layers(self):
        return layers
r = R(); r.fused = True; r.act_dtype = torch.float32
x = torch.randn(2, 9, 64, device="cuda:1", generator=torch.Generator("cuda:1").manual_seed(0))
mask = torch.full((9, 9), -torch.finfo(torch.float32).max, device="cuda:1").triu_(1)
with torch.no_grad():
    with torch.cuda.device(1):
        ref = fused.run_layers(x, layers, mask, None, torch.float32)[0]
    torch.cuda.set_device(0)
    if mode == "runner":
        got = r.run_layers(x, mask, None)[0]
    else:  # the call as it was before the fix
        got = fused.run_layers(x, layers, mask, None, torch.float32)[0]
    torch.cuda.synchronize(1)
print(mode, "current", torch.cuda.current_device(), "equal", torch.equal(got, ref), "still fused", r.fused, flush=True)
