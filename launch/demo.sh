#!/usr/bin/env bash
# The main job end to end on the built-in synthetic set (make demo):
#   shards (built by make shards) -> 2-process DeepSpeed training -> evaluation
#   of the final checkpoint (COCO-protocol 1K and 5K tables; the report shows
#   the jpg shards' pictures) -> where to look.
# Re-running it continues the same run (train.resume=auto): a finished run is
# only evaluated again. `make clean-demo` starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=${VPY:-.venv/bin/python}
RUN_ROOT=${RUN_ROOT:-runs}
RUN_NAME=${RUN_NAME:-demo}
RUN="$RUN_ROOT/$RUN_NAME"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

NGPU=$($VPY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null)
if [ "$NGPU" -ge 1 ]; then
  NPROC=$(( NGPU >= 2 ? 2 : 1 ))
  echo "== training on $NPROC GPU(s)"
else
  NPROC=2
  # Two CPU ranks on a small machine: one thread each, or they fight for cores.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  echo "== training on 2 CPU processes (gloo)"
fi
PORT=$($VPY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")

start=$(date +%s)
"$(dirname "$VPY")/deepspeed" --num_gpus "$NPROC" --master_port "$PORT" launch/train.py \
  --config configs/synthetic.yaml train.run_root="$RUN_ROOT" train.run_name="$RUN_NAME" train.resume=auto "$@"
echo "== training took $(( $(date +%s) - start )) s"

LATEST="$RUN/checkpoints/$(cat "$RUN/checkpoints/latest")"
echo "== evaluating $LATEST on the synthetic test split (5,000 images, 25,000 captions)"
# The region shards have no pictures: the report shows those of the jpg shards of the same split.
PICTURES=data/synthetic/shards/jpg/test
IMAGES_FROM=()
[ -f "$PICTURES/manifest.json" ] && IMAGES_FROM=(--images-from "$PICTURES")
OMP_NUM_THREADS=2 $VPY launch/evaluate.py --checkpoint "$LATEST" "${IMAGES_FROM[@]}" eval.protocols='[coco1k,coco5k]'
echo
echo "== done in $(( $(date +%s) - start )) s"
echo "metrics:      $RUN/eval/$(basename "$LATEST")/metrics.json"
echo "report:       $RUN/eval/$(basename "$LATEST")/report.html"
echo "TensorBoard:  tensorboard --logdir $RUN_ROOT   (train/*, val/*, eval/* scalars)"
