#!/usr/bin/env bash
# Render scripts/slurm/train.sbatch and submit it with sbatch, or print it (--dry-run).
#   NODES=4 GPUS_PER_NODE=8 TIME=48:00:00 scripts/slurm/submit.sh [--dry-run]
# Settings (environment, defaults below): JOB_NAME NODES GPUS_PER_NODE CPUS_PER_TASK TIME PARTITION
# CONFIG (space-separated YAMLs, in order) EXTRA_ARGS (more `fit` arguments) PYTHON LOG_DIR.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
JOB_NAME=${JOB_NAME:-mige}
NODES=${NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-8}
TIME=${TIME:-24:00:00}
PARTITION=${PARTITION:-}
CONFIG=${CONFIG:-configs/mige_xl.yaml configs/trainer/fsdp.yaml}
EXTRA_ARGS=${EXTRA_ARGS:-}
PYTHON=${PYTHON:-.venv/bin/python}
LOG_DIR=${LOG_DIR:-$repo/runs/slurm-logs}

# Values reach the job script shell-quoted (printf %q: '&', '|', ';', spaces stay literal) and are
# escaped for sed. EXTRA_ARGS is split into words on spaces, each word quoted.
q() { printf '%q' "$1"; }
sed_escape() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }

config_args=""
strategy_args=""
for c in $CONFIG; do
    test -f "$repo/$c" || test -f "$c" || { echo "CONFIG: no such file: $c" >&2; exit 2; }
    config_args+=" --config $(q "$c")"
    # the FSDP overlay's data-parallel group is every rank of the job
    case $c in *trainer/fsdp.yaml) strategy_args='--trainer.strategy.init_args.data_parallel_size="${SLURM_NTASKS}"' ;; esac
done

extra_args=""
read -r -a extra_words <<< "$EXTRA_ARGS"
for w in "${extra_words[@]}"; do extra_args+=" $(q "$w")"; done

script=$(sed \
    -e "s|{{JOB_NAME}}|$(sed_escape "$JOB_NAME")|g" \
    -e "s|{{NODES}}|$(sed_escape "$NODES")|g" \
    -e "s|{{GPUS_PER_NODE}}|$(sed_escape "$GPUS_PER_NODE")|g" \
    -e "s|{{CPUS_PER_TASK}}|$(sed_escape "$CPUS_PER_TASK")|g" \
    -e "s|{{TIME}}|$(sed_escape "$TIME")|g" \
    -e "s|{{PARTITION}}|$(sed_escape "$PARTITION")|g" \
    -e "s|{{LOG_DIR}}|$(sed_escape "$LOG_DIR")|g" \
    -e "s|{{WORKDIR}}|$(sed_escape "$(q "$repo")")|g" \
    -e "s|{{PYTHON}}|$(sed_escape "$(q "$PYTHON")")|g" \
    -e "s|{{CONFIG_ARGS}}|$(sed_escape "${config_args# }")|g" \
    -e "s|{{STRATEGY_ARGS}}|$(sed_escape "$strategy_args")|g" \
    -e "s|{{EXTRA_ARGS}}|$(sed_escape "${extra_args# }")|g" \
    -e '/^#SBATCH --partition=$/d' \
    "$here/train.sbatch")
script=$(printf '%s\n' "$script" | sed -e 's/ *$//')

if [ "${1:-}" = "--dry-run" ]; then
    printf '%s\n' "$script"
else
    mkdir -p "$LOG_DIR"
    printf '%s\n' "$script" | sbatch
fi
