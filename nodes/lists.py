"""ComfyUI list inputs. A node is run once per item of a list wired into it, unless it takes lists itself: a
prompt list from a prompt-batch node, or the image list of a folder loader, would calibrate once per prompt or
image and hand out as many CLIPs. The quantize nodes take lists (INPUT_IS_LIST) and calibrate once on all of
it; every other input must then hold one value."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from ..quant.errors import FP8ClipError


def unlist(inputs: Mapping[str, list], join: Mapping[str, Callable[[list], Any]]) -> dict[str, Any]:
    """The node's arguments: the inputs named in `join` merged by it, every other one's single value. A plain
    value (a script calling the node's FUNCTION as ComfyUI did before it took lists) counts as a list of one."""
    out = {}
    for name, values in inputs.items():
        values = values if isinstance(values, list) else [values]
        if name in join:
            out[name] = join[name](values)
        elif len(values) == 1:
            out[name] = values[0]
        else:
            raise FP8ClipError(f"'{name}' received a list of {len(values)} values, but this node takes one (it "
                               f"takes lists only for {' and '.join(join)}). Wire a single {name}, or one "
                               "quantize node per value.")
    return out


def prompts_of(values: list[str]) -> str | list[str]:
    """A prompts input: one value is text (typed into the widget, or a string wired in), one prompt per line;
    several are a prompt list, one prompt per item (quant.prompts.parse_prompts reads both)."""
    return str(values[0]) if len(values) == 1 else [str(v) for v in values]
