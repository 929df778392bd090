"""One of two processes (jax.distributed on localhost, one CPU device each) reading DeiT-style training batches
(repeated augmentation, 3 copies) of the tests' ArrayRecord dataset; writes which examples it holds and which
the assembled global batch holds, by device:

    python tests/two_process_rows.py PORT PROCESS_ID DATA_DIR OUT.json
"""
import dataclasses
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from vitdistill.data import pipeline, sources  # noqa: E402
from vitdistill.train import sharding  # noqa: E402

SEED, BATCH, STEPS = 3, 12, 4


def main(port, process_id, data_dir, out):
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))
    source = sources.tfds_source("tiny_digits", "train", data_dir)
    by_index = dataclasses.replace(source, load=lambda i: {"image": source.load(i)["image"],
                                                           "label": tf.cast(i, tf.int32)})  # label := index
    batches = pipeline.train_dataset(by_index, lambda image, seed: {"image": tf.zeros([1])}, seed=SEED,
                                     global_batch=BATCH, process_index=jax.process_index(),
                                     process_count=jax.process_count(), num_shards=jax.device_count(),
                                     repeats=3).as_numpy_iterator()
    mesh = sharding.make_mesh()
    local, assembled = [], []
    for _ in range(STEPS):
        batch = next(batches)
        local.append(batch["label"].tolist())
        global_labels = sharding.to_global({"label": batch["label"]}, mesh)["label"]
        assembled.append(np.asarray(multihost_utils.process_allgather(global_labels, tiled=True)).tolist())
    with open(out, "w") as f:
        json.dump({"local": local, "global": assembled}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
