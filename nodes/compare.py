from __future__ import annotations


class CompareConditioning:
    """Checks an FP8 CLIP on your own prompt: encode it with both CLIPs and connect both here."""
    NODE_ID = "FP8CLIPCompareConditioning"
    DISPLAY_NAME = "Compare Conditioning (FP8 vs original)"
    CATEGORY = "advanced/fp8 clip"
    DESCRIPTION = "Cosine similarity between two conditionings of the same prompt, e.g. original vs FP8 CLIP."
    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("cond_cosine", "pooled_cosine", "summary")
    OUTPUT_TOOLTIPS = ("Mean per-token cosine of the conditioning (worst entry of a combined conditioning).",
                       "Cosine of the pooled outputs; -1 when the conditionings have none (not a measured -1).",
                       "Both numbers in words.")
    FUNCTION = "compare"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"reference": ("CONDITIONING",), "candidate": ("CONDITIONING",)}}

    def compare(self, reference, candidate):
        from ..quant.fidelity import compare_conditioning

        cond, pooled, text = compare_conditioning(reference, candidate)
        return {"ui": {"text": [text]}, "result": (cond, pooled if pooled is not None else -1.0, text)}
