"""The pack in a real headless ComfyUI server: a workflow over HTTP, the example workflows' node types, and the
SD1.5 example workflow run whole against the same graph with the stock CLIP."""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request

import pytest

from harness import fixtures
from harness.host import PACK_DIR, PACK_NAME, HeadlessServer
from harness.workflows import bypass, psnr, saved_image, to_api, widget_names


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("server-base")
    files = fixtures.populate(base)
    with HeadlessServer(base, extra_args=("--disable-api-nodes",), frontend=True) as s:
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


def test_example_workflows_open_without_missing_nodes(server):
    info = server.get("/object_info")
    workflows = sorted((PACK_DIR / "example_workflows").glob("*.json"))
    assert workflows
    for path in workflows:
        wf = json.loads(path.read_text())
        nodes = {n["id"]: n for n in wf["nodes"]}
        for n in wf["nodes"]:
            assert n["type"] in info, f"{path.name}: node type {n['type']} is not in this ComfyUI"
            assert len(n["widgets_values"]) == len(widget_names(info[n["type"]]["input"])), (path.name, n["type"])
            # Every socket, optional ones too, as ComfyUI saves a node: the frontend takes a loaded node's inputs
            # from the file (the vision node's evaluation_images socket was missing).
            spec = info[n["type"]]["input"]
            sockets = [k for sec in ("required", "optional") for k, v in spec.get(sec, {}).items()
                       if not (isinstance(v[0], list) or v[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"))]
            assert [i["name"] for i in n["inputs"]] == sockets, (path.name, n["type"])
        for lid, src, src_slot, dst, dst_slot, typ in wf["links"]:
            out_type = info[nodes[src]["type"]]["output"][src_slot]
            assert typ == out_type, f"{path.name}: link {lid} says {typ}, {nodes[src]['type']} gives {out_type}"
            name = nodes[dst]["inputs"][dst_slot]["name"]
            spec = {**info[nodes[dst]["type"]]["input"].get("required", {}),
                    **info[nodes[dst]["type"]]["input"].get("optional", {})}
            assert name in spec, f"{path.name}: {nodes[dst]['type']} has no input {name}"
            accepted = spec[name][0]
            assert accepted == "*" or typ in str(accepted).split(","), (path.name, lid, typ, accepted)


def test_report_widget_script_is_served_and_its_imports_resolve(server):
    """The browser loads the script from the URL /extensions lists and resolves its imports against that URL:
    an import one folder too shallow (/extensions/scripts/app.js, 404) kept the extension from registering."""
    scripts = [u for u in server.get("/extensions") if u.startswith(f"/extensions/{PACK_NAME}/")]
    assert f"/extensions/{PACK_NAME}/fp8clip_report.js" in scripts
    for url in scripts:
        with urllib.request.urlopen(server.url + url, timeout=30) as r:
            source = r.read().decode()
        imports = re.findall(r"""^\s*import\b[^;]*?from\s+["']([^"']+)["']""", source, flags=re.M)
        assert imports, url
        for spec in imports:
            target = urllib.parse.urljoin(url, spec)
            try:
                with urllib.request.urlopen(server.url + target, timeout=30) as r:
                    assert "javascript" in r.headers.get("Content-Type", ""), (url, spec, target)
            except urllib.error.HTTPError as e:
                pytest.fail(f"{url} imports {spec!r}: {target} -> HTTP {e.code}")


def test_example_workflows_are_listed_in_the_template_browser(server):
    names = sorted(p.stem for p in (PACK_DIR / "example_workflows").glob("*.json"))
    assert sorted(server.get("/workflow_templates").get(PACK_NAME, [])) == names
    for name in names:  # what the browser fetches when a template is picked
        served = server.get(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert served == json.loads((PACK_DIR / "example_workflows" / f"{name}.json").read_text())


def example_prompt(server, name: str) -> dict:
    info = server.get("/object_info")
    wf = json.loads((PACK_DIR / "example_workflows" / name).read_text())
    return to_api(wf, lambda t: info[t]["input"])


def test_sd15_example_workflow_samples_the_image_the_original_clip_gives(server):
    """The shipped SD1.5 workflow, as the browser queues it, run end to end (calibrate, quantize, encode,
    sample, decode, save), against the same graph with the stock CLIP; only the checkpoint and the image size
    are changed (a seeded checkpoint with a small UNet, 64x64 px, so it samples on a CPU). For scale, the stock
    graph with another positive prompt gives a different picture."""
    prompt = example_prompt(server, "sd15_fp8_clip_txt2img.json")
    nodes = {n["class_type"]: k for k, n in prompt.items()}
    prompt[nodes["CheckpointLoaderSimple"]]["inputs"]["ckpt_name"] = server.files["sd15_ckpt"]
    prompt[nodes["EmptyLatentImage"]]["inputs"].update(width=64, height=64)
    q = nodes["FP8CLIPQuantize"]
    assert prompt[q]["inputs"]["runtime"] == "auto"

    stock = bypass(prompt, q, "clip")
    assert {n["class_type"] for n in stock.values()} == {n["class_type"] for n in prompt.values()} - {
        "FP8CLIPQuantize", "PreviewAny"}
    stock[nodes["SaveImage"]]["inputs"]["filename_prefix"] = "stock"
    other = json.loads(json.dumps(stock))
    positive = prompt[nodes["KSampler"]]["inputs"]["positive"][0]
    other[positive]["inputs"]["text"] = "a cat"
    other[nodes["SaveImage"]]["inputs"]["filename_prefix"] = "other"

    fp8_entry = server.run(prompt)
    report = fp8_entry["outputs"][nodes["PreviewAny"]]["text"][0]
    assert report.startswith("FP8 E4M3 CLIP quality report: SD1.5 (CLIP-L)")
    fp8_img, stock_img, other_img = (saved_image(server.base, e["outputs"], nodes["SaveImage"])
                                     for e in (fp8_entry, server.run(stock), server.run(other)))
    assert fp8_img.shape == stock_img.shape == (64, 64, 3)
    assert stock_img.std() > 5  # a picture, not a flat or black frame
    print(f"\nSD1.5 example workflow vs the stock CLIP: FP8 CLIP {psnr(fp8_img, stock_img):.1f} dB PSNR, "
          f"the stock CLIP with another prompt {psnr(other_img, stock_img):.1f} dB")
    assert (fp8_img != stock_img).any()  # the FP8 CLIP, not the original, conditioned it
    assert psnr(fp8_img, stock_img) > 25
    assert psnr(fp8_img, stock_img) > psnr(other_img, stock_img) + 10
