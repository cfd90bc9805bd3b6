"""A remembered calibration on the GPU: is the CLIP rebuilt from it the same as the one calibrated?

    python bench/probe_memo_rebuild.py --comfy /path/to/ComfyUI [--family sd15|sdxl] [--fixture PATH]

What a user does who changes only the quantize node's runtime: `quantize_clip` runs a second time on the same
CLIP with the same prompts and recipe, which takes the calibration from quant/calibration_memo.py instead of
calibrating again. For the fake-quant CLIP and the FP8 runtime built from each, prints the largest difference
between the first and the rebuilt CLIP's conditioning and pooled output on a few prompts, next to the same CLIP
encoding twice (the GPU's own run-to-run difference, for scale); then the first fake-quant CLIP converted a second
time, both without CUDA graphs, and which FP8 tensors and calibrated scales differ (bench/results/memo_rebuild_h200.md).
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_text_encode import boot, eager_modelopt, load_fixture_clip, load_pack  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--comfy", required=True, type=Path)
ap.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
ap.add_argument("--fixture", type=Path, default=Path("/tmp/fx/bench-clip_l.safetensors"))
args = ap.parse_args()
import torch  # noqa: E402

boot(args.comfy, [] if torch.cuda.is_available() else ["--cpu"])
clip = load_fixture_clip(args.fixture, family=args.family)
load_pack()
from comfyui_fp8_clip.quant import artifact, calibrate, runtime  # noqa: E402
from comfyui_fp8_clip.quant.prompts import CALIBRATION_PROMPTS, HELD_OUT_PROMPTS  # noqa: E402

if torch.cuda.is_available():
    eager_modelopt()
prompts = ["a red fox in a snowy forest, golden hour", "portrait of an old fisherman, dramatic lighting",
           "a castle on a hill " * 12]  # the last: 2 rows of 77 tokens


def outputs(c) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    got = []
    for p in prompts:
        cond, pooled = calibrate.encode(c, p)
        got.append((cond.float().cpu(), None if pooled is None else pooled.float().cpu()))
    return got


def diff(a, b) -> str:
    worst = max(max((x - y).abs().max().item() for x, y in zip(pa, pb) if x is not None) for pa, pb in zip(a, b))
    same = all(all(x is None or torch.equal(x, y) for x, y in zip(pa, pb)) for pa, pb in zip(a, b))
    return "bit-identical" if same else f"max abs difference {worst:.3g}"


with torch.inference_mode():
    held = list(HELD_OUT_PROMPTS)
    runs = []
    for i in range(2):
        t0 = time.perf_counter()
        fake, report = calibrate.quantize_clip(clip, list(CALIBRATION_PROMPTS), held_out=held)
        where = {p: str(next(m.parameters()).device) for p, (m, _) in artifact.quantized_towers(fake).items()}
        fp8, plan = runtime.to_fp8_runtime(fake, "auto")
        runs.append((fake, fp8, report, time.perf_counter() - t0))
        print(f"run {i + 1}: quantize_clip + auto runtime {runs[-1][3]:.1f} s; reused: {report.reused or 'no'}; "
              f"{plan.reason}; converted from towers on {where}", flush=True)
    (fake1, fp81, _, _), (fake2, fp82, _, _) = runs
    f1, f1b, f2 = outputs(fake1), outputs(fake1), outputs(fake2)
    r1, r1b, r2 = outputs(fp81), outputs(fp81), outputs(fp82)
    r1c = outputs(fp81)  # after the other runtime ran: do two live FP8 CLIPs disturb each other?
    where = {p: str(next(m.parameters()).device) for p, (m, _) in artifact.quantized_towers(fake1).items()}
    print(f"fake-quant towers before the second conversion: {where}")
    fp81b, _ = runtime.to_fp8_runtime(fake1, "auto")  # the first fake-quant CLIP converted again
    r1d = outputs(fp81b)
    eager = []
    for c in (fp81, fp82):
        for m, _ in artifact.quantized_towers(c).values():
            m.configure(lambda d: runtime.Plan("fp8", "scaled_mm", "eager", "float32", "probe", "fused"))
        eager.append(outputs(c))


def tensors_differ(a, b) -> list[str]:
    """Names of the quantized towers' tensors (FP8 weights, scales, norms) that are not bit-identical."""
    out = []
    for (path, (ma, _)), (_, (mb, _)) in zip(artifact.quantized_towers(a).items(),
                                             artifact.quantized_towers(b).items()):
        sa, sb = ({k: (v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v).cpu()
                   for k, v in m.state_dict().items()} for m in (ma, mb))
        for k in sa:
            if k not in sb or sa[k].shape != sb[k].shape:
                out.append(f"{path}.{k} (missing or another shape)")
            elif not torch.equal(sa[k], sb[k]):
                n = int((sa[k] != sb[k]).sum())
                out.append(f"{path}.{k} ({n} of {sa[k].numel()} elements; {ma.state_dict()[k].device} vs "
                           f"{mb.state_dict()[k].device})")
    return out


def records_differ(a, b) -> list[str]:
    out = []
    for (path, (_, ra)), (_, (_, rb)) in zip(artifact.quantized_towers(a).items(), artifact.quantized_towers(b).items()):
        out += [f"{path}:{k} {ra.scales[k]} vs {rb.scales.get(k)}" for k in ra.scales if ra.scales[k] != rb.scales.get(k)]
    return out
print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, family {args.family}, "
      f"{len(prompts)} prompts (conditioning and pooled)")
print(f"fake-quant, first CLIP encoding twice:        {diff(f1, f1b)}")
print(f"fake-quant, first vs rebuilt from the memo:   {diff(f1, f2)}")
print(f"fp8 runtime, first CLIP encoding twice:       {diff(r1, r1b)}")
print(f"fp8 runtime, first vs rebuilt from the memo:  {diff(r1, r2)}")
print(f"fp8 runtime, first CLIP again after the rebuilt one ran: {diff(r1, r1c)}")
print(f"fp8 runtime, first fake-quant CLIP converted a second time: {diff(r1, r1d)}")
print(f"fp8 runtime, eager (no CUDA graphs), first vs rebuilt: {diff(*eager)}")
d = tensors_differ(fp81, fp82)
print(f"FP8 towers' tensors that differ, first vs rebuilt: {len(d)}", *d[:12], sep="\n  ")
d = records_differ(fake1, fake2)
print(f"calibrated scales that differ, first vs rebuilt: {len(d)} {d[:4]}")
