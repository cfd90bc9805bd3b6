"""How much quality the quantization costs, in numbers a user can judge.

Two views: end to end (cosine similarity of the conditioning and pooled output against the unquantized
encoder, through ComfyUI's own encode path) and per layer (relative error of each quantized Linear's output
against the same input through its original weights), which names the layers to keep when the first is low.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .vram import make_room


def worst(values: Iterable[float]) -> float | None:
    """The lowest score (None for none); NaN if any is NaN: min() passes over a NaN that is not first, which
    would hide an encoder that gives NaN on some prompts behind the good scores of the others."""
    v = list(values)
    return None if not v else float("nan") if any(x != x for x in v) else min(v)


def below(value: float, threshold: float) -> bool:
    """Whether a score fails a threshold; NaN fails every threshold."""
    return not value >= threshold


@dataclass
class PromptScore:
    prompt: str
    cond_cosine: float  # mean per-token cosine over all rows of the conditioning
    cond_cosine_min_token: float
    pooled_cosine: float | None


def score(prompt: str, ref: tuple[torch.Tensor, torch.Tensor | None], got: tuple[torch.Tensor, torch.Tensor | None]
          ) -> PromptScore:
    (rc, rp), (gc, gp) = ref, got
    if rc.shape != gc.shape:
        raise RuntimeError(f"conditioning shape changed by quantization: {tuple(rc.shape)} -> {tuple(gc.shape)}")
    tok = F.cosine_similarity(rc.float().flatten(0, -2), gc.float().flatten(0, -2), dim=-1)
    pooled = None
    # A checkpoint without a tower's projection (SDXL's clip_l) leaves ComfyUI's projection uninitialized, so
    # that pooled output is noise the model never uses: no score rather than nan.
    if rp is not None and gp is not None and bool(torch.isfinite(rp).all()):
        pooled = float(F.cosine_similarity(rp.float().flatten(), gp.float().flatten(), dim=0))
    return PromptScore(prompt, float(tok.mean()), float(tok.min()), pooled)


class LayerErrorProbe:
    """Accumulates ||y_q - y_ref||^2 / ||y_ref||^2 per quantized Linear while the quantized model runs.

    `reference` holds each layer's original (pre-quantization) weight; y_ref uses it on the very input the
    quantized layer saw, so each layer's own error is measured, not the error it inherits.
    """

    def __init__(self, root: torch.nn.Module, reference: dict[str, torch.Tensor], keep: tuple = ()):
        """`keep`: the patchers running the quantized model, which ComfyUI must not unload to make room for
        the reference weights on the GPU."""
        self.reference = dict(reference)
        self._keep, self._room = keep, False
        self.err: dict[str, torch.Tensor | float] = {n: 0.0 for n in reference}
        self.ref_energy: dict[str, torch.Tensor | float] = {n: 0.0 for n in reference}
        self._handles = []
        modules = dict(root.named_modules())
        for name in reference:
            self._handles.append(modules[name].register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable:
        def hook(mod, args, out):
            x = args[0].float()
            if not self._room:  # all of them go to the GPU in the first encode: ComfyUI makes room first
                self._room = True
                make_room(sum(w.nbytes for w in self.reference.values() if w.device != x.device), x.device,
                          self._keep)
            # The weight moves to the input's device once, not per call (SDXL: 1.6 GB per prompt from the host),
            # and the sums stay there: no host sync per layer.
            w = self.reference[name] = self.reference[name].to(x.device)
            b = mod.bias.float().to(x.device) if getattr(mod, "bias", None) is not None else None
            ref = F.linear(x, w.float(), b)
            self.err[name] = self.err[name] + (out.float() - ref).pow(2).sum()
            self.ref_energy[name] = self.ref_energy[name] + ref.pow(2).sum()
        return hook

    def close(self) -> dict[str, float]:
        for h in self._handles:
            h.remove()
        self.reference.clear()
        err, energy = ({n: float(v) for n, v in d.items()} for d in (self.err, self.ref_energy))
        return {n: (err[n] / energy[n]) ** 0.5 if energy[n] > 0 else 0.0 for n in err}


def suggested_keep(worst_layers: list[tuple[str, float]], current: tuple[str, ...] = ()) -> list[str]:
    """The keep patterns to try next: the current ones plus the layer types of the worst layers."""
    kinds = [".".join(n.split(".")[-2:]) for n, _ in worst_layers]
    return list(dict.fromkeys([*current, *(f"*{k}" for k in kinds)]))


def keep_advice(layer_errors: dict[str, float], keep: tuple[str, ...], unmatched: list[str],
                fp8_embedding: bool = False, n: int = 3) -> str:
    """What to change when the quality is below the threshold. Patterns that match nothing are left out, and a
    keep list that would leave no layer in FP8 is not suggested (the node refuses it): that is said instead."""
    top = sorted(layer_errors.items(), key=lambda kv: -kv[1])[:n]
    names = ", ".join(f"{name} ({e:.1%})" for name, e in top)
    patterns = suggested_keep(top, tuple(p for p in keep if p not in unmatched))
    if all(any(fnmatch.fnmatchcase(name, p) for p in patterns) for name in layer_errors):
        table = "turn fp8_token_embedding off (the token table in FP8 costs quality too), or " if fp8_embedding else ""
        return (f"Worst layers by output error: {names}. Keeping more layers in high precision cannot reach it "
                f"(that would keep all {len(layer_errors)} FP8 layers): {table}lower min_cosine.")
    table = ("Turning fp8_token_embedding off can help too (the token table in FP8 costs quality as well). "
             if fp8_embedding else "")
    return f"Worst layers by output error: {names}. {table}Try keep_high_precision: {', '.join(patterns)}"


def unmatched_warning(pattern: str, layer_errors: dict[str, float]) -> str:
    example = next(iter(sorted(layer_errors)), "")
    return (f"Keep pattern {pattern!r} matches no layer. Patterns match full layer names as this report prints them"
            + (f", such as {example}" if example else "") + "; a leading * matches any prefix.")


class TowerCapture:
    """Records what each tower's transformer returns (the hidden state the conditioning uses, and the pooled
    output), so a bundle's report can say how much each tower lost.

    `owners`: each tower's ComfyUI encoder (SDClipModel), whose `return_projected_pooled` says which pooled
    output the model uses: SD3's CLIPs give the unprojected one."""

    def __init__(self, modules: dict[str, torch.nn.Module], owners: dict[str, object] | None = None):
        self.last: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._owners = owners or {}
        self._handles = [m.register_forward_hook(self._hook(n), with_kwargs=True) for n, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def hook(mod, args, kwargs, out):
            # The output ComfyUI takes: its encoder's `layer` decides, as in SDClipModel.forward ("last" also when
            # clip skip is beyond this tower's depth, SDXL's CLIP-L at -13..-24, though an index is still passed).
            layer = getattr(self._owners.get(name), "layer", None)
            if layer is None:  # no ComfyUI encoder known
                hidden = out[1] if isinstance(kwargs.get("intermediate_output"), int) and out[1] is not None else out[0]
            else:
                hidden = out[0] if layer == "last" or out[1] is None else out[1]
            projected = getattr(self._owners.get(name), "return_projected_pooled", True)
            pooled = out[2] if len(out) > 2 else None
            if not projected and len(out) > 3 and out[3] is not None:
                pooled = out[3]
            self.last[name] = (hidden.detach().float(), None if pooled is None else pooled.detach().float())
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass
class TowerSummary:
    name: str
    quantized: int
    kept: list[str]
    cond: list[float] = field(default_factory=list)  # per held-out prompt
    pooled: list[float] = field(default_factory=list)
    pooled_used: bool = True  # False: the bundle passes another tower's pooled output on (SDXL's CLIP-L)


@dataclass
class QualityReport:
    family: str
    scope: str
    method: str
    towers: list[TowerSummary]
    prompts: list[PromptScore]
    layer_errors: dict[str, float]
    calibration_prompts: int
    calibration_seconds: float
    evaluation_seconds: float
    min_cosine: float
    keep: tuple[str, ...] = ()
    passed_through: tuple[str, ...] = ()
    unmatched_patterns: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fp8_embedding: bool = False  # the towers' token tables in FP8 (one scale per row)
    overlap: int = 0  # held-out prompts that are calibration prompts too
    reused: str = ""  # set when this report and its scales come from an earlier run (calibration_memo)
    pooled_used: bool = True  # False where only GLIGEN reads the pooled output (SD1.5, SD2)

    @property
    def cond_min(self) -> float:
        return worst(p.cond_cosine for p in self.prompts)

    @property
    def cond_mean(self) -> float:
        return sum(p.cond_cosine for p in self.prompts) / len(self.prompts)

    @property
    def pooled_min(self) -> float | None:
        v = [p.pooled_cosine for p in self.prompts if p.pooled_cosine is not None]
        return worst(v)

    @property
    def pooled_mean(self) -> float | None:
        v = [p.pooled_cosine for p in self.prompts if p.pooled_cosine is not None]
        return sum(v) / len(v) if v else None

    def worst_layers(self, n: int = 5) -> list[tuple[str, float]]:
        return sorted(self.layer_errors.items(), key=lambda kv: -kv[1])[:n]

    @property
    def per_tower(self) -> bool:
        """Whether each tower's own scores are shown (and checked): a bundle, or a CLIP beside a T5."""
        return len(self.towers) > 1 or bool(self.passed_through)

    def checks(self) -> list[tuple[str, float]]:
        """The worst score of each measure the threshold applies to. Each tower's own output counts, not only
        the whole conditioning: SD3's also holds T5's tokens, which quantization leaves as they are (a CLIP-L
        at 0.983 on its own scored 0.9915 there), and SDXL's mixes a weak tower with a strong one. The pooled
        output only where the model reads it (not SD1.5's or SD2's)."""
        out = [("conditioning", self.cond_min)]
        if self.pooled_min is not None and self.pooled_used:
            out.append(("pooled", self.pooled_min))
        for t in self.towers if self.per_tower else ():
            if t.cond:
                out.append((f"{t.name} hidden", worst(t.cond)))
            if t.pooled and self.pooled_used and t.pooled_used:
                out.append((f"{t.name} pooled", worst(t.pooled)))
        return out

    @property
    def below_threshold(self) -> bool:
        return any(below(v, self.min_cosine) for _, v in self.checks())

    def warnings(self) -> list[str]:
        out = [unmatched_warning(p, self.layer_errors) for p in self.unmatched_patterns]
        if self.overlap:
            out.append(f"{self.overlap} of the {len(self.prompts)} evaluation prompts are calibration prompts too: "
                       "their scores are not held out and can look better than the quantization is. Evaluate on "
                       "prompts that are not in the calibration text.")
        if self.below_threshold:
            low = ", ".join(f"{n} {v:.5f}" for n, v in self.checks() if below(v, self.min_cosine))
            out.append(f"Quality below your threshold {self.min_cosine:.6g} (worst prompt: {low}). "
                       + keep_advice(self.layer_errors, self.keep, self.unmatched_patterns, self.fp8_embedding))
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(cond_min=self.cond_min, cond_mean=self.cond_mean, pooled_min=self.pooled_min,
                 pooled_mean=self.pooled_mean, warnings=self.warnings())
        return d

    def text(self) -> str:
        def f(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"
        lines = [f"FP8 E4M3 CLIP quality report: {self.family}, {self.scope}, per-tensor static scales"]
        for t in self.towers:
            # Full names: the keep patterns match those, so a name copied from here works as one.
            kept = "all" if t.quantized == 0 else ", ".join(f"{t.name}.{k}" for k in t.kept) if t.kept else "none"
            lines.append(f"  {t.name}: {t.quantized} Linear layers in FP8; kept in high precision: {kept}")
        if self.fp8_embedding:  # a tower whose layers are all kept still changes by its table
            names = ", ".join(t.name for t in self.towers)
            lines.append(f"  token embedding table in FP8, one scale per row: {names}")
        lines += [f"  {n}: passed through unchanged (not a CLIP tower)" for n in self.passed_through]
        lines += [
            f"Cosine vs the unquantized encoder on {len(self.prompts)} held-out prompts (min / mean):",
            f"  conditioning  {f(self.cond_min)} / {f(self.cond_mean)}",
            f"  pooled        {f(self.pooled_min)} / {f(self.pooled_mean)}"
            + ("" if self.pooled_used else f" ({self.family.split(' (')[0]} models read it only through GLIGEN text "
                                           "boxes; not held to min_cosine)"),
        ]
        if self.passed_through:
            lines.append(f"  (the conditioning holds {', '.join(self.passed_through)}'s output too, unchanged: "
                         "the lines below are what quantization changed)")
        if self.per_tower:
            for t in self.towers:
                lines.append(f"  {t.name} alone: hidden {f(worst(t.cond))} / "
                             f"{f(sum(t.cond) / len(t.cond) if t.cond else None)}, pooled "
                             + (f"{f(worst(t.pooled))}" if t.pooled_used else
                                f"not used ({self.family.split(' (')[0]} models read another tower's)"))
        lines += [
            f"Calibration: {calibrated_on(self.scope, self.calibration_prompts, 'prompts')}, method '{self.method}', "
            f"{self.calibration_seconds:.1f} s (evaluation {self.evaluation_seconds:.1f} s)",
        ] + ([self.reused] if self.reused else []) + [
            "Largest per-layer output errors: " + ", ".join(f"{n} {e:.1%}" for n, e in self.worst_layers(3)),
        ]
        lines += [f"{n}" for n in self.notes]
        lines += [f"WARNING: {w}" for w in self.warnings()]
        return "\n".join(lines)


def calibrated_on(scope: str, n: int, what: str) -> str:
    """The report's word on the calibration data: none for weights only, whose scales come from the weights."""
    return f"{n} {what}" if scope != "weights only" else f"no {what} (weights only: scales from the weights)"


def encode_all(prompts: Iterable[str], encode: Callable[[str], tuple], modules: dict[str, torch.nn.Module],
               each: Callable[[], None] = lambda: None, owners: dict[str, object] | None = None
               ) -> list[tuple[tuple, dict]]:
    """(encode(p), what each tower returned) for every prompt, one model after the other: a switch between the
    input CLIP and the quantized clone makes ComfyUI load the model again (quant/patching.py), so alternating
    per prompt reloaded it twice a prompt (Flux's 9.5 GB T5-XXL: quantizing did not finish in 8 minutes)."""
    out = []
    for p in prompts:
        cap = TowerCapture(modules, owners)
        try:
            out.append((encode(p), dict(cap.last)))
        finally:
            cap.close()
        each()
    return out


def evaluate(prompts: Iterable[str], refs: list[tuple[tuple, dict]], encode_q: Callable[[str], tuple],
             towers: list[TowerSummary], q_modules: dict[str, torch.nn.Module],
             step: Callable[[], None] = lambda: None, owners: dict[str, object] | None = None
             ) -> list[PromptScore]:
    """End-to-end scores per prompt against `refs` (`encode_all` of the original); per-tower scores are appended
    to `towers`."""
    prompts = list(prompts)
    got = encode_all(prompts, encode_q, q_modules, step, owners)
    scores = []
    for p, (ref, ref_towers), (q, q_towers) in zip(prompts, refs, got):
        scores.append(score(p, ref, q))
        for t in towers:
            if t.name in ref_towers and t.name in q_towers:
                s = score(p, ref_towers[t.name], q_towers[t.name])
                t.cond.append(s.cond_cosine)
                if s.pooled_cosine is not None:
                    t.pooled.append(s.pooled_cosine)
    return scores


def compare_conditioning(reference: list, candidate: list) -> tuple[float, float | None, str]:
    """Mean per-token cosine and pooled cosine between two CONDITIONING lists ([[cond, {...}], ...])."""
    from .errors import FP8ClipError

    if len(reference) != len(candidate):
        raise FP8ClipError(f"The conditionings have {len(reference)} and {len(candidate)} entries; encode the "
                           "same prompt with both CLIPs.")
    conds, pooled = [], []
    for (rc, rd), (cc, cd) in zip(reference, candidate):
        if rc.shape != cc.shape:
            raise FP8ClipError(f"Conditioning shapes differ ({tuple(rc.shape)} vs {tuple(cc.shape)}); encode "
                               "the same prompt with both CLIPs.")
        s = score("", (rc, rd.get("pooled_output")), (cc, cd.get("pooled_output")))
        conds.append(s.cond_cosine)
        if s.pooled_cosine is not None:
            pooled.append(s.pooled_cosine)
    if not conds:
        raise FP8ClipError("The conditionings are empty: connect the outputs of two CLIPTextEncode nodes.")
    c = worst(conds)
    p = worst(pooled)
    text = f"conditioning cosine {c:.5f}" + ("" if p is None else f", pooled cosine {p:.5f}")
    return c, p, text
