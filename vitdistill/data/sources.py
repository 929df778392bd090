"""Where images come from: scikit-learn's digits, Fashion-MNIST IDX files, an image folder, TFDS.

Every source gives uint8 RGB images and int32 labels. Random-access sources (arrays in
memory, files on disk, TFDS datasets prepared as ArrayRecord) let the pipeline address
example `i` directly, which makes the training stream a pure function of (seed, step) and
resumption exact. TFDS datasets prepared as TFRecord and too large for memory are read
sequentially instead, and say so (`Source.note`).
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import re
import struct
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from vitdistill import paths
from vitdistill.errors import DataError, first_line

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# TFDS datasets smaller than this are loaded into memory and become random access.
IN_MEMORY_LIMIT_BYTES = 2 << 30


@dataclasses.dataclass
class Source:
    """One split of a dataset.

    Exactly one of `load` (random access: scalar int64 index -> {'image', 'label'}) and
    `sequential` ((process_index, process_count, seed) -> tf.data.Dataset) is set.
    `describe(index)` names example `index` in error messages (a file path, say).
    Sources of encoded images (files, TFDS records, the sample photos) also have `load_encoded` (index ->
    {'encoded': the file's bytes, 'label'}; `load` is it decoded by `decode_image(..., jpeg)`), for a
    transform that decodes only the window it crops (`decode_crop`); a sequential one `sequential_encoded`
    (the same stream, undecoded), which the training stream shuffles before it decodes.
    """

    name: str
    num_examples: int
    num_classes: int
    load: Optional[Callable[[tf.Tensor], dict]] = None
    sequential: Optional[Callable[[int, int, int], tf.data.Dataset]] = None
    describe: Callable[[int], str] = lambda i: f"example {i}"
    class_names: Optional[list] = None
    note: str = ""  # what a user should know before training on it (a sequential source's approximate resume)
    skipped: tuple = ()  # (path, reason) of the images left out as undecodable (`data.skip_bad_images`)
    arrays: Optional[tuple] = dataclasses.field(default=None, repr=False)  # in-memory sources: (images, labels)
    load_encoded: Optional[Callable[[tf.Tensor], dict]] = None
    sequential_encoded: Optional[Callable[[int, int, int], tf.data.Dataset]] = None
    jpeg: str = "accurate"  # how `load` decodes JPEGs (config.data.jpeg_decoding)

    @property
    def random_access(self) -> bool:
        return self.load is not None


def in_memory(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int, class_names=None) -> Source:
    """A random-access source over arrays held in memory (grayscale becomes RGB)."""
    images = np.asarray(images)
    gray = images.ndim == 3 or images.shape[-1] == 1
    if gray:
        images = np.repeat(images.reshape(images.shape[:3] + (1,)), 3, axis=-1)
    if images.dtype != np.uint8:
        raise DataError(f"{name}: images must be uint8, got {images.dtype}")
    tensors = []  # made at the first read (eagerly, outside any tf.function): a source that only reports its
    # size and classes (a train-step benchmark, say) needs no TensorFlow

    def load(index):
        if not tensors:
            with tf.init_scope():
                tensors.extend([tf.constant(images), tf.constant(np.asarray(labels, np.int32))])
        return {"image": tf.gather(tensors[0], index), "label": tf.gather(tensors[1], index)}

    return Source(name, len(images), num_classes, load=load, class_names=class_names,
                  arrays=(images[..., 0] if gray else images, np.asarray(labels, np.int32)))


def _train_and_test_only(name: str, split: str) -> DataError:
    return DataError(f"{name} has splits 'train' and 'test', not {split!r}: use --config.data.train_split=train and "
                     "--config.data.eval_split=test")


def digits(split: str, *, test_fraction: float = 0.2) -> Source:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes): ships with scikit-learn, no download.

    A fixed, stratified split: the same `test_fraction` of each class goes to 'test'.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
    labels = data.target.astype(np.int32)
    order = np.random.RandomState(0).permutation(len(labels))
    is_test = np.zeros(len(labels), bool)
    for c in range(10):
        members = order[labels[order] == c]
        is_test[members[: int(round(len(members) * test_fraction))]] = True
    if split == "train":
        keep = np.flatnonzero(~is_test)
    elif split == "test":
        keep = np.flatnonzero(is_test)
    else:
        raise _train_and_test_only("digits", split)
    return in_memory(f"digits:{split}", images[keep], labels[keep], 10, [str(c) for c in range(10)])


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST."""
    with paths.open_file(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (magic {raw[:4].hex()}); "
                        "re-install it with `apt-get install --reinstall dataset-fashion-mnist`")
    ndim = raw[3]
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {data.size} bytes of data; "
                        "re-install it with `apt-get install --reinstall dataset-fashion-mnist`")
    return data.reshape(shape)


def fashion_mnist(split: str, data_dir: Optional[str] = None) -> Source:
    """Fashion-MNIST from local IDX files (Debian's `dataset-fashion-mnist` puts them in FASHION_MNIST_DIR)."""
    data_dir = data_dir or FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise _train_and_test_only("fashion_mnist", split)
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [os.path.join(data_dir, f"{prefix}-{kind}{ext}") for ext in (".gz", "")]
        found = [p for p in candidates if paths.exists(p)]
        if not found:
            raise DataError(f"Fashion-MNIST not found: looked for {candidates[0]} (or without .gz). Install it with "
                            "`sudo apt-get install dataset-fashion-mnist`, or set --config.data.data_dir to a folder "
                            "holding the four IDX files.")
        files.append(found[0])
    images, labels = read_idx(files[0]), read_idx(files[1])
    if len(images) != len(labels):
        raise DataError(f"{files[0]} has {len(images)} images but {files[1]} has {len(labels)} labels")
    return in_memory(f"fashion_mnist:{split}", images, labels, 10, FASHION_MNIST_CLASSES)


FASHION_SMALL_CLASSES = (5, 6, 7, 8, 9)  # Sandal, Shirt, Sneaker, Bag, Ankle boot
FASHION_SMALL_SIZES = {"train": 3_000, "test": 1_000}


def fashion_small(split: str, data_dir: Optional[str] = None) -> Source:
    """A third small data set built from Fashion-MNIST (no download beyond its Debian package): its last five
    classes at 14 px (each pixel the rounded mean of a 2x2 block), the first 3,000 training and 1,000 test
    images of those classes. Smaller, coarser and with fewer classes than either digits or Fashion-MNIST, so
    that a small-data recipe is tried on something it was not written for."""
    if split not in FASHION_SMALL_SIZES:
        raise _train_and_test_only("fashion_small", split)
    full = fashion_mnist(split, data_dir)
    images, labels = full.arrays
    keep = np.flatnonzero(np.isin(labels, FASHION_SMALL_CLASSES))[: FASHION_SMALL_SIZES[split]]
    blocks = images[keep].astype(np.float64).reshape(len(keep), 14, 2, 14, 2)
    small = np.floor(blocks.mean(axis=(2, 4)) + 0.5).astype(np.uint8)
    names = [FASHION_MNIST_CLASSES[c] for c in FASHION_SMALL_CLASSES]
    return in_memory(f"fashion_small:{split}", small, labels[keep] - FASHION_SMALL_CLASSES[0], 5, names)


JPEG_DECODING = {"accurate": "INTEGER_ACCURATE", "fast": ""}  # config.data.jpeg_decoding -> TF's dct_method


def check_jpeg_decoding(jpeg: str) -> str:
    if jpeg not in JPEG_DECODING:
        raise DataError(f"config.data.jpeg_decoding={jpeg!r}; use 'accurate' (PIL's pixels, the default) or 'fast' "
                        "(TF's fast IDCT: about 1.3x the decoding rate, pixels off by about 1 level)")
    return jpeg


def decode_image(data, jpeg: str = "accurate") -> "tf.Tensor":
    """uint8 [H, W, 3] of an encoded image (a graph op). With `jpeg='accurate'` JPEGs are decoded with
    libjpeg's accurate integer IDCT, which gives PIL's pixels, and so torchvision's, bit for bit; 'fast' is
    TF's default fast IDCT (off by 1-1.3 levels on average, up to 18; 1.28x the decoding rate of 427x640
    JPEGs measured on one core). Other formats: tf.io.decode_image."""
    dct_method = JPEG_DECODING[check_jpeg_decoding(jpeg)]
    image = tf.cond(tf.io.is_jpeg(data),
                    lambda: tf.io.decode_jpeg(data, channels=3, dct_method=dct_method),
                    lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    return image


JPEG_BLOCK = 16  # the widest MCU (4:2:0 and 4:2:2 chroma): decode_crop's column margin and alignment


def decode_crop(data, crop_box_of: Callable, jpeg: str = "accurate") -> "tf.Tensor":
    """uint8 [h, w, 3]: the window of an encoded image that `crop_box_of(height, width)` picks for the image's
    size (int32 [4]: top, left, h, w), the same pixels as `decode_image(data, jpeg)` then that slice.

    JPEGs are not decoded whole: their size is read from the header and only the window's rows are decoded
    (`tf.io.decode_and_crop_jpeg`), over its columns widened to 16-pixel blocks and 16 more on either side.
    Cropped to the exact columns, libjpeg-turbo's upsampling of subsampled chroma differs at the window's left and
    right edges (up to 22 levels, in 247 of 600 random windows of JPEGs with 4:2:0 or 4:2:2 chroma and a width
    not a multiple of 16); widened, none of 1,800 windows (4:4:4, 4:2:2, 4:2:0, grayscale) differed. For a
    427x640 photo and RandomResizedCrop's windows that took 0.79 of a whole decode's time. A JPEG that does not
    end with its end-of-image marker (cut short, or with bytes after it) is decoded whole, as are other formats,
    then sliced: libjpeg reads a window's rows only, so a file cut short below the window would decode, where the
    whole decoding (and Pillow's) refuses it."""
    dct_method = JPEG_DECODING[check_jpeg_decoding(jpeg)]

    def jpeg_window():
        shape = tf.io.extract_jpeg_shape(data, output_type=tf.int32)
        top, left, height, width = tf.unstack(crop_box_of(shape[0], shape[1]))
        first = tf.maximum(0, left // JPEG_BLOCK * JPEG_BLOCK - JPEG_BLOCK)
        end = tf.minimum(shape[1], -(-(left + width) // JPEG_BLOCK) * JPEG_BLOCK + JPEG_BLOCK)
        rows = tf.io.decode_and_crop_jpeg(data, tf.stack([top, first, height, end - first]), channels=3,
                                          dct_method=dct_method)
        return rows[:, left - first:left - first + width]

    def whole_then_slice():
        image = decode_image(data, jpeg)
        shape = tf.shape(image, out_type=tf.int32)
        top, left, height, width = tf.unstack(crop_box_of(shape[0], shape[1]))
        return image[top:top + height, left:left + width]

    length = tf.strings.length(data)
    complete = tf.logical_and(tf.io.is_jpeg(data), tf.logical_and(
        length >= 4, tf.equal(tf.strings.substr(data, tf.maximum(length - 2, 0), 2), b"\xff\xd9")))
    crop = tf.cond(complete, jpeg_window, whole_then_slice)
    crop.set_shape([None, None, 3])
    return crop


def image_folder(root: str, split: Optional[str] = None, *, class_names: Optional[list] = None,
                 jpeg: str = "accurate", scan: bool = False, skip_bad: bool = False) -> Source:
    """Images in `root/<split>/<class>/*.{jpg,png,...}` (or `root/<class>/...` with no split).

    Classes are the sorted sub-folder names of the split (pass `class_names` to share
    the training split's list with the evaluation split). `scan`: every image is decoded first and the
    bad ones are refused together, by name. `skip_bad`: the scan's bad images are left out instead (the
    source's `skipped` and `note` list them).
    """
    directory = os.path.join(root, split) if split else root
    if not paths.isdir(directory):
        raise DataError(f"Image folder {directory!r} does not exist. Expected {root}/<split>/<class>/*.jpg "
                        f"(split {split!r}); set --config.data.data_dir and the split names.")
    discovered = not class_names
    class_names = class_names or sorted(d for d in paths.listdir(directory) if paths.isdir(os.path.join(directory, d)))
    if not class_names:
        raise DataError(f"{directory!r} has no class sub-folders; expected {directory}/<class>/*.jpg")
    files, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(directory, name)
        if not paths.isdir(class_dir):
            continue
        for file in sorted(paths.listdir(class_dir)):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(class_dir, file))
                labels.append(label)
    if not files:
        raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {directory} (the layout "
                        f"is {directory}/<class>/<image>): put the images there, or point --config.data.data_dir at "
                        "the folder that holds the split folders")
    empty = _empty_classes(class_names, labels) if discovered else []
    if empty:  # torchvision's ImageFolder refuses them too: a class no image can teach
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(f"{len(empty)} class folder(s) of {directory!r} hold no images ({', '.join(IMAGE_EXTENSIONS)}): "
                        f"{shown}. Remove them or add images; every sub-folder is a class.")
    skipped = ()
    if scan or skip_bad:
        bad = scan_images(tuple(files), jpeg)
        if bad and not skip_bad:
            raise DataError(_bad_images_message(directory, bad, len(files)) + " Remove or replace them, or train "
                            "without them with --config.data.skip_bad_images=True.")
        if bad:
            dropped = {path for path, _ in bad}
            kept = [(f, label) for f, label in zip(files, labels) if f not in dropped]
            if not kept:
                raise DataError(_bad_images_message(directory, bad, len(files)) + " No image of it decodes.")
            files, labels = map(list, zip(*kept))
            skipped = tuple(bad)
            emptied = _empty_classes(class_names, labels) if discovered else []
            if emptied:
                raise DataError(_bad_images_message(directory, bad, len(files) + len(bad)) + f" Without them the "
                                f"class folder(s) {', '.join(emptied[:5])} hold no image; fix or remove those.")
    paths_t = tf.constant(files)
    labels_t = tf.constant(np.asarray(labels, np.int32))

    def load_encoded(index):
        return {"encoded": tf.io.read_file(tf.gather(paths_t, index)), "label": tf.gather(labels_t, index)}

    note = (_bad_images_message(directory, skipped, len(files) + len(skipped),
                                "do not decode and are left out (data.skip_bad_images)") if skipped else "")
    return Source(f"folder:{directory}", len(files), len(class_names), load=_decoding(load_encoded, jpeg),
                  describe=lambda i: files[i], class_names=list(class_names), note=note, skipped=skipped,
                  load_encoded=load_encoded, jpeg=jpeg)


def decoded(jpeg: str) -> Callable:
    """{'encoded', 'label'} -> {'image', 'label'}: an encoded example decoded by `decode_image`."""
    def decode(example):
        return {"image": decode_image(example["encoded"], jpeg), "label": example["label"]}

    return decode


def _decoding(load_encoded: Callable, jpeg: str) -> Callable:
    """A source's `load`: its `load_encoded` decoded."""
    return lambda index: decoded(jpeg)(load_encoded(index))


def _empty_classes(class_names, labels) -> list:
    """The names of the classes no label refers to (the label set built once, not once per class)."""
    present = set(labels)
    return [name for label, name in enumerate(class_names) if label not in present]


def _bad_images_message(directory: str, bad, total: int, what: str = "do not decode") -> str:
    shown = "; ".join(f"{path} ({reason})" for path, reason in bad[:20])
    more = f"; and {len(bad) - 20} more" if len(bad) > 20 else ""
    return f"{len(bad)} of the {total} images of {directory!r} {what}: {shown}{more}."


_SCANS: dict = {}  # (files, jpeg) -> the bad ones: the pre-flight and the run build the same split once each


def scan_images(files: tuple, jpeg: str = "accurate") -> list:
    """[(path, reason)] of the files in `files` that the pipeline's decoder refuses (unreadable, truncated,
    not an image), in their order. Every file is read and decoded once, in parallel; then each bad one once
    more, eagerly, for its reason."""
    key = (files, jpeg)
    if key not in _SCANS:
        def decodes(index):  # the decoded shape is returned so that no optimisation can prune the decoding
            return index, tf.shape(decode_image(tf.io.read_file(tf.gather(files_t, index)), jpeg))

        files_t = tf.constant(list(files))
        good = tf.data.Dataset.range(len(files)).map(decodes, num_parallel_calls=tf.data.AUTOTUNE,
                                                     deterministic=False).ignore_errors()
        good = set(int(i) for i, _ in good.as_numpy_iterator())
        bad = []
        for index in sorted(set(range(len(files))) - good):
            try:
                decode_image(tf.io.read_file(files[index]), jpeg)
                reason = "failed to decode in the scan"
            except (tf.errors.OpError, ValueError) as e:
                reason = first_line(e)
                reason = re.sub(r"\s*\[Op:.*$", "", re.sub(r"\{\{[^}]*\}\}\s*", "", reason))  # TF's op names
            bad.append((files[index], reason))
        _SCANS[key] = bad
    return _SCANS[key]


def _prepared_builder(name: str, data_dir: Optional[str], manual_dir: Optional[str]):
    """The TFDS builder of a prepared dataset, read from its files (DataError naming the way to prepare it)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for unknown names
        raise DataError(f"TFDS has no dataset {name!r} ({e}). Check the name with `tfds.list_builders()`.") from e
    if not builder.is_prepared():
        hint = (f"ImageNet must be downloaded by hand: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
                f"{manual_dir or os.path.join(builder.data_dir_root if hasattr(builder, 'data_dir_root') else '~/tensorflow_datasets', 'downloads', 'manual')}"
                f" and run `tfds build {name} --file_format=array_record --manual_dir=DIR "
                f"--data_dir={data_dir or '~/tensorflow_datasets'}` (after `pip install apache-beam`: TFDS's "
                "command needs it to start)"
                if name.startswith("imagenet") else
                f"prepare it once with `tfds build {name} --file_format=array_record "
                f"--data_dir={data_dir or '~/tensorflow_datasets'}` on a machine with internet access (after "
                "`pip install apache-beam`: TFDS's command needs it to start)")
        raise DataError(f"TFDS dataset {name!r} is not prepared in {builder.data_dir!r} (looked there because "
                        f"config.data.data_dir={data_dir!r}). {hint}; vitdistill never downloads data at run time. "
                        "On a machine without it, try --config=configs/quickstart.py (scikit-learn's digits).")
    # Read from the prepared files, not the builder's code: only they list the formats a conversion added.
    return tfds.builder_from_directory(builder.data_dir)


def _tfds_layout(info, split: str) -> str:
    """How `tfds_source` reads a split: 'array_record' (by index), 'memory' (TFRecord small enough to load, images
    of one shape) or 'in_order' (TFRecord, read sequentially)."""
    formats = {str(getattr(f, "value", f)) for f in [info.file_format, *info.alternative_file_formats] if f}
    if "array_record" in formats:
        return "array_record"
    size_bytes = info.splits[split].num_bytes or 0
    if size_bytes and size_bytes < IN_MEMORY_LIMIT_BYTES and info.features["image"].shape[0] is not None:
        return "memory"
    return "in_order"


def read_in_order(data_config, split: str) -> bool:
    """Whether `get_source(data_config, split)` would be a sequential source (a TFDS split left as TFRecord and too
    large for memory), which cannot be limited, found from the dataset's metadata without reading it."""
    if data_config.source != "tfds":
        return False
    info = _prepared_builder(data_config.name, data_config.get("data_dir"), data_config.get("manual_dir")).info
    return split in info.splits and _tfds_layout(info, split) == "in_order"


def tfds_source(name: str, split: str, data_dir: Optional[str] = None, *, manual_dir: Optional[str] = None,
                jpeg: str = "accurate") -> Source:
    """A TFDS dataset that is already prepared (or, like ImageNet, preparable from a manual download)."""
    import tensorflow_datasets as tfds

    skip_image = {"image": tfds.decode.SkipDecoding()}  # decoded by decode_image
    builder = _prepared_builder(name, data_dir, manual_dir)
    info = builder.info
    if split not in info.splits:
        raise DataError(f"TFDS {name} has splits {sorted(info.splits)}, not {split!r}")
    num_examples = info.splits[split].num_examples
    num_classes = info.features["label"].num_classes
    class_names = info.features["label"].names
    full_name = f"tfds:{name}:{split}"
    layout = _tfds_layout(info, split)
    if layout == "array_record":
        return _tfds_random_access(builder, split, full_name, num_examples, num_classes, class_names, jpeg)
    if layout == "memory":
        pairs = builder.as_dataset(split=split, decoders=skip_image).map(
            lambda ex: (decode_image(ex["image"], jpeg), ex["label"]))
        images, labels = zip(*tfds.as_numpy(pairs)) if num_examples else ((), ())
        return in_memory(full_name, np.stack(images), np.asarray(labels), num_classes, class_names)

    def sequential_encoded(process_index, process_count, seed):
        shard = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
        ds = builder.as_dataset(split=shard, shuffle_files=True, decoders=skip_image,
                                read_config=tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=16))
        return ds.map(lambda ex: {"encoded": ex["image"], "label": tf.cast(ex["label"], tf.int32)})

    def sequential(process_index, process_count, seed):
        return sequential_encoded(process_index, process_count, seed).map(decoded(jpeg),
                                                                          num_parallel_calls=tf.data.AUTOTUNE)

    note = (f"{full_name} is stored as TFRecord, which can only be read in order: a resumed run reshuffles "
            "(approximate resume) and repeated-augmentation copies stay within one process's devices. For random "
            "access and exact resume, add ArrayRecord shards once: "
            f"`python -m vitdistill.data.tfds_convert {builder.data_dir}`.")
    return Source(full_name, num_examples, num_classes, sequential=sequential, class_names=class_names, note=note,
                  sequential_encoded=sequential_encoded, jpeg=jpeg)


def _tfds_random_access(builder, split: str, name: str, num_examples: int, num_classes: int,
                        class_names, jpeg: str = "accurate") -> Source:
    """A TFDS split prepared as ArrayRecord, read by index (`tfds.data_source`): the serialized record is
    fetched in Python, parsed and decoded in the tf.data graph like an image file."""
    import tensorflow_datasets as tfds

    records = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
                                     file_format="array_record")
    features = builder.info.features
    skip_image = {"image": tfds.decode.SkipDecoding()}  # decoded by decode_image
    if len(records) != num_examples:
        raise DataError(f"{name}: dataset_info.json counts {num_examples} examples but the ArrayRecord files hold "
                        f"{len(records)}; the dataset is incomplete. Prepare it again with `tfds build`.")

    def read(index):
        return records[int(index)]

    def load_encoded(index):
        record = tf.numpy_function(read, [index], tf.string, stateful=False)
        record.set_shape([])
        example = features.deserialize_example(record, decoders=skip_image)
        return {"encoded": example["image"], "label": tf.cast(example["label"], tf.int32)}

    return Source(name, num_examples, num_classes, load=_decoding(load_encoded, jpeg), class_names=class_names,
                  describe=lambda i: f"record {i} of {name} ({builder.data_dir})", load_encoded=load_encoded,
                  jpeg=jpeg)


def sample_images(num_examples: int = 10_000, num_classes: int = 1000, jpeg: str = "accurate") -> Source:
    """scikit-learn's two sample photos (427x640 JPEGs), decoded anew for every example.

    For benchmarks: the same inputs PyTorch's reference pipeline times, with no dataset to prepare.
    Labels cycle through `num_classes`.
    """
    from sklearn.datasets import load_sample_images

    blobs = []
    for path in load_sample_images().filenames:
        with open(path, "rb") as f:
            blobs.append(f.read())
    blobs_t = tf.constant(blobs)

    def load_encoded(index):
        return {"encoded": tf.gather(blobs_t, index % len(blobs)), "label": tf.cast(index % num_classes, tf.int32)}

    return Source("sample_images", num_examples, num_classes, load=_decoding(load_encoded, jpeg),
                  load_encoded=load_encoded, jpeg=jpeg)


SOURCES = ("digits", "fashion_mnist", "fashion_small", "folder", "tfds", "sample_images")


def limited(source: Source, limit: Optional[int]) -> Source:
    """The first `limit` examples of a random-access source (all of them when `limit` is None)."""
    if not limit or limit >= source.num_examples:
        return source
    if not source.random_access:
        raise DataError(f"{source.name} is read sequentially and cannot be limited to {limit} examples; "
                        "unset the *_limit config keys or use a random-access source")
    return dataclasses.replace(source, num_examples=int(limit), name=f"{source.name}[:{limit}]")


def get_source(data_config, split: str, *, limit: Optional[int] = None, class_names=None) -> Source:
    """The source a `config.data` block names, for one split, limited to its first `limit` examples."""
    return limited(_get_source(data_config, split, class_names), limit)


def _get_source(data_config, split: str, class_names) -> Source:
    kind = data_config.source
    jpeg = check_jpeg_decoding(data_config.get("jpeg_decoding", "accurate"))
    scan, skip_bad = bool(data_config.get("scan_images")), bool(data_config.get("skip_bad_images"))
    if (scan or skip_bad) and kind != "folder":
        key = "scan_images" if scan else "skip_bad_images"
        raise DataError(f"config.data.{key}=True applies to image folders (config.data.source='folder'), not to "
                        f"{kind!r}, whose images are decoded from arrays or a prepared dataset; unset it")
    if kind == "digits":
        return digits(split)
    if kind == "fashion_mnist":
        return fashion_mnist(split, data_config.get("data_dir"))
    if kind == "fashion_small":
        return fashion_small(split, data_config.get("data_dir"))
    if kind == "folder":
        if not data_config.get("data_dir"):
            raise DataError("config.data.source='folder' needs --config.data.data_dir=ROOT (ROOT/<split>/<class>/*.jpg)")
        return image_folder(data_config.data_dir, split, class_names=class_names, jpeg=jpeg, scan=scan,
                            skip_bad=skip_bad)
    if kind == "sample_images":
        return sample_images(jpeg=jpeg)
    if kind == "tfds":
        return tfds_source(data_config.name, split, data_config.get("data_dir"),
                           manual_dir=data_config.get("manual_dir"), jpeg=jpeg)
    raise DataError(f"Unknown config.data.source {kind!r}; valid sources: {', '.join(SOURCES)}")
