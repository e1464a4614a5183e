#!/usr/bin/env bash
# One pass of the GPU checks on a multi-GPU host (used on the lent 2xH200 machine):
# build the CUDA extension, run the GPU tests, then the micro-benchmarks. Logs and JSON lines go to
# $OUT (default out/gpu). Stages can be picked: `bench/gpu_checks.sh build tests regroup runtime xdit`.
#   On a machine without network, install the carried wheels first (see README "GPU machines").
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
PY=${PY:-python3}
stages=${*:-build tests regroup runtime profile cache overhead xdit}
# Issue 7 (end-to-end SAR, ~25 min on 2xH200): bench/gpu_checks.sh build corun e2e-traces xdit-serve e2e
# Issue 16 (parallel layouts, sd3-medium, ~25 min on 2xH200): bench/gpu_checks.sh build runtime-sd3 profile-sd3 sim-sd3
ngpu=$($PY -c "import torch; print(torch.cuda.device_count())")
devs=$($PY -c "print(','.join(f'cuda:{i}' for i in range($ngpu)))")
run() {  # run NAME TIMEOUT_S CMD...: log to $OUT/NAME.log, print its tail
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "rc=$?"; tail -n 25 "$OUT/$name.log"
}
for s in $stages; do case $s in
  build)   nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
           # (an existing build is used only if no source is newer: a stale one lacks the newest native code)
           so=$(ls tetri_engine/_C*.so 2>/dev/null | head -1)
           if [ -n "$so" ] && [ -z "$(find csrc setup.py -newer "$so" 2>/dev/null)" ]; then echo "=== build: using existing $so"
           # The GPU image's CXX (/opt/gcc/bin/g++) links a private static libstdc++ into the .so, whose
           # iostreams crash on first use: build with the system compiler.
           else CXX=$(command -v g++) CC=$(command -v gcc) TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 run build 600 $PY setup.py build_ext --inplace; fi
           $PY -c "import tetri_engine.ops as o; print(o.backend_info())" ;;
  tests)   run gpu-tests 300 $PY -m pytest -q -p no:cacheprovider -rs tests/test_ops_gpu.py tests/test_cuda_graphs.py tests/test_model_gpu.py tests/test_speed_gpu.py tests/test_executor_gpu.py tests/test_parallel_methods_gpu.py tests/test_engine_gpu.py ;;
  # Issue 17: the step per speed option (compiled, fp8, eager; degree 2 with chunked exchanges on 2+ GPUs),
  # FP8 quality, and a fresh profile of the compiled model (all degrees of this machine).
  speed)   run speed 900 $PY bench/step_bench.py --devices "$devs" --degrees $([ "$ngpu" -ge 2 ] && echo 1,2 || echo 1) \
           --variants ${SPEED_VARIANTS:-compiled,fp8,eager$([ "$ngpu" -ge 2 ] && echo ,compiled+c2,compiled+c4)} \
           --sizes 1024,2048 --quality --profile-out "$OUT/flux-dev-${ngpu}xH200.json" --output "$OUT/step-bench.jsonl" ;;
  regroup) run regroup 120 $PY bench/regroup.py --device cuda --output "$OUT/regroup.jsonl" ;;
  runtime) run runtime 200 $PY bench/runtime_check.py --models flux-dev --devices "$devs" --sizes 256,512,1024,2048 --graphs ${GRAPHS:-on} --output "$OUT/runtime.jsonl" ;;
  profile) run profile 200 $PY bench/profile_steps.py --model flux-dev --devices "$devs" --degrees 1,2 --steps 20 --output "$OUT/flux-dev-${ngpu}xH200.json" --table "$OUT/profile.md" ;;
  cache)   run cache 120 $PY bench/cache_bench.py --model flux-dev --devices "$devs" --size 1024x1024 --steps 28 --seeds 1 --repeats 1 --analysis-prompts 2 --output "$OUT/cache.jsonl" ;;
  overhead) run overhead 90 $PY bench/engine_overhead.py --model flux-dev --devices "$devs" --sizes 512,1024 --steps 20 --profile "$OUT/flux-dev-${ngpu}xH200.json" --output "$OUT/overhead.jsonl" ;;
  # Issue 16 (sd3-medium, ~15 min on 2xH200): degree 2 vs 1 per guidance branch, the CFG-parallel step, the
  # patch-parallel decode (runtime-sd3); the profile with layout rows (profile-sd3); SAR with and without them.
  runtime-sd3) run runtime-sd3 600 $PY bench/runtime_check.py --models sd3-medium --devices "$devs" --sizes 512,1024,2048 --output "$OUT/runtime-sd3.jsonl" ;;
  profile-sd3) run profile-sd3 900 $PY -m tetri_engine profile --model sd3-medium --devices "$devs" --resolutions 256,512,1024,2048 \
           --degrees 1,2 --batches 1 --steps 20 --output "$OUT/sd3-medium-${ngpu}xH200.json" --table "$OUT/profile-sd3.md" ;;
  sim-sd3) run sim-sd3 600 $PY bench/sim_layouts.py --profile "$OUT/sd3-medium-${ngpu}xH200.json" --gpus "$ngpu" --output "$OUT/sim-layouts" ;;
  corun)   if [ "$ngpu" -ge 2 ]; then run corun 300 $PY bench/corun_interference.py --model flux-dev --devices "$devs" --big 2048 --small 256,512,1024 --small-steps 20 --variants fixed,coupled,cond-on-encoder,python-loop --output "$OUT/corun.jsonl"
           else run corun 240 $PY bench/corun_interference.py --model flux-dev --devices cuda:0 --same-device --big 2048 --small 512 --small-steps 20 --variants fixed,coupled,python-loop --output "$OUT/corun.jsonl"; fi ;;
  # Issue 7: the same traces through xDiT (one launch, both mixes) and through the engine (every policy).
  e2e-traces) $PY bench/e2e_slo.py --traces-only --profile bench/profiles/flux-dev-${ngpu}xH200.json --devices "$devs" \
           --mix ${E2E_MIX:-skewed,uniform} --num-requests ${E2E_N:-8,6} --output "$OUT/e2e" ;;
  xdit-serve) run xdit-serve 900 $PY -m torch.distributed.run --standalone --nproc_per_node=2 bench/xdit_baseline.py serve \
           --trace "$OUT/e2e/trace-skewed.jsonl,$OUT/e2e/trace-uniform.jsonl" --labels skewed,uniform \
           --slo-scales 1.0,1.1,1.2,1.5 --max-seconds 800 --output "$OUT/xdit-serve.jsonl" ;;
  e2e)     run e2e 3600 $PY bench/e2e_slo.py --model flux-dev --devices "$devs" --profile bench/profiles/flux-dev-${ngpu}xH200.json \
           --mix ${E2E_MIX:-skewed,uniform} --num-requests ${E2E_N:-8,6} --slo-scales 1.0,1.1,1.2,1.5 \
           --policies tetri,fixed1,fixed2,rssp --output "$OUT/e2e" ;;
  xdit)    run xdit-step 240 $PY -m torch.distributed.run --standalone --nproc_per_node=2 bench/xdit_baseline.py step --resolutions 256,512,1024,2048 --iters 10 --output "$OUT/xdit-step.jsonl" ;;
  *) echo "unknown stage $s" ;;
esac; done
