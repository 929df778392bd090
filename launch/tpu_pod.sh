#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every host runs the same command; JAX joins them into one mesh.
#
#   REPO=https://github.com/YOUR_ORG/vitdistill.git TPU_NAME=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh configs/deit_s.py gs://BUCKET/runs/deit_s \
#       --config.data.data_dir=gs://BUCKET/tensorflow_datasets
#
# Each host reads only its own shard of the data (jax.process_index() of jax.process_count());
# checkpoints and metrics go to the (GCS) workdir, and re-running the same command resumes.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=${1:?usage: tpu_pod.sh CONFIG WORKDIR [--config.KEY=VALUE ...]}
WORKDIR=${2:?usage: tpu_pod.sh CONFIG WORKDIR [--config.KEY=VALUE ...]}
shift 2
REPO=${REPO:?set REPO to the git URL of your vitdistill copy}
BRANCH=${BRANCH:-main}

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  if [ ! -d vitdistill ]; then git clone -q --branch $BRANCH $REPO vitdistill; fi
  cd vitdistill && git pull -q
  python3 -m venv ~/.vitdistill-venv && . ~/.vitdistill-venv/bin/activate
  pip install -q -U 'jax[tpu]' && pip install -q -e .
  python -m vitdistill.main --config=$CONFIG --workdir=$WORKDIR --distributed $*
"
