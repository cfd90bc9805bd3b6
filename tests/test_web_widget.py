"""The report widget in ComfyUI's frontend: shown after a run, but never sent back as an input (it would change
the node's cache key, so every queue would calibrate again) nor saved among the workflow's widget values; the
text is kept in the node's properties, so a tab switch or a reload shows it again.

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
RELOAD_RULES = (r"\.properties=LiteGraph\.cloneObject\(this\.properties\)", r"this\.onConfigure\?\.\(\w+\)")

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
const node = new Node();
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
// A tab switch or a reload: LiteGraph saves the node (widget values, properties) and configures a new one from it.
const saved = JSON.parse(JSON.stringify({ widgets_values: workflow(), properties: node.properties }));
const reloaded = new Node();
reloaded.properties = saved.properties;
reloaded.onConfigure(saved);
const again = reloaded.widgets.find((w) => w.name === "fp8clip_report");
console.log(JSON.stringify({ before, after: prompt(), workflow: workflow(), failed,
                             shown: report().value, opacity: report().element.style.opacity,
                             min_height: report().options.getMinHeight?.(), css: report().element.style.cssText,
                             reloaded: { shown: again?.value, opacity: again?.element.style.opacity,
                                         widgets: reloaded.widgets.filter((w) => w.serialize !== false).length } }));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js to run the frontend extension")
def test_report_widget_shows_the_report_but_is_not_an_input_and_survives_a_reload(tmp_path):
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
    # Rebuilt from the saved workflow (a tab switch, a reload): the last report is back, dimmed, and the saved
    # widget values are still the node's inputs only (positional: an extra one would shift them).
    assert out["reloaded"] == {"shown": "FP8 E4M3 CLIP quality report\nCalibration: 64 prompts, 7.9 s",
                               "opacity": "0.45", "widgets": 1}


def test_the_frontend_still_skips_widgets_marked_so_and_restores_properties_on_reload():
    frontend = pytest.importorskip("comfyui_frontend_package")
    bundles = list((Path(frontend.__file__).parent / "static" / "assets").glob("*.js"))
    texts = [b.read_text(errors="ignore") for b in bundles]
    assert any(PROMPT_RULE in t for t in texts), \
        "the installed frontend no longer builds prompts with this rule: check the report widget against it"
    # LGraphNode.serialize saves the properties; configure restores them, then calls onConfigure (the reload).
    for rule in RELOAD_RULES:
        assert any(re.search(rule, t) for t in texts), f"the frontend no longer matches {rule!r}: check the reload"
