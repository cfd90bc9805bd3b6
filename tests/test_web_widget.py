"""The report widget in ComfyUI's frontend: shown after a run, but never sent back as an input (it would change
the node's cache key, so every queue would calibrate again) nor saved into workflows; a tab switch, which
builds the nodes again from the workflow, shows it again.

Runs web/js/fp8clip_report.js in Node.js against a stand-in for the frontend's node API. The rules the frontend
applies are checked against the frontend bundle installed with the test host."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.host import PACK_DIR

# What the frontend does with a node's widgets (comfyui-frontend-package): graphToPrompt skips widgets whose
# options.serialize is false when it builds the prompt; LGraphNode.serialize skips widget.serialize === false.
PROMPT_RULE = "options?.serialize===!1"
# LGraph.configure: the graph takes the workflow's id, each node its saved id and its graph, then is configured
# (LGraphNode.configure calls onConfigure last).
RELOAD_RULES = (r"_configureBase\(\w+\)\{const\{id:\w+", r"(\w)\.id=\w+\.id,this\.add\(\1,!0\)",
                r"this\.pinned&&\(this\.resizable=!1\),this\.onConfigure\?\.\(\w+\)")

RUNNER = r"""
globalThis.document = { createElement: () => ({ style: {}, value: "" }) };
const { registered } = await import("./scripts/app.js");
await import("./extensions/fp8clip/fp8clip_report.js");  // where ComfyUI serves it: /extensions/<pack>/
function Node() { this.widgets = [{ name: "calibration_prompts", value: "a cat", options: {} }]; }
Node.prototype.addDOMWidget = function (name, type, element, options = {}) {  // as the frontend's: value via getValue
  const w = { name, type, element, options: { hideOnZoom: true, ...options } };
  Object.defineProperty(w, "value", { get() { return this.options.getValue?.(); }, set(v) { this.options.setValue?.(v); } });
  this.widgets.push(w);
  return w;
};
Node.prototype.setDirtyCanvas = () => {};
await registered[0].beforeRegisterNodeDef(Node, { name: "FP8CLIPQuantize" });
const node = Object.assign(new Node(), { graph: { id: "workflow-1" }, id: 7 });
const prompt = () => Object.fromEntries(node.widgets.filter((w) => w.name && w.options?.serialize !== false)
                                                 .map((w) => [w.name, w.value]));
const workflow = () => node.widgets.filter((w) => w.serialize !== false).map((w) => w.value);
const before = prompt();
node.onExecuted({ text: ["FP8 E4M3 CLIP quality report", "Calibration: 64 prompts, 8.1 s"] });
const report = () => node.widgets.find((w) => w.name === "fp8clip_report");
node.onExecutionStart();  // the next queue; this one fails in the node: no report comes
const failed = { shown: report().value, opacity: report().element.style.opacity };
node.onExecutionStart();
node.onExecuted({ text: ["FP8 E4M3 CLIP quality report", "Calibration: 64 prompts, 7.9 s"] });
// A tab switch: the frontend saves the workflow (widget values, properties) and builds its nodes again, each
// given its graph and saved id before it is configured. A pasted copy (new id) and a node of another workflow
// (another graph id, same node id) are configured the same way.
const saved = JSON.parse(JSON.stringify({ widgets_values: workflow(), properties: node.properties ?? {} }));
const rebuilt = (graph, id) => {
  const n = new Node();
  Object.assign(n, { graph: { id: graph }, id, properties: structuredClone(saved.properties) });
  n.onConfigure(saved);
  return n.widgets.find((w) => w.name === "fp8clip_report");
};
const again = rebuilt("workflow-1", 7), copy = rebuilt("workflow-1", 8), other = rebuilt("workflow-2", 7);
console.log(JSON.stringify({ before, after: prompt(), workflow: workflow(), failed,
                             shown: report().value, opacity: report().element.style.opacity,
                             min_height: report().options.getMinHeight?.(), css: report().element.style.cssText,
                             saved, reloaded: { shown: again?.value, opacity: again?.element.style.opacity },
                             copy: copy?.value ?? null, other: other?.value ?? null }));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the frontend extension")
def test_report_widget_shows_the_report_but_is_not_an_input_and_survives_a_tab_switch(tmp_path):
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(
        "export const registered = [];\nexport const app = { registerExtension: (e) => registered.push(e) };\n")
    ext = tmp_path / "extensions" / "fp8clip"
    ext.mkdir(parents=True)
    shutil.copy(PACK_DIR / "web" / "js" / "fp8clip_report.js", ext / "fp8clip_report.js")
    (tmp_path / "run.js").write_text(RUNNER)
    r = subprocess.run(["node", "run.js"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["shown"] == "FP8 E4M3 CLIP quality report\nCalibration: 64 prompts, 7.9 s"
    assert out["after"] == out["before"] == {"calibration_prompts": "a cat"}  # same inputs: ComfyUI's cache hits
    assert out["workflow"] == ["a cat"]
    # A failed run leaves the last report dimmed, not looking like this run's; the next report is shown plainly.
    assert out["failed"] == {"shown": "FP8 E4M3 CLIP quality report\nCalibration: 64 prompts, 8.1 s", "opacity": "0.45"}
    assert out["opacity"] == ""
    # The frontend lays the node out for the box (getMinHeight); a CSS min-height drew it over the node below.
    assert out["min_height"] == 140 and "min-height" not in out["css"]
    # Rebuilt from the saved workflow (a tab switch): the last report is back, dimmed; a copy and another
    # workflow's node of the same id get none. The workflow itself holds no report (saving one would mark it
    # modified after each run and carry local paths into shared files).
    assert out["reloaded"] == {"shown": "FP8 E4M3 CLIP quality report\nCalibration: 64 prompts, 7.9 s",
                               "opacity": "0.45"}
    assert out["copy"] is None and out["other"] is None
    assert out["saved"] == {"widgets_values": ["a cat"], "properties": {}}


def test_the_frontend_still_skips_widgets_marked_so_and_restores_properties_on_reload():
    frontend = pytest.importorskip("comfyui_frontend_package")
    bundles = list((Path(frontend.__file__).parent / "static" / "assets").glob("*.js"))
    texts = [b.read_text(errors="ignore") for b in bundles]
    assert any(PROMPT_RULE in t for t in texts), \
        "the installed frontend no longer builds prompts with this rule: check the report widget against it"
    # A tab switch configures the workflow's nodes again: the report is found by graph id and node id.
    for rule in RELOAD_RULES:
        assert any(re.search(rule, t) for t in texts), f"the frontend no longer matches {rule!r}: check the reload"
