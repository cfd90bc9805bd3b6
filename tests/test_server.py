"""The pack in a real headless ComfyUI server: a workflow over HTTP, and the example workflows' node types."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from harness import fixtures
from harness.host import PACK_DIR, PACK_NAME, HeadlessServer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("server-base")
    files = fixtures.populate(base)
    with HeadlessServer(base, extra_args=("--disable-api-nodes",)) as s:
        s.files = files
        yield s


def test_workflow_over_http_quantizes_and_encodes(server):
    prompt = {
        "1": {"class_type": "CLIPLoader", "inputs": {"clip_name": server.files["clip_l"], "type": "stable_diffusion"}},
        "2": {"class_type": "FP8CLIPQuantize", "inputs": {
            "clip": ["1", 0], "calibration_prompts": "a cat on a sofa\n(a castle:1.2) at night\nanime girl, blue hair",
            "keep_high_precision": "*text_projection", "method": "max", "quantize": "weights+activations",
            "min_cosine": 0.99, "runtime": "auto", "fp8_token_embedding": True}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a lighthouse at sunrise"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 0], "text": "a lighthouse at sunrise"}},
        "5": {"class_type": "FP8CLIPCompareConditioning", "inputs": {"reference": ["4", 0], "candidate": ["3", 0]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    entry = server.run(prompt)
    report = entry["outputs"]["6"]["text"][0]
    print("\n" + report)
    assert report.startswith("FP8 E4M3 CLIP quality report: SD1.5 (CLIP-L)")
    assert float(re.search(r"conditioning\s+([\d.]+)", report).group(1)) > 0.99
    assert entry["outputs"]["2"]["text"][0] == report  # the node's own UI text
    cos = float(re.search(r"conditioning cosine ([\d.]+)", entry["outputs"]["5"]["text"][0]).group(1))
    assert 0.99 < cos < 1.0


def widget_inputs(info: dict) -> list[str]:
    """Inputs that are widgets (not links), in the order widgets_values stores them."""
    out = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            t = spec[0]
            if isinstance(t, list) or t in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                out.append(name)
                if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("image_upload"):
                    out.append("upload")
                if name in ("seed", "noise_seed") and t == "INT":
                    out.append("control_after_generate")
    return out


def test_example_workflows_open_without_missing_nodes(server):
    info = server.get("/object_info")
    workflows = sorted((PACK_DIR / "example_workflows").glob("*.json"))
    assert workflows
    for path in workflows:
        wf = json.loads(path.read_text())
        nodes = {n["id"]: n for n in wf["nodes"]}
        for n in wf["nodes"]:
            assert n["type"] in info, f"{path.name}: node type {n['type']} is not in this ComfyUI"
            assert len(n["widgets_values"]) == len(widget_inputs(info[n["type"]])), (path.name, n["type"])
        for lid, src, src_slot, dst, dst_slot, typ in wf["links"]:
            out_type = info[nodes[src]["type"]]["output"][src_slot]
            assert typ == out_type, f"{path.name}: link {lid} says {typ}, {nodes[src]['type']} gives {out_type}"
            name = nodes[dst]["inputs"][dst_slot]["name"]
            spec = {**info[nodes[dst]["type"]]["input"].get("required", {}),
                    **info[nodes[dst]["type"]]["input"].get("optional", {})}
            assert name in spec, f"{path.name}: {nodes[dst]['type']} has no input {name}"
            accepted = spec[name][0]
            assert accepted == "*" or typ in str(accepted).split(","), (path.name, lid, typ, accepted)


def test_report_widget_script_is_served(server):
    assert f"/extensions/{PACK_NAME}/js/fp8clip_report.js" in server.get("/extensions")
