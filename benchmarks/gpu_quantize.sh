#!/usr/bin/env bash
# ptq quantize on one GPU at Llama-3-8B shape, in under 10 minutes of an H200.
#
# 1. lays ptq out under a temporary folder (the package-dir mapping of pyproject.toml;
#    nothing is pip-installed: the GPU machine has torch and transformers, no network);
# 2. checks, on a tiny random Llama, that two --device cuda runs write the same bytes;
# 3. writes a random-init model of Llama-3-8B shape (hidden 4096, 32 blocks, intermediate
#    14336, 32 query / 8 KV heads, vocabulary 128256, untied head), bf16, 2 GiB shards,
#    drawing the numbers on the GPU; calibration text and a BPE tokenizer come from this
#    repository's own files;
# 4. runs `ptq quantize --w4a16 --method gptq` and `--w4a8 --smoothquant --method gptq`
#    with 128 x 2048 calibration tokens on --device cuda, each measured for wall time,
#    peak host RSS (benchmarks/measure_run.py) and peak GPU memory (ptq's own report,
#    torch.cuda.max_memory_allocated);
# 5. writes the table to LOG_DIR/gpu_quantize.md.
#
# Usage (repository root of a GPU machine):  bash benchmarks/gpu_quantize.sh [LOG_DIR]
# A dry run of the script's logic on a CPU, on a small shape:
#   DEVICE=cpu SHAPE="--hidden 256 --layers 2 --intermediate 768 --heads 4 --kv-heads 2 \
#     --vocab 16000" CALIB_SAMPLES=8 CALIB_SEQLEN=128 bash benchmarks/gpu_quantize.sh /tmp/x
set -uo pipefail
device="${DEVICE:-cuda}"
shape="${SHAPE:---hidden 4096 --layers 32 --intermediate 14336 --heads 32 --kv-heads 8 --vocab 128256}"
log="${1:-${OUT:-/tmp/ptq_gpu_quantize}}"
mkdir -p "$log"
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 TOKENIZERS_PARALLELISM=false
work="${PTQ_GPU_WORK:-/tmp/ptq_gpu_work}"
mkdir -p "$work"
site=/tmp/ptq_site
rm -rf "$site" && mkdir -p "$site/ptq"
cp -r ptq/. "$site/ptq/"
for pkg in passes calibration exporters; do cp -r "$pkg" "$site/ptq/$pkg"; done
export PYTHONPATH="$site"
py="python3 -P"
ptq="$py -m ptq.cli"
started=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no GPU"; } | tee "$log/smi.txt"
$py -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee "$log/versions.txt"

echo "== calibration text and tokenizer"
$py -c "
import pathlib, sys
files = sorted(p for d in ('ptq', 'passes', 'calibration', 'exporters', 'tests', 'benchmarks', 'docs')
               for p in pathlib.Path(d).rglob('*') if p.suffix in ('.py', '.md'))
text = '\n\n'.join(p.read_text(encoding='utf-8', errors='replace') for p in files)
pathlib.Path(sys.argv[1]).write_text(text, encoding='utf-8')
" "$work/calib.txt"
wc -c "$work/calib.txt"

echo "== determinism: two cuda runs of a tiny model, same bytes?"
$py benchmarks/random_llama.py "$work/tiny" --hidden 256 --layers 2 --intermediate 768 \
    --heads 4 --kv-heads 2 --vocab 16000 --train-tokenizer "$work/calib.txt" --device "$device"
for i in 1 2; do
    $ptq quantize "$work/tiny" --w4a8 --smoothquant --method gptq --device "$device" \
        --calib "$work/calib.txt" --calib-samples 16 --calib-seqlen 256 \
        -o "$work/tiny-$i" -q --overwrite >"$log/tiny-$i.log" 2>&1 || tail -n 20 "$log/tiny-$i.log"
done
if cmp -s "$work/tiny-1/model.safetensors" "$work/tiny-2/model.safetensors"; then
    echo "deterministic: identical model.safetensors" | tee "$log/determinism.txt"
else
    echo "NOT deterministic: the two runs differ" | tee "$log/determinism.txt"
fi

echo "== Llama-3-8B shape, bf16"
t0=$(date +%s)
# shellcheck disable=SC2086  # $shape is a list of arguments
$py benchmarks/random_llama.py "$work/llama8b" $shape --dtype bfloat16 --device "$device" \
    --train-tokenizer "$work/calib.txt" | tee "$log/model.txt"
echo "model written in $(( $(date +%s) - t0 )) s" | tee -a "$log/model.txt"

run() {  # label, ptq arguments...
    local label="$1"; shift
    echo "== $label"
    timeout "${RUN_TIMEOUT:-260}" $py benchmarks/measure_run.py -- $ptq quantize "$work/llama8b" "$@" \
        --device "$device" --calib "$work/calib.txt" --calib-samples "${CALIB_SAMPLES:-128}" \
        --calib-seqlen "${CALIB_SEQLEN:-2048}" \
        -o "$work/out" --overwrite -q >"$log/$label.json"
    echo "rc $?"; cat "$log/$label.json"; echo
    rm -rf "$work/out"
}
run w4a16_gptq --w4a16 --method gptq
run w4a8_sq_gptq --w4a8 --smoothquant --method gptq

$py - "$log" <<'EOF'
import json, pathlib, re, sys
log = pathlib.Path(sys.argv[1])
rows = ["| run | wall s | peak GPU GiB | peak host RSS GiB | exit |", "|---|---|---|---|---|"]
for label in ("w4a16_gptq", "w4a8_sq_gptq"):
    f = log / f"{label}.json"
    if not f.is_file() or not f.read_text().strip():
        rows.append(f"| {label} | - | - | - | did not finish |")
        continue
    m = json.loads(f.read_text())
    gpu = re.search(r"peak GPU memory ([0-9.]+) GiB", m["tail"])
    rows.append(
        f"| {label} | {m['seconds']:.0f} | {gpu.group(1) if gpu else '?'} | "
        f"{m['peak_rss_bytes'] / 2**30:.2f} | {m['returncode']} |"
    )
head = [
    "# ptq quantize at Llama-3-8B shape on one GPU",
    "",
    (log / "smi.txt").read_text().strip() + "; " + (log / "versions.txt").read_text().strip(),
    "",
    "Random-init weights (bf16, hidden 4096, 32 blocks, intermediate 14336, GQA 32/8, "
    "vocabulary 128256, untied), 128 x 2048 calibration tokens, `--device cuda`, "
    "compute dtype auto (the checkpoint's bf16 on CUDA; Hessians and GPTQ in fp32).",
    "",
    (log / "model.txt").read_text().strip().replace("\n", "; "),
    (log / "determinism.txt").read_text().strip() if (log / "determinism.txt").is_file() else "",
    "",
]
(log / "gpu_quantize.md").write_text("\n".join(head + rows) + "\n")
print("\n".join(head + rows))
EOF
echo "total $(( $(date +%s) - started )) s"
