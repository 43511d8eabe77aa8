#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one run: the training step at the
# paper's size against bench_reference.py in the same process, the host syncs
# and a profile of the step, a batch sweep, the COCO 5K evaluation, the
# scaling projection from the measured step, and a torch.compile variant.
#
#   bash launch/gpu_bench.sh [REFERENCE]      # REFERENCE: bench_reference.py (default .whl/bench_reference.py)
#
# Results go to $OUT (default ./gpu_bench_out): compiled.json/.log,
# profile_compiled.txt, eager.json/.log, profile_eager.txt. Environment:
# COMPILE (default | reduce-overhead | max-autotune | none), SWEEP (batch
# sizes), REF_VARIANTS, COMPILE_TIMEOUT, PAPER_TIMEOUT (seconds), EAGER=off. Wheels in ./.whl (if any) are
# installed to /tmp/site first, for machines without the dependencies
# (docs/performance.md says how to prepare them).
set -u
OUT=${OUT:-$PWD/gpu_bench_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
REF=${1:-.whl/bench_reference.py}
# The GPU image sets TORCH_CUDA_ARCH_LIST=9.0a, which DeepSpeed's op builder cannot parse.
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.draw --format=csv || true

# 1. The compiled step (train.compile=default) against the reference in the same process, its host syncs
#    (none expected without ZeRO) and its profile.
if [ "${COMPILE:-default}" != "none" ]; then
    timeout "${COMPILE_TIMEOUT:-300}" python3 launch/benchmark.py --preset paper --caption-len 28-32 --steps 30 \
        --warmup 6 --breakdown-steps 0 --sync-debug --profile "$OUT/profile_compiled.txt" --profile-steps 3 \
        --reference "$REF" --reference-variants "${REF_VARIANTS:-reference}" "train.compile=${COMPILE:-default}" \
        --json "$OUT/compiled.json" 2>&1 | grep -v "UserWarning\|warnings.warn" | tee "$OUT/compiled.log"
fi
# 2. The eager step: phases, host syncs, profile, the reference, a batch sweep, the COCO 5K evaluation and the
#    scaling projection from the measured step.
[ "${EAGER:-on}" = off ] || timeout "${PAPER_TIMEOUT:-300}" python3 launch/benchmark.py --preset paper --caption-len 28-32 --steps 30 --warmup 5 \
    --breakdown-steps 5 --sync-debug --profile "$OUT/profile_eager.txt" --profile-steps 3 \
    --reference "$REF" --reference-variants "${REF_VARIANTS:-reference}" --batch-sweep "${SWEEP:-256,512,1024}" \
    --sections train,eval,project --eval-batch 1024 --json "$OUT/eager.json" 2>&1 \
    | grep -v "UserWarning\|warnings.warn" | tee "$OUT/eager.log"
