#!/usr/bin/env bash
# How bench/results/*_h200* and *_h100* were produced, on the device machine. Carry `.whl` (ModelOpt and the
# wheels ComfyUI v0.29 needs that the image lacks) in a first call, then `.device` (comfyui-v0.29.tar.xz, made in
# a v0.29 checkout: tar -cJf comfyui-v0.29.tar.xz --exclude=__pycache__ *.py alembic.ini alembic_db api_server
# app comfy comfy_api comfy_config comfy_execution comfy_extras middleware utils pyproject.toml requirements.txt)
# and `.whl-av` (PyAV) in the next; together they pass the 64 MiB a call carries.
#   bash bench/run_on_device.sh OUT [step ...]     steps: probe probe-stress text profile profile-rows vision
#   text-dynamic text-sdxl text-sdxl-dynamic text-sd3 text-sd3-t5 text-flux profile-sdxl
#   profile-sdxl-dynamic attention residency residency-dynamic workflows workflows-dynamic small-vram
#   small-vram-dynamic http text-default unload unload-async unload-old unload-v03 unload-v03-old capture-failure
#   text-sdxl-default text-gpu-only profile-gpu-only
#   vision-profile vision-gpu-only vision-async multi-gpu memo memo-sdxl sampler reuse reuse-dynamic reuse-async
#   multi-gpu-async (two GPUs) capture-async gemm vision-fidelity
# A step's name may carry a suffix to run it again into another folder (text-2, text-dynamic-2).
# Sets up the carried wheels (ModelOpt, comfy-kitchen, ...) and ComfyUI v0.29 once per machine, then runs
# each step under its own time limit, logging to OUT/<step>.log, so one slow step does not lose the others.
set -u
out=${1:?usage: run_on_device.sh OUT [step ...]}
shift
mkdir -p "$out"
[ -d /tmp/site/modelopt ] || pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
# PyAV, which ComfyUI v0.29's executor imports (workflows steps), travels in its own call: .whl is near the limit.
[ -d /tmp/site/av ] || [ ! -d .whl-av ] || pip install -q --no-deps --target /tmp/site .whl-av/*.whl 2>&1 | tail -2
# ComfyUI's HTTP server (http step): aiohttp and its kin, SQLAlchemy and alembic, carried in .whl-srv.
[ -d /tmp/site/aiohttp ] || [ ! -d .whl-srv ] || pip install -q --no-deps --target /tmp/site .whl-srv/*.whl 2>&1 | tail -2
[ -f /tmp/c29/main.py ] || { mkdir -p /tmp/c29 && tar -xJf .device/comfyui-v0.29.tar.xz -C /tmp/c29; }
# ComfyUI v0.3.75 (unload-v03 steps): the tree harness/setup.sh installs, packed the same way into .device.
[ -f /tmp/c03/main.py ] || [ ! -f .device/comfyui-v0.3.75.tar.xz ] || { mkdir -p /tmp/c03 && tar -xJf .device/comfyui-v0.3.75.tar.xz -C /tmp/c03; }
export PYTHONPATH=/tmp/site
for step in "${@:-probe text profile vision}"; do
  for s in $step; do
    t0=$(date +%s)
    case $s in
      gemm*) timeout 400 python3 bench/probe_gemm_accumulation.py --out "$out" ;;
      probe-stress*) timeout 300 python3 bench/probe_fp8_fidelity.py --comfy /tmp/c29 --out "$out" --stress ;;
      probe*) timeout 300 python3 bench/probe_fp8_fidelity.py --comfy /tmp/c29 --out "$out" ;;
      text-default*) PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout 400 python3 bench/bench_text_encode.py \
                       --comfy /tmp/c29 --out "$out/$s" --variants stock,pack --dynamic-vram ;;  # main.py's defaults
      text-dynamic*) timeout 400 python3 bench/bench_text_encode.py --comfy /tmp/c29 --out "$out/$s" --variants stock,pack \
                       --dynamic-vram ;;
      text-sdxl-default*) PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout 560 python3 bench/bench_text_encode.py \
                            --comfy /tmp/c29 --out "$out/$s" --variants stock,pack --family sdxl --dynamic-vram ;;
      text-sdxl-dynamic*) timeout 560 python3 bench/bench_text_encode.py --comfy /tmp/c29 --out "$out/$s" ${WORKFLOWS_ARGS:-} \
                            --variants stock,pack --family sdxl --dynamic-vram ;;
      text-sdxl*) timeout 560 python3 bench/bench_text_encode.py --comfy /tmp/c29 --out "$out/$s" --variants stock,pack \
                    --family sdxl ;;
      text-sd3-t5*) timeout 560 python3 bench/bench_text_encode.py --comfy /tmp/c29 --out "$out/$s" ${WORKFLOWS_ARGS:-} \
                      --variants stock,pack --family sd3-t5 ;;
      text-flux*) timeout 560 python3 bench/bench_text_encode.py --comfy /tmp/c29 --out "$out/$s" ${WORKFLOWS_ARGS:-} \
                    --variants stock,pack --family flux ;;
      text-sd3*) timeout 560 python3 bench/bench_text_encode.py --comfy /tmp/c29 --out "$out/$s" --variants stock,pack \
                   --family sd3 ;;
      text-gpu-only*) timeout 400 python3 bench/bench_text_encode.py --comfy /tmp/c29 --out "$out/$s" --variants stock,pack \
                        --gpu-only ;;
      text*) timeout 400 python3 bench/bench_text_encode.py --comfy /tmp/c29 --out "$out/$s" --variants stock,pack ;;
      residency-dynamic*) timeout 300 python3 bench/probe_residency.py --comfy /tmp/c29 --out "$out" --dynamic-vram ;;
      residency*) timeout 300 python3 bench/probe_residency.py --comfy /tmp/c29 --out "$out" ;;
      workflows-dynamic*) timeout 560 python3 bench/bench_example_workflows.py --comfy /tmp/c29 --out "$out/$s" ${WORKFLOWS_ARGS:-} \
                            --dynamic-vram ;;
      workflows*) timeout 560 python3 bench/bench_example_workflows.py --comfy /tmp/c29 --out "$out/$s" ${WORKFLOWS_ARGS:-} ;;
      small-vram-dynamic*) timeout 560 python3 bench/probe_small_vram.py --comfy /tmp/c29 --out "$out/$s" ${WORKFLOWS_ARGS:-} \
                             --dynamic-vram ;;
      small-vram*) timeout 560 python3 bench/probe_small_vram.py --comfy /tmp/c29 --out "$out/$s" ${WORKFLOWS_ARGS:-} ;;
      http*) timeout 560 python3 bench/probe_http_server.py --comfy /tmp/c29 --out "$out/$s" ${WORKFLOWS_ARGS:-} ;;
      unload-async*) PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout 200 python3 bench/probe_unload.py \
                       --comfy /tmp/c29 ;;
      capture-failure*) timeout 200 python3 bench/probe_capture_failure.py --comfy /tmp/c29 ;;
      unload-v03-old*) timeout 200 python3 bench/probe_unload.py --comfy /tmp/c03 --old-lookup ;;
      unload-v03*) timeout 200 python3 bench/probe_unload.py --comfy /tmp/c03 ;;
      unload-old*) timeout 200 python3 bench/probe_unload.py --comfy /tmp/c29 --old-lookup ;;
      unload*) timeout 200 python3 bench/probe_unload.py --comfy /tmp/c29 ;;
      memo-sdxl*) timeout 300 python3 bench/probe_memo_rebuild.py --comfy /tmp/c29 --family sdxl ;;
      memo*) timeout 300 python3 bench/probe_memo_rebuild.py --comfy /tmp/c29 ;;
      reuse-async*) PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout 400 python3 bench/profile_quantize_reuse.py \
                      --comfy /tmp/c29 --out "$out/$s" --dynamic-vram ;;
      reuse-dynamic*) timeout 400 python3 bench/profile_quantize_reuse.py --comfy /tmp/c29 --out "$out/$s" --dynamic-vram ;;
      reuse*) timeout 400 python3 bench/profile_quantize_reuse.py --comfy /tmp/c29 --out "$out/$s" ;;
      sampler*) timeout 400 python3 bench/probe_sampler_after_pack.py --comfy /tmp/c29 --out "$out/$s" ;;
      attention*) timeout 120 python3 bench/probe_attention.py --out "$out" ;;
      profile-rows*) timeout 300 python3 bench/profile_text_encode.py --comfy /tmp/c29 --out "$out/$s" ${WORKFLOWS_ARGS:-} \
                       --executors fused,cuda_graph --cases "1 prompt (1x77),long prompt (3x77),8 rows of 77" ;;
      profile-sdxl-dynamic*) timeout 300 python3 bench/profile_text_encode.py --comfy /tmp/c29 --out "$out/$s" ${WORKFLOWS_ARGS:-} \
                               --family sdxl --executors fused --dynamic-vram ;;
      profile-sdxl*) timeout 300 python3 bench/profile_text_encode.py --comfy /tmp/c29 --out "$out/$s" ${WORKFLOWS_ARGS:-} \
                       --family sdxl --executors fused,cuda_graph --cases "1 prompt (1x77),8 rows of 77" ;;
      profile-gpu-only*) timeout 200 python3 bench/profile_text_encode.py --comfy /tmp/c29 --out "$out/$s" --gpu-only \
                           --executors fused ;;
      profile*) timeout 200 python3 bench/profile_text_encode.py --comfy /tmp/c29 --out "$out/$s" ;;
      capture-async*) PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout 400 python3 bench/probe_capture_async.py \
                        --comfy /tmp/c29 --out "$out/$s" ${CAPTURE_ARGS:-} ;;
      vision-async*) PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout 500 python3 bench/bench_vision_encode.py \
                       --comfy /tmp/c29 --out "$out/$s" --quick ;;  # main.py's allocator; its `auto` plan
      multi-gpu-async*) PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout 300 python3 bench/probe_multi_gpu.py \
                          --comfy /tmp/c29 --out "$out/$s" ${MULTI_GPU_ARGS:-} ;;
      multi-gpu*) timeout 300 python3 bench/probe_multi_gpu.py --comfy /tmp/c29 --out "$out/$s" ${MULTI_GPU_ARGS:-} ;;
      vision-gpu-only*) timeout 500 python3 bench/bench_vision_encode.py --comfy /tmp/c29 --out "$out/$s" --gpu-only \
        --quick --profile-batch 64 ;;
      vision-profile*) timeout 500 python3 bench/bench_vision_encode.py --comfy /tmp/c29 --out "$out/$s" \
        --variants "${VISION_VARIANTS:-stock-b64,pack}" --profile-batch 64 ;;
      vision-fidelity*) timeout 300 python3 bench/bench_vision_encode.py --comfy /tmp/c29 --out "$out/$s" --variants pack \
        --quick ;;
      vision*) timeout 500 python3 bench/bench_vision_encode.py --comfy /tmp/c29 --out "$out/$s" ;;
      *) echo "unknown step $s" >&2; false ;;
    esac > "$out/$s.log" 2>&1
    echo "$s: exit $? in $(( $(date +%s) - t0 )) s"
  done
done
