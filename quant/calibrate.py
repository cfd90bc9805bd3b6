"""CLIP in -> calibrated FP8 (Q->DQ) CLIP out, with its quality report.

Calibration runs through ComfyUI's own encode path (tokenizer, weights, long prompts as extra rows,
textual-inversion embeddings, clip skip), so the activation scales are fitted to exactly what the
transformer sees in a workflow.
"""
from __future__ import annotations

import hashlib
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator, Sequence

import torch

from . import artifact, calibration_memo, modelopt_bridge
from .errors import FP8ClipError
from .fidelity import LayerErrorProbe, QualityReport, TowerSummary, encode_all, evaluate
from .fp8_ops import require_fp8_storage
from .patching import (checkpoint_dtype, clone_with, fake_quant_embedding, patched_copy, to_float32, weight_bytes,
                       weights_fingerprint)
from .prompts import HELD_OUT_PROMPTS
from .proxy import HOOKS_FIX, hooked_weights, load_towers
from .recipe import Recipe, fingerprint
from .towers import text_family

Progress = Callable[[int, int], None]


CLIP_TOKEN_KEYS = ("l", "g", "h")  # the tokenizer's keys for the clip_l / clip_g / clip_h towers
PROMPTS_PER_CALIBRATION_ENCODE = 16
# And at most this many rows of 77 tokens per call: sixteen long prompts made one batch of hundreds of rows, whose
# activations (SDXL's CLIP-G in fp32, beside its calibration copy) could exceed a card that encodes each prompt.
ROWS_PER_CALIBRATION_ENCODE = 32


def encode(clip: Any, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    return clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)


def token_key(clip: Any, prompt: str) -> Any:
    """What the encoder sees of `prompt` (its tokens and weights; case, spacing and weights of 1 do not change
    it), as something to compare: two prompts with the same key give the same conditioning."""
    def norm(x: Any) -> Any:
        if isinstance(x, torch.Tensor):  # a textual-inversion embedding in place of a token
            t = x.detach().to("cpu", torch.float32).contiguous()
            return "tensor", tuple(t.shape), hashlib.sha256(t.numpy().tobytes()).hexdigest()
        if isinstance(x, dict):
            return tuple(sorted((k, norm(v)) for k, v in x.items()))
        if isinstance(x, (list, tuple)):
            return tuple(norm(i) for i in x)
        return x
    return norm(clip.tokenize(prompt))


_LOOKUP = "_try_get_embedding"  # ComfyUI's SDTokenizer method that finds an `embedding:` file, None if none
_lookup_lock = threading.RLock()


def _word_tokenizers(tokenizer: Any) -> list[Any]:
    """The per-encoder tokenizers inside a CLIP's tokenizer (SDXL: clip_l and clip_g; SD3: and t5xxl)."""
    found, todo, seen = [], [(tokenizer, 0)], set()
    while todo:
        t, depth = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if callable(getattr(t, _LOOKUP, None)):
            found.append(t)
        if depth < 2:
            todo += [(v, depth + 1) for v in vars(t).values() if hasattr(v, "tokenize_with_weights")] \
                if hasattr(t, "__dict__") else []
    return found


@contextmanager
def missing_embeddings(clip: Any) -> Iterator[list[str]]:
    """The `embedding:` names `clip`'s tokenizer drops inside this block, in this thread, because no file has
    them (ComfyUI only logs a warning, as for CLIPTextEncode, and `--verbose ERROR` hides even that), in order,
    without repeats. Watches the tokenizers' own lookup for the block's length only: a tokenizer deep-copied
    later must not keep a hook bound to this one."""
    found: list[str] = []
    me = threading.get_ident()
    with _lookup_lock:  # blocks of two threads on one shared tokenizer would restore each other's hooks
        hooked = []
        for tok in _word_tokenizers(getattr(clip, "tokenizer", None)):
            own = vars(tok).get(_LOOKUP)

            def lookup(name: str, _real=getattr(tok, _LOOKUP)) -> tuple:
                result = _real(name)
                if result[0] is None and threading.get_ident() == me:
                    # v0.29 returns the name it looked up; older versions the lookup's leftover only
                    tried = result[1] if len(result) == 3 else (name.split() or [name])[0]
                    tried = tried.rstrip(",")
                    if tried and tried not in found:
                        found.append(tried)
                return result
            setattr(tok, _LOOKUP, lookup)
            hooked.append((tok, own))
        try:
            yield found
        finally:
            for tok, own in reversed(hooked):
                if own is None:
                    delattr(tok, _LOOKUP)
                else:
                    setattr(tok, _LOOKUP, own)


def report_notes(unusable: Sequence[str], missing: Sequence[str]) -> list[str]:
    out = []
    if unusable:
        out.append("Kept as they are, weights not finite (NaN/inf; e.g. a projection the checkpoint lacks, which "
                   f"ComfyUI leaves uninitialized): {', '.join(unusable)}")
    if missing:
        out.append(f"Not found, so left out of the prompts as CLIPTextEncode leaves them out: "
                   f"{', '.join('embedding:' + n for n in missing)}. Put the file in models/embeddings, or fix the name.")
    return out


def calibration_groups(clip: Any, prompts: Sequence[str]) -> list[list[str]]:
    """The prompts in groups for `encode_together`: in order, at most PROMPTS_PER_CALIBRATION_ENCODE prompts and
    ROWS_PER_CALIBRATION_ENCODE rows each (a prompt longer than that alone)."""
    groups: list[list[str]] = []
    rows = 0
    for p in prompts:
        # its rows in the widest CLIP tower, plus one: ComfyUI adds an empty row to a call with a weight other
        # than 1 (once a call, counted here once a prompt: an upper bound)
        n = 1 + max((len(r) for k, r in clip.tokenize(p).items() if k in CLIP_TOKEN_KEYS), default=1)
        if not groups or len(groups[-1]) >= PROMPTS_PER_CALIBRATION_ENCODE or rows + n > ROWS_PER_CALIBRATION_ENCODE:
            groups.append([])
            rows = 0
        groups[-1].append(p)
        rows += n
    return groups


def encode_together(clip: Any, prompts: Sequence[str]) -> None:
    """Run several calibration prompts through ComfyUI's encode path in one transformer call.

    Each prompt's 77-token rows become rows of one batch, as ComfyUI runs a long prompt, so every tower sees the
    same rows as prompt by prompt; per-tensor amax (max, and mse's search over it) does not depend on how rows
    are grouped. One call instead of N matters on a GPU, where ModelOpt's calibrators cost a host sync per
    quantizer per call. Other encoders of the bundle (T5) get the first prompt only: they are not calibrated.
    """
    merged = clip.tokenize(prompts[0])
    for p in prompts[1:]:
        for k, rows in clip.tokenize(p).items():
            if k in CLIP_TOKEN_KEYS and k in merged:
                merged[k] = list(merged[k]) + list(rows)
    clip.encode_from_tokens(merged, return_pooled=True)


def quantize_clip(clip: Any, prompts: Sequence[str], recipe: Recipe = Recipe(), *,
                  held_out: Sequence[str] = HELD_OUT_PROMPTS, min_cosine: float = 0.99,
                  progress: Progress | None = None, check_interrupt: Callable[[], None] = lambda: None
                  ) -> tuple[Any, QualityReport]:
    """Calibrate FP8 scales for every text tower of `clip`; return the quantized clone and its report.
    A weights-only recipe encodes no prompt to calibrate (its scales come from the weights), and ignores `prompts`.

    `clip` and its other clones are never modified: the towers are copied, and the copies are swapped
    into a new clone only.
    """
    family, towers = text_family(clip)
    require_fp8_storage(clip.patcher.load_device)
    modelopt_bridge.load_modelopt()  # before the minutes of encodes that come first
    for t in towers:
        if artifact.record_of(clip.patcher.get_model_object(t.path)) is not None:
            raise FP8ClipError(f"The {t.name} tower of this CLIP is already quantized to FP8 by this pack ('Quantize "
                               "CLIP to FP8' or 'Load FP8 CLIP'). Connect the original CLIP from a stock loader (Load "
                               "Checkpoint, Load CLIP, DualCLIPLoader) instead.")
        hooked = hooked_weights(clip.patcher, t.path)
        if hooked:  # calibrated once, FP8 weights cannot follow what hooks patch at each encode
            raise FP8ClipError(f"This CLIP has hooks that patch {len(hooked)} weights of its {t.name} tower. "
                               f"{HOOKS_FIX}")
    weights_only = not recipe.quantize_activations  # scales from the weights alone: no calibration encode
    prompts = [] if weights_only else [p for p in (s.strip() for s in prompts) if p]
    if not prompts and not weights_only:
        raise FP8ClipError("The calibration prompts are empty. Enter at least one prompt, one per line "
                           "(the node's default text is a built-in set of 64).")
    if not held_out:
        raise FP8ClipError("No held-out prompts to measure the quality on.")
    # What the encoder sees, not the text: an `embedding:` file added, changed or removed since changes it.
    with missing_embeddings(clip) as missing:
        prompt_keys, held_out_keys = ([token_key(clip, p) for p in ps] for ps in (prompts, held_out))
    memo_key = calibration_memo.key("text", getattr(clip.patcher, "patches_uuid", ""), prompt_keys, recipe.to_json(),
                                    held_out_keys, getattr(clip, "layer_idx", None),
                                    sorted(getattr(clip, "tokenizer_options", {}).items()),
                                    weights_fingerprint(clip.patcher, [t.path for t in towers]))
    earlier = calibration_memo.recall(clip, memo_key)
    total = len(prompts) + 2 * len(held_out)  # calibration, the original's and the FP8 model's encodes
    done = 0

    def step(count: int = 1) -> None:
        nonlocal done
        done += count
        if progress:
            progress(done, total)

    def checked(c: Any) -> Callable[[str], tuple]:
        def run(p: str) -> tuple:
            check_interrupt()
            return encode(c, p)
        return run

    # The original's encodes for the report come first, while ComfyUI has the GPU to itself: loading the input
    # CLIP beside a calibration copy it cannot unload (SDXL's, in fp32: 3.3 GB) ran an 8 GB card out of memory.
    t0 = time.perf_counter()
    # The towers' encoders (shared by every clone): which pooled output the model uses.
    owners = {t.name: clip.patcher.get_model_object(t.path.rsplit(".", 1)[0]) for t in towers}
    if not earlier:
        step(0)
        refs = encode_all(held_out, checked(clip), {t.name: clip.patcher.get_model_object(t.path) for t in towers},
                          each=step, owners=owners)
    ref_s = time.perf_counter() - t0
    copies = {t.name: patched_copy(clip, t.path) for t in towers}
    check_interrupt()  # between the steps of seconds each (SDXL): the cancel button answers within one
    source_bytes = {n: weight_bytes(m) for n, m in copies.items()}
    dtypes = {n: checkpoint_dtype(m) for n, m in copies.items()}  # before the fp32 cast
    qclip = clone_with(clip, {t.path: copies[t.name] for t in towers})
    if earlier or weights_only:  # no calibration encode will take the copies to the GPU: the work below runs there
        load_towers(qclip.patcher, [t.path for t in towers], grow=2)
    container = torch.nn.ModuleDict(copies)
    names = modelopt_bridge.linear_layer_names(container)
    to_quantize, kept, unmatched = recipe.split(names)
    unusable = modelopt_bridge.nonfinite_weight_layers(container, to_quantize)
    to_quantize, kept = [n for n in to_quantize if n not in unusable], kept + unusable
    recipe.require_layers(to_quantize, len(names), unusable)
    # Original weights (checkpoint dtype, CPU) for the per-layer errors; taken before the fp32 cast.
    reference = {} if earlier else {n: container.get_submodule(n).weight.detach().to("cpu", copy=True)
                                    for n in to_quantize}
    for m in copies.values():
        to_float32(m)
        if recipe.fp8_embedding:
            fake_quant_embedding(m)
    check_interrupt()
    config = recipe.modelopt_config(kept)

    if earlier:
        modelopt_bridge.quantize_calibrated(container, config, earlier.amax)
        check_interrupt()
        scales = modelopt_bridge.quantized_layers(container)
        modelopt_bridge.fold_weights(container)
        report = replace(earlier.report, min_cosine=min_cosine,
                         reused=calibration_memo.reused_line(earlier, weights_only))
        return qclip, _attach_records(report, family.label, towers, copies, prompts, recipe, scales, kept,
                                      source_bytes, dtypes)

    def forward_loop(_: torch.nn.Module) -> None:
        for group in calibration_groups(qclip, prompts):
            check_interrupt()
            encode_together(qclip, group)
            step(len(group))

    t0 = time.perf_counter()
    modelopt_bridge.quantize(container, config, None if weights_only else forward_loop)
    calib_s = time.perf_counter() - t0
    scales = modelopt_bridge.quantized_layers(container)
    amax = modelopt_bridge.calibration_state(container)
    modelopt_bridge.fold_weights(container)

    summaries = []
    for t in towers:
        prefix = t.name + "."
        summaries.append(TowerSummary(t.name, sum(n.startswith(prefix) for n in scales),
                                      [n[len(prefix):] for n in kept if n.startswith(prefix)],
                                      pooled_used=family.pooled_towers is None or t.name in family.pooled_towers))

    t0 = time.perf_counter()
    probe = LayerErrorProbe(container, reference, keep=(qclip.patcher,))
    try:
        scores = evaluate(held_out, refs, checked(qclip), summaries, dict(copies), step, owners)
    finally:
        errors = probe.close()
    eval_s = time.perf_counter() - t0 + ref_s

    calibrated = set(prompt_keys)
    report = QualityReport(family=family.label, scope=recipe.scope, method=recipe.method, towers=summaries,
                           prompts=scores, layer_errors=errors, calibration_prompts=len(prompts),
                           calibration_seconds=calib_s, evaluation_seconds=eval_s, min_cosine=min_cosine,
                           keep=recipe.keep, passed_through=family.passed_through, unmatched_patterns=unmatched,
                           notes=report_notes(unusable, missing), fp8_embedding=recipe.fp8_embedding,
                           overlap=sum(k in calibrated for k in held_out_keys),
                           pooled_used=family.pooled_used)
    calibration_memo.remember(clip, memo_key, amax, report)
    return qclip, _attach_records(report, family.label, towers, copies, prompts, recipe, scales, kept, source_bytes,
                                  dtypes)


def _attach_records(report: QualityReport, family: str, towers: list, copies: dict[str, torch.nn.Module],
                    prompts: list[str], recipe: Recipe, scales: dict, kept: list[str], source_bytes: dict[str, int],
                    dtypes: dict[str, torch.dtype]) -> QualityReport:
    fp = fingerprint(prompts, recipe)
    for t in towers:
        prefix = t.name + "."
        artifact.attach(copies[t.name], artifact.QuantizedTower(
            family=family, tower=t.name, recipe=recipe, fingerprint=fp,
            scales={n[len(prefix):]: s for n, s in scales.items() if n.startswith(prefix)},
            kept=[n[len(prefix):] for n in kept if n.startswith(prefix)], source_bytes=source_bytes[t.name],
            report=report.to_dict(), dtype=dtypes[t.name]))
    return report
