"""The engine cache: reuse, rebuild on change, never trust a damaged file, one build at a time, nothing left
behind by a failed write, and clear errors for folders it cannot use."""
from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import encode, pack_module


def tr(pack, name):
    return pack_module(pack, f"trt_runtime.{name}")


@pytest.fixture(scope="module")
def real_build(pack, fp8_clip):
    """One real TensorRT for RTX build of the FP8 CLIP-L (1 row): its bytes stand in for every build below."""
    av, build, ox = tr(pack, "availability"), tr(pack, "build"), tr(pack, "onnx_export")
    rtx = av.build_only_support()
    ((module, record),) = pack_module(pack, "quant.artifact").quantized_towers(fp8_clip[1]).values()
    result = build.build_engine(ox.export_text_transformer(module, record), build.Profile(max_rows=1, opt_rows=1),
                                rtx.flavour, target=rtx.target)
    return result, rtx, module, record


@pytest.fixture
def counted(real_build):
    calls = []

    def build():
        calls.append(1)
        return real_build[0]
    build.calls = calls
    return build


COMPONENTS = {"export": "abc", "flavour": "tensorrt-rtx", "trt_version": "1.7.1.116", "target": "portable",
              "profile": {"min_rows": 1, "opt_rows": 2, "max_rows": 8}}


def leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name != ".locks")


def test_same_inputs_reuse_changed_inputs_rebuild(pack, real_build, tmp_path, monkeypatch):
    pipeline, build, av = tr(pack, "pipeline"), tr(pack, "build"), tr(pack, "availability")
    _, rtx, module, record = real_build
    builds = []
    monkeypatch.setattr(pipeline, "build_engine", lambda *a, **k: builds.append(k["target"]) or real_build[0])
    cache = tr(pack, "cache").EngineCache(tmp_path / "tensorrt")  # missing: created on first use

    def prepare(profile=build.Profile(max_rows=8), support=rtx):
        return pipeline.prepare_engine(module, record, profile=profile, support=support, cache=cache)

    first = prepare()
    assert first.built and first.path.exists() and len(builds) == 1
    again = prepare()
    assert not again.built and again.path == first.path and len(builds) == 1  # same inputs: no build
    assert prepare(build.Profile(max_rows=4)).built and len(builds) == 2  # profile
    newer = tr(pack, "flavour").Flavour(rtx.flavour.name, rtx.flavour.module, "1.8.0")
    assert prepare(support=av.Support(True, "", newer, rtx.target)).built  # TensorRT upgrade
    assert prepare(support=av.Support(True, "", rtx.flavour, "sm89")).built  # another GPU architecture
    assert pipeline.prepare_engine(module, record, profile=build.Profile(max_rows=8), support=rtx, cache=cache,
                                   activations="float16").built  # another activation precision
    assert len(builds) == 5 and len(list(cache.root.glob("*.engine"))) == 5
    assert not prepare().built and len(builds) == 5  # and the first one is still found


@pytest.mark.parametrize("damage, why", [
    (lambda e, m: e.write_bytes(e.read_bytes()[:-1000]), "truncated"),
    (lambda e, m: e.write_bytes(e.read_bytes()[:500] + b"X" + e.read_bytes()[501:]), "sha256"),
    (lambda e, m: m.unlink(), "no manifest"),
    (lambda e, m: m.write_text("{not json"), "unreadable"),
    (lambda e, m: m.write_text(json.dumps({**json.loads(m.read_text()), "key": "0" * 64})), "another engine"),
    (lambda e, m: e.unlink(), "missing"),
    (lambda e, m: m.write_text("null"), "not one this pack writes"),
    (lambda e, m: m.write_text(json.dumps({**json.loads(m.read_text()), "io": [{"name": "x"}]})),
     "not one this pack writes"),
], ids=["truncated", "edited", "no-manifest", "bad-manifest", "foreign-manifest", "engine-deleted", "null-manifest",
        "edited-io"])
def test_damaged_or_foreign_engine_is_rebuilt_with_a_warning(pack, tmp_path, counted, caplog, damage, why):
    cache_mod = tr(pack, "cache")
    cache = cache_mod.EngineCache(tmp_path)
    key = cache_mod.engine_key(COMPONENTS)
    good = cache.get_or_build(key, COMPONENTS, counted, tower="clip_l")
    damage(good.path, good.path.with_suffix(".json"))
    assert cache.check(key, COMPONENTS, "clip_l")[0] is None  # what get_or_build consults before any use
    with caplog.at_level(logging.WARNING):
        again = cache.get_or_build(key, COMPONENTS, counted, tower="clip_l")
    assert again.built and len(counted.calls) == 2
    assert any(why in w for w in again.warnings) and why in caplog.text and "rebuilding" in caplog.text
    assert cache.check(key, COMPONENTS, "clip_l")[0] is not None  # intact again
    assert leftovers(tmp_path) == sorted([good.path.name, good.path.with_suffix(".json").name])


def test_engine_edited_after_the_check_is_not_handed_to_tensorrt(pack, tmp_path, counted):
    cache_mod = tr(pack, "cache")
    found = cache_mod.EngineCache(tmp_path).get_or_build(cache_mod.engine_key(COMPONENTS), COMPONENTS, counted,
                                                          tower="clip_l")
    found.path.write_bytes(b"\0" * found.manifest["engine_bytes"])
    with pytest.raises(cache_mod.EngineCacheError, match="changed after it was checked"):
        found.read()


def test_two_builds_of_one_key_at_once_make_one_engine(pack, tmp_path, real_build):
    cache_mod = tr(pack, "cache")
    calls = []

    def slow_build():
        calls.append(1)
        time.sleep(1.0)
        return real_build[0]

    key = cache_mod.engine_key(COMPONENTS)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache_mod.EngineCache(tmp_path).get_or_build(
        key, COMPONENTS, slow_build, tower="clip_l"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(r.built for r in results) == [False, True]
    assert results[0].path == results[1].path and len(list(tmp_path.glob("*.engine"))) == 1


def test_waiting_for_another_build_of_the_key_can_be_cancelled(pack, tmp_path, real_build):
    """Another process builds this engine for minutes: ComfyUI's cancel must stop the wait, not hang the queue."""
    cache_mod = tr(pack, "cache")
    key, started, release = cache_mod.engine_key(COMPONENTS), threading.Event(), threading.Event()

    def other_build():
        started.set()
        release.wait(30)
        return real_build[0]

    other = threading.Thread(target=lambda: cache_mod.EngineCache(tmp_path).get_or_build(
        key, COMPONENTS, other_build, tower="clip_l"))
    other.start()
    started.wait(30)
    checks = []

    class Cancelled(Exception):
        pass

    def check_interrupt():
        checks.append(1)
        if len(checks) >= 2:
            raise Cancelled

    t0 = time.monotonic()
    try:
        with pytest.raises(Cancelled):
            cache_mod.EngineCache(tmp_path).get_or_build(key, COMPONENTS, lambda: pytest.fail("built twice"),
                                                         tower="clip_l", check_interrupt=check_interrupt)
        assert time.monotonic() - t0 < 10
    finally:
        release.set()
        other.join()
    assert len(list(tmp_path.glob("*.engine"))) == 1


def test_a_build_that_dies_leaves_nothing(pack, tmp_path):
    cache_mod = tr(pack, "cache")

    def dies():
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="builder crashed"):
        cache_mod.EngineCache(tmp_path).get_or_build("k" * 64, COMPONENTS, dies, tower="clip_l")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fail_at", [1, 2])  # 1: writing the engine, 2: writing its manifest
def test_full_disk_during_the_write_leaves_nothing_and_says_so(pack, tmp_path, counted, monkeypatch, fail_at):
    cache_mod = tr(pack, "cache")
    n = []
    real_fsync = os.fsync

    def fsync(fd):
        n.append(1)
        if len(n) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(cache_mod.os, "fsync", fsync)
    with pytest.raises(cache_mod.EngineCacheError, match=r"Not enough disk space to write fp8clip-clip_l-.*"
                                                         r"Free some space.*nothing was left behind") as e:
        cache_mod.EngineCache(tmp_path).get_or_build(cache_mod.engine_key(COMPONENTS), COMPONENTS, counted,
                                                     tower="clip_l")
    assert leftovers(tmp_path) == []
    assert e.value.result is not None  # the engine that was built is still usable from memory


def test_cache_folder_that_cannot_be_created(pack, tmp_path, counted):
    cache_mod = tr(pack, "cache")
    (tmp_path / "models").write_text("a file where the folder should be")
    with pytest.raises(cache_mod.EngineCacheError, match=r"Cannot create the TensorRT engine folder .*models/"
                                                         r"tensorrt.*extra_model_paths\.yaml"):
        cache_mod.EngineCache(tmp_path / "models" / "tensorrt").get_or_build("k" * 64, COMPONENTS, counted,
                                                                             tower="clip_l")
    assert counted.calls == []


@pytest.fixture
def read_only_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    immutable = False
    try:
        (d / "probe").touch()
    except OSError:
        pass
    else:  # running as root: permission bits do not apply; an immutable folder does
        (d / "probe").unlink()
        immutable = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("cannot make a read-only folder here (root without chattr)")
    yield d
    if immutable:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    d.chmod(0o755)


def test_cache_folder_that_is_not_writable(pack, read_only_dir, counted):
    cache_mod = tr(pack, "cache")
    with pytest.raises(cache_mod.EngineCacheError, match=r"folder .*/ro is not writable.*make it writable"):
        cache_mod.EngineCache(read_only_dir).get_or_build("k" * 64, COMPONENTS, counted, tower="clip_l")


def test_unusable_cache_folder_still_gives_an_engine_clip_and_says_it_is_not_cached(comfy, pack, fp8_clip,
                                                                                     real_build, tmp_path, monkeypatch):
    pipeline, runners, ox = tr(pack, "pipeline"), tr(pack, "runners"), tr(pack, "onnx_export")
    _, rtx, _, _ = real_build
    monkeypatch.setattr(pipeline, "make_runner", lambda engine, support, module, record: runners.OrtRunner(
        ox.export_text_transformer(module, record)))
    (tmp_path / "models").write_text("not a folder")
    with torch.inference_mode():
        out, status = pipeline.engine_clip(fp8_clip[1], 1, rtx, cache_root=tmp_path / "models" / "tensorrt")
    assert "Not cached: Cannot create the TensorRT engine folder" in status
    ((em, _),) = pack_module(pack, "quant.artifact").quantized_towers(out).values()
    assert type(em).__name__ == "EngineTextModel"
    assert encode(comfy, out, "a cat")[0].shape == (1, 77, 768)


def test_a_folder_without_file_locks_gives_an_engine_from_memory(pack, real_build, tmp_path, monkeypatch):
    """filelock raises NotImplementedError, not OSError, where the file system has no locks (some NFS and FUSE
    mounts): it failed the node instead of falling back to the engine in memory (found by review)."""
    import filelock

    def no_locks(self, *a, **k):
        raise NotImplementedError("FileSystem does not appear to support flock")
    monkeypatch.setattr(filelock.FileLock, "acquire", no_locks)
    pipeline, build = tr(pack, "pipeline"), tr(pack, "build")
    monkeypatch.setattr(pipeline, "build_engine", lambda *a, **k: real_build[0])
    _, rtx, module, record = real_build
    engine = pipeline.prepare_engine(module, record, profile=build.Profile(max_rows=1, opt_rows=1), support=rtx,
                                     cache=tr(pack, "cache").EngineCache(tmp_path / "tensorrt"))
    assert engine.path is None and engine.data == real_build[0].engine
    assert "has no file locks" in engine.note and "folder on a local disk" in engine.note


def test_prebuild_into_an_unusable_folder_stops_before_building(pack, fp8_clip, real_build, tmp_path, monkeypatch):
    """`build-engine` exists to fill the folder the node reads: where the cache cannot keep an engine, it said so
    only after building one in memory for nothing (minutes for CLIP-G; found by review)."""
    pipeline = tr(pack, "pipeline")
    builds = []
    monkeypatch.setattr(pipeline, "build_engine", lambda *a, **k: builds.append(1) or real_build[0])
    (tmp_path / "models").write_text("not a folder")
    with pytest.raises(ValueError, match=r"clip_l: the engine cache cannot keep the engine, so the node would not "
                                         r"find it: Cannot create the TensorRT engine folder"):
        pipeline.prebuild(fp8_clip[1], False, 1, real_build[1], cache_root=tmp_path / "models" / "tensorrt")
    assert builds == []


def test_tensorrt_model_folder_is_registered_for_engine_files(comfy, pack, tmp_path):
    fp = comfy.folder_paths
    paths, exts = fp.folder_names_and_paths["tensorrt"]  # registered when ComfyUI imported the pack
    assert str(comfy.base / "models" / "tensorrt") in paths and ".engine" in exts
    d = comfy.base / "models" / "tensorrt"
    d.mkdir(parents=True, exist_ok=True)
    (d / "listed-test.engine").write_bytes(b"x")
    (d / "listed-test.json").write_text("{}")
    try:
        names = fp.get_filename_list("tensorrt")
        assert "listed-test.engine" in names and "listed-test.json" not in names
        assert tr(pack, "cache").register_folder(fp)[0] == paths[0]  # idempotent, keeps what others added
    finally:
        (d / "listed-test.engine").unlink()
        (d / "listed-test.json").unlink()


def test_a_read_only_cache_serves_the_engines_it_holds(pack, tmp_path, counted, monkeypatch):
    """A shared or baked-in engine folder ComfyUI cannot write to: its intact engines are used, no rebuild."""
    cache_mod = tr(pack, "cache")
    key = cache_mod.engine_key(COMPONENTS)
    cache_mod.EngineCache(tmp_path).get_or_build(key, COMPONENTS, counted, tower="clip_l")

    def read_only(self):
        raise cache_mod.EngineCacheError(f"The TensorRT engine folder {self.root} is not writable")

    monkeypatch.setattr(cache_mod.EngineCache, "check_writable", read_only)
    found = cache_mod.EngineCache(tmp_path).get_or_build(key, COMPONENTS, counted, tower="clip_l")
    assert not found.built and counted.calls == [1]
    with pytest.raises(cache_mod.EngineCacheError, match="not writable"):  # a missing engine still needs writing
        cache_mod.EngineCache(tmp_path).get_or_build("k" * 64, COMPONENTS, counted, tower="clip_l")


def test_engines_are_readable_by_other_users_of_the_folder(pack, tmp_path, counted):
    cache_mod = tr(pack, "cache")
    found = cache_mod.EngineCache(tmp_path).get_or_build(cache_mod.engine_key(COMPONENTS), COMPONENTS, counted,
                                                          tower="clip_l")
    mask = os.umask(0)
    os.umask(mask)
    for p in (found.path, found.path.with_suffix(".json")):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p.name


def test_a_lock_file_that_cannot_be_opened_is_a_cache_error(pack, tmp_path, counted, monkeypatch):
    """Another user's lock file (the command line run as root into ComfyUI's folder): the node falls back to an
    engine in memory instead of failing with a bare PermissionError."""
    import filelock

    cache_mod = tr(pack, "cache")

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self.lock_file))

    monkeypatch.setattr(filelock.FileLock, "acquire", denied)
    with pytest.raises(cache_mod.EngineCacheError, match=r"Cannot take the build lock .*Permission denied"):
        cache_mod.EngineCache(tmp_path).get_or_build("k" * 64, COMPONENTS, counted, tower="clip_l")
    assert counted.calls == []


def test_cancel_raised_by_the_progress_hook_stops_the_build(pack, real_build):
    """ComfyUI's progress hook raises when the user presses Cancel (and clears the flag): TensorRT swallows
    exceptions of its progress monitor, so the cancel must be carried out of the build, not turned into a
    failed build the node would shrug off."""
    build, ox = tr(pack, "build"), tr(pack, "onnx_export")
    _, rtx, module, record = real_build

    class Cancelled(Exception):
        pass

    def progress(fraction, phase):
        raise Cancelled()

    with pytest.raises(Cancelled):
        build.build_engine(ox.export_text_transformer(module, record), build.Profile(max_rows=1, opt_rows=1),
                           rtx.flavour, target=rtx.target, progress=progress)


def test_ctrl_c_landing_in_tensorrts_log_callback_stops_the_build(pack, real_build, monkeypatch):
    """A KeyboardInterrupt raised while TensorRT calls the pack's logger was swallowed by TensorRT ("Exception
    caught in log()") and the command-line build ran to the end; it must stop the build and come out."""
    build, ox = tr(pack, "build"), tr(pack, "onnx_export")
    _, rtx, module, record = real_build
    real, phases = build._record, []

    def ctrl_c_on_first_message(*a):
        if not phases:
            phases.append(1)
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(build, "_record", ctrl_c_on_first_message)
    with pytest.raises(KeyboardInterrupt):
        build.build_engine(ox.export_text_transformer(module, record), build.Profile(max_rows=1, opt_rows=1),
                           rtx.flavour, target=rtx.target)
    assert phases == [1]


@pytest.mark.parametrize("where", ["phase_start", "step_complete", "phase_finish"])
def test_ctrl_c_landing_in_any_progress_callback_stops_the_build(pack, real_build, monkeypatch, where):
    """Ctrl-C is raised in whichever Python callback TensorRT calls next; one landing in the progress monitor's
    phase_start or phase_finish (or before step_complete's guard) was swallowed by TensorRT ("Exception caught
    in phase_start()") and the command-line build ran to the end."""
    build, ox = tr(pack, "build"), tr(pack, "onnx_export")
    _, rtx, module, record = real_build
    real, fired = build._monitor, []

    class Trap(list):  # the monitor's phase stack, raising Ctrl-C inside the callback `where` (as a signal would)
        def _ctrl_c(self):
            if not fired and sys._getframe(2).f_code.co_name == where:
                fired.append(where)
                raise KeyboardInterrupt

        def append(self, x):
            self._ctrl_c()
            super().append(x)

        def __iter__(self):
            self._ctrl_c()
            return super().__iter__()

    def monitor(*a):
        mon = real(*a)
        mon.stack = Trap()
        return mon

    monkeypatch.setattr(build, "_monitor", monitor)
    with pytest.raises(KeyboardInterrupt):
        build.build_engine(ox.export_text_transformer(module, record), build.Profile(max_rows=1, opt_rows=1),
                           rtx.flavour, target=rtx.target)
    assert fired == [where]


def test_ctrl_c_landing_in_the_logger_while_a_parse_fails_is_not_turned_into_a_parse_error(pack, real_build,
                                                                                           monkeypatch):
    """TensorRT logs a parse error through the Python logger; Ctrl-C landing there was kept, but the failed
    parse then raised "could not parse" and the command-line build reported that instead of stopping."""
    build = tr(pack, "build")
    _, rtx, _, _ = real_build
    fired = []

    def record(*a):
        if not fired:
            fired.append(1)
            raise KeyboardInterrupt

    monkeypatch.setattr(build, "_record", record)
    with pytest.raises(KeyboardInterrupt):
        build.build_engine(b"not an onnx model", build.Profile(max_rows=1, opt_rows=1), rtx.flavour,
                           target=rtx.target)
    assert fired == [1]


def test_the_engine_is_built_with_its_own_gpu_current(pack, real_build, tmp_path, monkeypatch):
    """Standard TensorRT builds for the current CUDA device: an engine for a CLIP on cuda:1 (checked, keyed and run
    there) was built on ComfyUI's current cuda:0, for another GPU on a mixed machine, and then failed to load."""
    pipeline, build, av, cache_mod = (tr(pack, n) for n in ("pipeline", "build", "availability", "cache"))
    _, rtx, module, record = real_build
    current = ["cuda:0"]

    class Device:  # torch.cuda.device's role, on this machine without CUDA
        def __init__(self, d):
            self.d = str(torch.device(d))

        def __enter__(self):
            current.append(self.d)

        def __exit__(self, *exc):
            current.pop()

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []
    monkeypatch.setattr(pipeline, "build_engine", lambda *a, **k: (seen.append(current[-1]), real_build[0])[1])
    support = av.Support(True, "", rtx.flavour, "sm90-NVIDIA H200", torch.device("cuda:1"))
    pipeline.prepare_engine(module, record, profile=build.Profile(max_rows=1, opt_rows=1), support=support,
                            cache=cache_mod.EngineCache(tmp_path))
    assert seen == ["cuda:1"] and current == ["cuda:0"]


def test_an_engine_rebuilt_by_another_process_is_read_from_the_cache(pack, real_build, tmp_path, monkeypatch):
    """The node's result keeps the engine's path and reads the file again whenever ComfyUI loads the model
    after offloading it. Another ComfyUI (or the command line) rebuilding the same key meanwhile writes other
    bytes: the intact engine of the same key is taken; only an engine the cache no longer holds intact fails,
    saying how to make ComfyUI run the node again (queue again: the node's IS_CHANGED sees the file changed,
    test_tensorrt_engine.py)."""
    pipeline, cache_mod = tr(pack, "pipeline"), tr(pack, "cache")
    _, rtx, module, record = real_build
    monkeypatch.setattr(pipeline, "build_engine", lambda *a, **k: real_build[0])
    cache = cache_mod.EngineCache(tmp_path)
    engine = pipeline.prepare_engine(module, record, profile=tr(pack, "build").Profile(max_rows=8), support=rtx,
                                     cache=cache)
    assert engine.read() == real_build[0].engine
    other = real_build[0].engine + b"another build"
    manifest_path = engine.path.with_suffix(".json")
    manifest = json.loads(manifest_path.read_text())
    manifest.update(engine_bytes=len(other), sha256=__import__("hashlib").sha256(other).hexdigest())
    engine.path.write_bytes(other)
    manifest_path.write_text(json.dumps(manifest))
    assert engine.read() == other
    engine.path.write_bytes(b"\0" * len(other))
    with pytest.raises(cache_mod.EngineCacheError, match="changed after it was checked.*Queue the prompt again"):
        engine.read()


def test_an_engine_file_deleted_after_the_check_says_how_to_recover(pack, real_build, tmp_path, monkeypatch):
    """Deleted by a user or by another process's rebuild, between the node's run and an encode that reads it
    again: a cache error naming the fix (which the nodes report), not a bare FileNotFoundError."""
    pipeline, cache_mod = tr(pack, "pipeline"), tr(pack, "cache")
    _, rtx, module, record = real_build
    monkeypatch.setattr(pipeline, "build_engine", lambda *a, **k: real_build[0])
    engine = pipeline.prepare_engine(module, record, profile=tr(pack, "build").Profile(max_rows=8), support=rtx,
                                     cache=cache_mod.EngineCache(tmp_path))
    engine.path.unlink()
    with pytest.raises(cache_mod.EngineCacheError, match="cannot be read now.*Queue the prompt again"):
        engine.read()


def test_a_standard_tensorrt_older_than_10_2_is_passed_over_with_the_reason(pack, monkeypatch):
    """TensorRT 8.x imports fine but cannot build strongly typed FP8 networks: use TensorRT for RTX where it is
    installed, else say what to upgrade, instead of failing in the builder."""
    import sys
    import types

    flavour = tr(pack, "flavour")
    old = types.ModuleType("tensorrt")
    old.Builder, old.__version__ = object, "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    found, _ = flavour.find_tensorrt()
    assert found is not None and found.name == flavour.RTX  # installed here
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_bindings", None)  # as if not installed
    found, why = flavour.find_tensorrt()
    assert found is None and "tensorrt 8.6.1 is older than 10.2" in why and "pip install -U tensorrt" in why


def test_temp_files_of_a_killed_build_are_removed_by_the_next_build(pack, tmp_path, counted):
    """A build killed while writing (kill -9, power cut) leaves an engine-sized temp file that nothing else removes;
    one still being written (touched within the hour) stays."""
    cache_mod = tr(pack, "cache")
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / "fp8clip-clip_g-0123456789abcdef01234567.engine.0123456789abcdef.tmp"
    fresh = tmp_path / "fp8clip-clip_l-0123456789abcdef01234567.engine.fedcba9876543210.tmp"
    other = tmp_path / "notes.0123456789abcdef.tmp"  # not the pack's
    for p in (stale, fresh, other):
        p.write_bytes(b"half an engine")
    two_hours_ago = time.time() - 7200
    for p in (stale, other):
        os.utime(p, (two_hours_ago, two_hours_ago))
    cache_mod.EngineCache(tmp_path).get_or_build(cache_mod.engine_key(COMPONENTS), COMPONENTS, counted,
                                                 tower="clip_l")
    assert not stale.exists() and fresh.exists() and other.exists()
