// Shows the quality report of the FP8 CLIP nodes inside the node, after each run.
import { app } from "../../scripts/app.js";  // served at /extensions/<pack>/ (WEB_DIRECTORY)

const REPORT = "fp8clip_report";
const HEIGHT = 140;  // px: a few lines of the report; the node grows to hold it
const EARLIER = "From an earlier run in this session (the workflow was loaded again, as a tab switch does); " +
                "the report of the next run replaces it.";
// The last report of each node in this browser session, by workflow (graph id) and node id: a tab switch
// rebuilds the nodes from the workflow, and the widget with them. Not in the workflow itself: saving it there
// would mark the workflow modified after every run and carry local paths into shared files and images.
const reports = new Map();
const key = (node) => `${node.graph?.id ?? ""}:${node.id}`;

function reportWidget(node) {
  let widget = node.widgets?.find((w) => w.name === REPORT);
  if (!widget) {
    // An output, not a setting. options.serialize: false keeps it out of the prompt sent to the server (as an
    // input it would change the node's cache key after every run, so each queue would recalibrate);
    // widget.serialize = false keeps it out of saved workflows (and their positional widget values).
    // getMinHeight: the frontend lays the node out for it (a CSS min-height instead drew the box over the node
    // below).
    widget = node.addDOMWidget?.(REPORT, REPORT, document.createElement("textarea"), {
      getValue: () => widget.element.value,
      setValue: (v) => { widget.element.value = v; },
      getMinHeight: () => HEIGHT,
      serialize: false,
    });
    if (!widget) return null;
    widget.element.readOnly = true;
    widget.element.className = "comfy-multiline-input";  // the theme's colours, as ComfyUI's text boxes
    widget.element.style.cssText = "font:11px monospace;white-space:pre;";
    widget.serialize = false;
  }
  return widget;
}

function show(node, text, earlier) {
  const widget = reportWidget(node);
  if (!widget) return;
  widget.element.value = text;
  widget.element.style.opacity = earlier ? "0.45" : "";
  widget.element.title = earlier ? EARLIER : "";
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "comfyui-fp8-clip.report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("FP8CLIP")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      reports.set(key(this), text);
      show(this, text, false);
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      onConfigure?.apply(this, arguments);
      const text = reports.get(key(this));  // LGraph.configure gives the node its graph and saved id first
      if (text) show(this, text, true);
    };
    // A run that fails sends no report: the last one stays, dimmed, so that it is not read as this run's.
    const onExecutionStart = nodeType.prototype.onExecutionStart;
    nodeType.prototype.onExecutionStart = function () {
      onExecutionStart?.apply(this, arguments);
      const widget = this.widgets?.find((w) => w.name === REPORT);
      if (widget?.element) {
        widget.element.style.opacity = "0.45";
        widget.element.title = "From the previous run; the report of this run replaces it when the node has run.";
      }
    };
  },
});
