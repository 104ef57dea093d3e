#!/usr/bin/env bash
# "The best ChatGPT $10 can buy": the whole pipeline on ONE consumer GPU (RTX 5090, 32 GB).
#
#   bash run10.sh                       # ~12 h on an RTX 5090 (~$0.70/h rented) ~= $8-10
#   WANDB_RUN=myrun bash run10.sh       # with wandb logging
#
# Sizing (why these numbers): depth 12 (~140M params with the 65,536-token embedding and head),
# 8192-token context at device_batch_size=1, about 10 tokens per parameter of pretraining. d12 at
# 8192 tokens needs no memory saving on a 32 GB card (planned peak ~6 GiB dense), so the default is
# plain dense training (MEMORY_MODE=custom). Which mode for which card and size, from the planner
# (python -m nanochat.memory --sweep_depths=True --gpu_memory=16GB|24GB|32GB; 8192 x 1, vocab 65,536,
# max(2 GiB, 5%) kept free):
#   deepest depth        16 GB   24 GB   32 GB
#   dense                 20      25      28      fastest; pick it whenever it fits
#   recompute=block       23      28      32
#   MEMORY_MODE=keep_h    24      30      36      MoleGrad on all Linears, h kept: fewer dW FLOPs
#   MEMORY_MODE=low       26      34      38      block recompute + MoleGrad on the MLPs + low-rank momentum
#   MEMORY_MODE=lowest    30      38      44      the same on all Linears
# Quality (bench/molegrad_quality.py, CPU, k/in of k=32 at d20): low's compression costs no measured
# quality; keep_h and lowest compress attention too and lost 15% val bpb there: prefer low.
# e.g. MEMORY_MODE=low DEPTH=34 GPU_MEMORY=24GB bash run10.sh. The memory plan below is printed
# first and the run stops if it does not fit. Every size is an environment variable, so the same
# command lines run tiny on CPU (tests/test_run10.py runs exactly this file with tiny values).
set -euo pipefail
cd "$(dirname "$0")"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
WANDB_RUN=${WANDB_RUN:-dummy}

DEVICE=${DEVICE:-cuda}                      # every stage runs here, or stops with one line (never a silent CPU fallback)
DEPTH=${DEPTH:-12}
SEQ=${SEQ:-8192}
DEVICE_BATCH=${DEVICE_BATCH:-1}
TOTAL_BATCH=${TOTAL_BATCH:-262144}          # tokens per optimizer step (32 x 8192)
RANK_K=${RANK_K:-32}                         # MoleGrad rank, for MEMORY_MODE=low|lowest|keep_h
MEMORY_MODE=${MEMORY_MODE:-custom}           # custom (dense) | low | lowest | keep_h
DATA_RATIO=${DATA_RATIO:-10}                 # tokens per parameter
NUM_SHARDS=${NUM_SHARDS:-60}                 # ~250M chars each: enough text for DATA_RATIO
DATA_SOURCE=${DATA_SOURCE:-auto}             # auto: FineWeb-Edu online, the local corpus offline
VOCAB=${VOCAB:-65536}
TOK_CHARS=${TOK_CHARS:-2000000000}
GPU_MEMORY=${GPU_MEMORY:-32GB}
CHAT_SEQ=${CHAT_SEQ:-2048}
MID_STEPS=${MID_STEPS:--1}
SFT_STEPS=${SFT_STEPS:--1}
RL_STEPS=${RL_STEPS:-300}
BASE_STEPS=${BASE_STEPS:--1}                 # -1: from DATA_RATIO
RL_FLAGS=${RL_FLAGS:---examples_per_step=16 --num_samples=8 --max_new_tokens=256}
EVAL_TOKENS=${EVAL_TOKENS:-$((8 * SEQ * 16))}
EVAL_PROBLEMS=${EVAL_PROBLEMS:--1}
CORE_PER_TASK=${CORE_PER_TASK:--1}
EXTRA_TRAIN_FLAGS=${EXTRA_TRAIN_FLAGS:-}

if [ -z "${NANOCHAT_SKIP_SETUP:-}" ]; then
    source runs/setup_env.sh
fi

export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # less fragmentation at the limit
RUN="--device=$DEVICE"

# 0. the machine (device name, capability, torch and CUDA versions, the training attention kernel),
# then the memory plan for these settings: stop here if either is wrong
python -m scripts.device_check --device="$DEVICE"
MEMORY_FLAGS="--memory_mode=$MEMORY_MODE --molegrad_rank_k=$RANK_K"
python -m nanochat.memory --depth="$DEPTH" --max_seq_len="$SEQ" --device_batch_size="$DEVICE_BATCH" $MEMORY_FLAGS \
    --vocab_size="$VOCAB" --gpu_memory="$GPU_MEMORY" --grad_accum_steps=$((TOTAL_BATCH / (DEVICE_BATCH * SEQ))) --require_fit=True

python -m nanochat.report reset

# 1. data (in the background while the tokenizer trains on the first shards)
python -m nanochat.dataset --source="$DATA_SOURCE" -n 8
python -m nanochat.dataset --source="$DATA_SOURCE" -n "$NUM_SHARDS" &
DATA_PID=$!

# 2. tokenizer
python -m scripts.tok_train --vocab_size="$VOCAB" --max_chars="$TOK_CHARS"
python -m scripts.tok_eval
wait "$DATA_PID"

# 3. pretraining at long context
python -m scripts.base_train $RUN --run="$WANDB_RUN" --depth="$DEPTH" --max_seq_len="$SEQ" \
    --device_batch_size="$DEVICE_BATCH" --total_batch_size="$TOTAL_BATCH" --target_param_data_ratio="$DATA_RATIO" \
    --num_iterations="$BASE_STEPS" --eval_tokens="$EVAL_TOKENS" --save_every=500 $MEMORY_FLAGS $EXTRA_TRAIN_FLAGS
python -m scripts.base_loss $RUN --model_tag="d$DEPTH"
python -m scripts.base_eval $RUN --model_tag="d$DEPTH" --max_per_task="$CORE_PER_TASK"

# 4. midtraining, SFT, RL (shorter context: conversations are short)
python -m scripts.mid_train $RUN --run="$WANDB_RUN" --model_tag="d$DEPTH" --max_seq_len="$CHAT_SEQ" \
    --device_batch_size=$((DEVICE_BATCH * 4)) --total_batch_size=$((DEVICE_BATCH * 4 * CHAT_SEQ * 8)) \
    --num_iterations="$MID_STEPS" --eval_tokens="$EVAL_TOKENS" $MEMORY_FLAGS $EXTRA_TRAIN_FLAGS
python -m scripts.chat_eval $RUN -i mid -c "d$DEPTH" --max_problems="$EVAL_PROBLEMS"
python -m scripts.chat_sft $RUN --run="$WANDB_RUN" --model_tag="d$DEPTH" --max_seq_len="$CHAT_SEQ" \
    --num_iterations="$SFT_STEPS" $MEMORY_FLAGS $EXTRA_TRAIN_FLAGS
python -m scripts.chat_eval $RUN -i sft -c "d$DEPTH" --max_problems="$EVAL_PROBLEMS"
python -m scripts.chat_rl $RUN --run="$WANDB_RUN" --model_tag="d$DEPTH" --num_iterations="$RL_STEPS" $RL_FLAGS $MEMORY_FLAGS $EXTRA_TRAIN_FLAGS
python -m scripts.chat_eval $RUN -i rl -c "d$DEPTH" -a GSM8K --max_problems="$EVAL_PROBLEMS"

# 5. the report card
python -m nanochat.report generate
echo "done: $NANOCHAT_BASE_DIR/report/report.md   chat with: python -m scripts.chat_web"
