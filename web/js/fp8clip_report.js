// Shows the quality report of the FP8 CLIP nodes inside the node, after each run.
import { app } from "../../scripts/app.js";  // served at /extensions/<pack>/ (WEB_DIRECTORY)

app.registerExtension({
  name: "comfyui-fp8-clip.report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("FP8CLIP")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === "fp8clip_report");
      if (!widget) {
        // An output, not a setting. options.serialize: false keeps it out of the prompt sent to the server (as
        // an input it would change the node's cache key after every run, so each queue would recalibrate);
        // widget.serialize = false keeps it out of saved workflows.
        widget = this.addDOMWidget?.("fp8clip_report", "fp8clip_report", document.createElement("textarea"), {
          getValue: () => widget.element.value,
          setValue: (v) => { widget.element.value = v; },
          serialize: false,
        });
        if (!widget) return;
        widget.element.readOnly = true;
        widget.element.style.cssText = "width:100%;min-height:140px;font:11px monospace;white-space:pre;";
        widget.serialize = false;
      }
      widget.element.value = text;
      this.setDirtyCanvas?.(true, true);
    };
  },
});
