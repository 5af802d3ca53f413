#!/usr/bin/env bash
# The GPU checks of the fast-BRA work, as one command for a lent GPU machine (the device tool's `run`).
# That machine has torch, timm, pytest and matplotlib but no network and no ../shared, so copy the golden
# data into the checkout first (.reference/ is git-ignored) and carry it:
#
#   cp -r ../shared/reference .reference
#   run(command="bash benchmarks/gpu_check.sh", carry=[".reference"], timeout_s=590)
#
# 1. tests/gpu: every backend (FlexAttention included, trained) equal to the reference on CUDA, golden op
#    and model cases on CUDA, a whole training step against the reference backend;
# 2. benchmarks/bench_bra.py --device cuda: timings and CUDA peak memory, results bra_gpu.{md,json,png}.
# Everything lands in $OUT (or /tmp/gpu_check when run elsewhere).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" BILEVEL_REFERENCE="$PWD/.reference"
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" | tee "$out/gpu.txt"
timeout 320 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$out/gpu_tests.log"
timeout 240 python3 benchmarks/bench_bra.py --device cuda --repeats 5 --out "$out" 2>&1 | tail -80 | tee "$out/bench.log"
