"""The main job on an embedded default: a real headless ComfyUI quantizes a CLIP-L to FP8 and reports.

    bash harness/setup.sh && .venv/bin/python -m harness.demo

The CLIP-L here is built from the real ViT-L/14 text config with SEEDED RANDOM WEIGHTS (no weights can be
downloaded in this project's workplace): the numbers show the machinery, not a trained CLIP's quality.
Pass --clip PATH to use a real clip_l safetensors file instead.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import fixtures  # noqa: E402
from harness.host import HeadlessServer  # noqa: E402
from quant.prompts import DEFAULT_CALIBRATION_TEXT  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", type=Path, help="a clip_l .safetensors file (default: seeded random fixture)")
    ap.add_argument("--prompt", default="a watercolor painting of a lighthouse on a cliff at sunrise")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="fp8clip-demo-") as tmp:
        base = Path(tmp)
        if args.clip:
            name = args.clip.name
            fixtures.link_into(args.clip.resolve(), base / "models" / "text_encoders" / name)
            print(f"CLIP-L: {args.clip}")
        else:
            name = fixtures.populate(base, only=("clip_l",))["clip_l"]
            print("CLIP-L: seeded RANDOM-WEIGHT fixture at the real ViT-L/14 text config (not a trained model)")
        prompt = {
            "1": {"class_type": "CLIPLoader", "inputs": {"clip_name": name, "type": "stable_diffusion"}},
            "2": {"class_type": "FP8CLIPQuantize", "inputs": {
                "clip": ["1", 0], "calibration_prompts": DEFAULT_CALIBRATION_TEXT,
                "keep_high_precision": "*text_projection", "method": "max", "quantize": "weights+activations",
                "min_cosine": 0.99, "runtime": "auto", "fp8_token_embedding": True}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": args.prompt}},
            "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": args.prompt}},
            "5": {"class_type": "FP8CLIPCompareConditioning", "inputs": {"reference": ["4", 0],
                                                                         "candidate": ["3", 0]}},
            "6": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
        }
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        print("starting a headless ComfyUI and queueing: CLIPLoader -> Quantize CLIP to FP8 -> CLIPTextEncode")
        with HeadlessServer(base, extra_args=("--disable-api-nodes",)) as server:
            entry = server.run(prompt)
        print()
        print(entry["outputs"]["6"]["text"][0])
        print(f"\nYour prompt {args.prompt!r}: {entry['outputs']['5']['text'][0]} (FP8 vs original)")
        report = entry["outputs"]["6"]["text"][0]
        return 1 if re.search(r"^WARNING", report, re.M) else 0


if __name__ == "__main__":
    sys.exit(main())
