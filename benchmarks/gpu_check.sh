#!/usr/bin/env bash
# One call on a GPU machine: build the ptq CUDA kernels, run the `gpu` tests, then
# benchmarks/gpu_kernels.py (correctness of every kernel path + speed vs torch.matmul; the
# bit-stream INT3/5/6 and FP6 GEMVs against the reference and their GB/s vs the INT4 GEMV).
#
# Usage (repository root, a CUDA torch and nvcc on the machine):
#   bash benchmarks/gpu_check.sh [LOG_DIR]        # SKIP_BENCH=1 to stop after the tests
# It does not pip-install anything: ptq is laid out under a temporary folder with the
# package-dir mapping of pyproject.toml (passes/, calibration/, exporters/ -> ptq.*).
set -uo pipefail
log="${1:-${OUT:-/tmp/ptq_gpu_logs}}"
mkdir -p "$log"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/ptq_torch_ext MAX_JOBS="$(nproc)"
site=/tmp/ptq_site
rm -rf "$site" && mkdir -p "$site/ptq"
cp -r ptq/. "$site/ptq/"
for pkg in passes calibration exporters; do cp -r "$pkg" "$site/ptq/$pkg"; done
export PYTHONPATH="$site"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv | tee "$log/smi.txt"
python3 -P -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -n 2

echo "== build"
timeout 300 python3 -P -c "
import time
from ptq.exporters.cuda.build import load_extension
t = time.time(); load_extension(verbose=True); print(f'build OK {time.time() - t:.1f} s')
" >"$log/build.log" 2>&1
rc=$?
grep -E "error|warning|build OK" "$log/build.log" | head -n 40
tail -n 5 "$log/build.log"
[ "$rc" = 0 ] || { echo "build FAILED (rc $rc)"; exit 1; }

echo "== gpu tests"
timeout 180 python3 -P -m pytest -q -m gpu -p no:cacheprovider \
    tests/exporters/cuda/test_gpu.py tests/formats/test_quantizer.py 2>&1 | tee "$log/pytest.log" | tail -n 25

[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
echo "== benchmark"
timeout "${BENCH_TIMEOUT:-330}" python3 -P benchmarks/gpu_kernels.py >"$log/bench.log" 2>&1
echo "bench rc $?"
grep -E "^(FAIL|ERROR)" "$log/bench.log" | head -n 30
sed -n "/==== final table: correctness/,/==== final table: speed/p" "$log/bench.log"; grep -E "us .*GB/s" "$log/bench.log" | awk "!seen[\$0]++"
