"""Adds ArrayRecord shards to a TFDS dataset prepared as TFRecord, so it is read with random access.

    python -m vitdistill.data.tfds_convert ~/tensorflow_datasets/imagenet2012/5.1.0

Each `NAME-SPLIT.tfrecord-XXXXX-of-YYYYY` gets an `NAME-SPLIT.array_record-XXXXX-of-YYYYY` beside it holding
the same serialized examples in the same order (what `tfds build --file_format=array_record` writes), and
`dataset_info.json` lists `array_record` as an alternative format; the TFRecord files stay. It does what
`tfds convert_format` does without Apache Beam, which the `tfds` command of TFDS 4.9 needs to start at all.
A shard is written under a temporary name and renamed when complete, so an interrupted conversion resumes
where it stopped when run again.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import sys

from vitdistill.errors import DataError

SHARD = re.compile(r"^(?P<prefix>.+)\.tfrecord-(?P<shard>\d{5}-of-\d{5})$")
INFO = "dataset_info.json"


def convert(version_dir: str, workers: int = 0) -> dict:
    """Writes the ArrayRecord shards of every TFRecord shard in `version_dir`; returns {shard name: examples}."""
    info_path = os.path.join(version_dir, INFO)
    if not os.path.isfile(info_path):
        raise DataError(f"{version_dir!r} holds no {INFO}: pass a prepared dataset's version folder, e.g. "
                        "~/tensorflow_datasets/imagenet2012/5.1.0")
    with open(info_path) as f:
        info = json.load(f)
    expected = _shard_lengths(info)
    shards = sorted(name for name in os.listdir(version_dir) if SHARD.match(name))
    if not shards:
        raise DataError(f"{version_dir!r} has no TFRecord shards (NAME-SPLIT.tfrecord-XXXXX-of-YYYYY) to convert")
    workers = workers or min(len(shards), os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        counts = dict(zip(shards, pool.map(lambda name: _convert_shard(version_dir, name), shards)))
    for name, count in counts.items():
        want = expected.get(name)
        if want is not None and count != want:
            raise DataError(f"{name} holds {count} examples where {INFO} says {want}: the dataset is damaged; "
                            "prepare it again")
    formats = info.setdefault("alternativeFileFormats", [])
    if "array_record" not in formats and info.get("fileFormat") != "array_record":
        formats.append("array_record")
        tmp = info_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, info_path)
    return counts


def _shard_lengths(info: dict) -> dict:
    """{TFRecord shard file name: examples} from dataset_info.json (TFDS writes shardLengths as strings)."""
    lengths = {}
    name = info.get("name", "")
    for split in info.get("splits", []):
        counts = [int(n) for n in split.get("shardLengths", [])]
        for i, n in enumerate(counts):
            lengths[f"{name}-{split['name']}.tfrecord-{i:05d}-of-{len(counts):05d}"] = n
    return lengths


def _convert_shard(version_dir: str, name: str) -> int:
    import tensorflow as tf
    from array_record.python.array_record_module import ArrayRecordWriter

    match = SHARD.match(name)
    target = os.path.join(version_dir, f"{match['prefix']}.array_record-{match['shard']}")
    if os.path.exists(target):  # finished by an earlier run (written under a temporary name, then renamed)
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        return len(ArrayRecordDataSource([target]))
    tmp = target + ".incomplete"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    count = 0
    try:
        for record in tf.data.TFRecordDataset(os.path.join(version_dir, name)).as_numpy_iterator():
            writer.write(record)
            count += 1
    finally:
        writer.close()
    os.replace(tmp, target)
    return count


def main(argv) -> int:
    if len(argv) != 2 or argv[1].startswith("-"):
        print(__doc__.strip().splitlines()[0] + "\nusage: python -m vitdistill.data.tfds_convert VERSION_DIR",
              file=sys.stderr)
        return 2
    try:
        counts = convert(os.path.expanduser(argv[1]))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or argv[1]}: {e.strerror or e}; check the folder is writable and has room "
              "(ArrayRecord shards are about as large as the TFRecord ones)", file=sys.stderr)
        return 1
    print(f"{argv[1]}: {len(counts)} shards, {sum(counts.values())} examples now also as ArrayRecord")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
