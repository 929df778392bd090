#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every worker runs the same command, detached; JAX joins them into one mesh.
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b REPO=https://github.com/YOUR_ORG/vitdistill.git
#   launch/tpu_pod.sh create            # the TPU VM (TPU_TYPE, default v4-32; RUNTIME), unless it exists
#   launch/tpu_pod.sh setup             # clone or pull REPO (BRANCH, default main) and pip install, every worker
#   launch/tpu_pod.sh start configs/deit_s.py gs://BUCKET/runs/deit_s --config.data.data_dir=gs://BUCKET/tfds
#   launch/tpu_pod.sh logs [WORKER]     # follow a worker's log (default 0; each worker has its own)
#   launch/tpu_pod.sh stop              # SIGTERM on every worker: they save a checkpoint together and exit 0
#   DRY_RUN=1 launch/tpu_pod.sh ...     # print the gcloud commands instead of running them
#
# `start` detaches the run on each worker (nohup), so a dropped connection loses nothing; its output goes to
# ~/vitdistill-logs/run.log there. Arguments are quoted for the remote shell one by one, so an override such
# as --config.multicrop.global_scale="(0.3, 1.0)" arrives as it was typed. Re-running `start` with the same
# workdir resumes from its latest checkpoint.
set -euo pipefail
usage="usage: tpu_pod.sh create | setup | start CONFIG WORKDIR [--config.KEY=VALUE ...] | logs [WORKER] | stop"
action=${1:?$usage}
shift
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
TPU_TYPE=${TPU_TYPE:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
BRANCH=${BRANCH:-main}
LOG=\~/vitdistill-logs/run.log
VENV=\~/.vitdistill-venv

run() {  # a command, or with DRY_RUN=1 the command as a shell would read it
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "${@@Q}"
  else
    "$@"
  fi
}

on_workers() {  # on_workers WORKERS REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="$1" --command "$2"
}

case "$action" in
  create)
    if [ "${DRY_RUN:-0}" != 1 ] && gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
      echo "tpu_pod.sh: $TPU_NAME exists in $ZONE; reusing it"
    else
      run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$TPU_TYPE" \
          --version "$RUNTIME"
    fi
    ;;
  setup)
    REPO=${REPO:?set REPO to the git URL of your vitdistill copy}
    repo=$(printf '%q' "$REPO")
    branch=$(printf '%q' "$BRANCH")
    on_workers all "set -e; if [ ! -d ~/vitdistill ]; then git clone -q --branch $branch $repo ~/vitdistill; fi; \
cd ~/vitdistill && git fetch -q origin $branch && git checkout -q $branch && git pull -q --ff-only; \
python3 -m venv $VENV && . $VENV/bin/activate && pip install -q -U 'jax[tpu]' && pip install -q -e ."
    ;;
  start)
    CONFIG=${1:?$usage}
    WORKDIR=${2:?$usage}
    shift 2
    args=""
    for arg in "--config=$CONFIG" "--workdir=$WORKDIR" --distributed "$@"; do
      args+=" $(printf '%q' "$arg")"
    done
    on_workers all "set -e; cd ~/vitdistill && . $VENV/bin/activate && mkdir -p ~/vitdistill-logs; \
nohup python -m vitdistill.main$args >> $LOG 2>&1 < /dev/null & \
echo \"worker \$(hostname): started, pid \$!; log $LOG\""
    echo "tpu_pod.sh: follow with: launch/tpu_pod.sh logs [WORKER]; stop (saving a checkpoint) with: launch/tpu_pod.sh stop"
    ;;
  logs)
    on_workers "${1:-0}" "tail -n 100 -F $LOG"
    ;;
  stop)
    on_workers all "pkill -TERM -f 'python -m vitdistill.main' && echo \"worker \$(hostname): SIGTERM sent\" || echo \"worker \$(hostname): no run\""
    ;;
  *)
    echo "$usage" >&2
    exit 2
    ;;
esac
