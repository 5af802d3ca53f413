#!/usr/bin/env bash
# The GPU checks of the fast-BRA work, as one command for a lent GPU machine (the device tool's `run`).
# That machine has torch, timm, Lightning, pytest and matplotlib but no network and no ../shared, so copy the
# golden data into the checkout first (.reference/ is git-ignored) and carry it:
#
#   cp -r ../shared/reference .reference
#   run(command="bash benchmarks/gpu_check.sh", carry=[".reference"], timeout_s=595)
#
# Parts, in order (arguments pick some; default all three, about 10 minutes with compilation):
#   tests       tests/gpu: every backend (flex and triton trained) against a float64-anchored reference on
#               CUDA, golden op and model cases on CUDA, whole training steps against the reference backend,
#               the FSDP config's strategy training each family (bf16, SyncBatchNorm)
#   bench       benchmarks/bench_bra.py --device cuda (fp32, TF32 off): bra_gpu.{md,json,png}
#   bench-bf16  the same in bfloat16 (mixed-precision training): bra_gpu_bfloat16.{md,json,png}
# Everything lands in $OUT (or /tmp/gpu_check when run elsewhere); a part cut by its time limit leaves
# what it wrote.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" BILEVEL_REFERENCE="$PWD/.reference"
out="${OUT:-/tmp/gpu_check}"
mkdir -p "$out"
parts=("${@:-tests bench bench-bf16}")
parts=(${parts[*]})
# at most 8 files come back from the device: gpu_tests.log (versions first), bench_stderr.log, and 3 per benchmark
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" > "$out/gpu_tests.log" 2>&1
cat "$out/gpu_tests.log"
bench() {   # stdout (the table) shown, stderr (progress bars, errors) kept in bench_stderr.log
    timeout "$1" python3 benchmarks/bench_bra.py --device cuda --out "$out" "${@:2}" 2>>"$out/bench_stderr.log" | tail -70
    local status=$?
    [ "$status" = 0 ] || { echo "bench_bra ${*:2}: exit $status"; tail -c 3000 "$out/bench_stderr.log"; }
}
for part in "${parts[@]}"; do
    case "$part" in
        tests) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee -a "$out/gpu_tests.log" | tail -40 ;;
        bench) bench 200 --repeats 5 ;;
        bench-bf16) bench 150 --dtype bfloat16 --repeats 3 ;;
        *) echo "unknown part '$part' (tests, bench, bench-bf16)" >&2; exit 2 ;;
    esac
done
