"""Bench only: cProfile of every prompt a ComfyUI server runs (probe_http_server.py --profile-prompts).

Python imports this at start-up when its folder is on PYTHONPATH. It waits for ComfyUI's `execution` module and
wraps PromptExecutor.execute, which the prompt-worker thread calls once per prompt, so neither the host nor the
pack is changed. Per prompt: FP8CLIP_PROFILE_DIR/prompt-NN.prof and a text summary beside it.
"""
import os
import sys
import threading
import time

_DIR = os.environ.get("FP8CLIP_PROFILE_DIR")


def _summary(profile, path: str, wall: float) -> None:
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(profile, stream=buf)
    buf.write(f"prompt wall time {wall:.2f} s (under cProfile)\n")
    stats.sort_stats("cumulative").print_stats(90)
    stats.sort_stats("tottime").print_stats(40)
    with open(path, "w") as f:
        f.write(buf.getvalue())


def _wrap() -> None:
    while getattr(sys.modules.get("execution"), "PromptExecutor", None) is None:
        time.sleep(0.02)
    import cProfile

    cls = sys.modules["execution"].PromptExecutor
    real, count = cls.execute, [0]

    def execute(self, *args, **kwargs):
        profile, t0 = cProfile.Profile(), time.perf_counter()
        profile.enable()
        try:
            return real(self, *args, **kwargs)
        finally:
            profile.disable()
            count[0] += 1
            stem = os.path.join(_DIR, f"prompt-{count[0]:02d}")
            profile.dump_stats(stem + ".prof")
            _summary(profile, stem + ".txt", time.perf_counter() - t0)

    cls.execute = execute


if _DIR:
    os.makedirs(_DIR, exist_ok=True)
    threading.Thread(target=_wrap, daemon=True, name="fp8clip-profiler").start()
