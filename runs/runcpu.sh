#!/usr/bin/env bash
# The whole pipeline, tiny, on CPU, offline: local corpus -> tokenizer -> base model -> evals.
# Artifacts go to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat). Override sizes with env vars.
set -euo pipefail
cd "$(dirname "$0")/.."
source runs/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
DEPTH=${DEPTH:-4}
SEQ=${SEQ:-256}
STEPS=${STEPS:-300}
VOCAB=${VOCAB:-8192}

python -m nanochat.dataset --source=local
python -m scripts.tok_train --vocab_size="$VOCAB"
python -m scripts.tok_eval
python -m scripts.base_train --depth="$DEPTH" --max_seq_len="$SEQ" --device_batch_size=16 \
    --total_batch_size=$((16 * SEQ)) --num_iterations="$STEPS" --eval_every=100 --eval_tokens=$((64 * SEQ)) \
    --sample_every=-1 --save_every=100 --warmup_ratio=0.0 --warmdown_ratio=0.3
python -m scripts.base_loss --model_tag="d$DEPTH" --split_tokens=$((64 * SEQ))
