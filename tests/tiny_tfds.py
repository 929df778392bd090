"""A TFDS dataset built in the tests from scikit-learn's digits (80 PNGs of 32x32, 10 classes; train 60, test 20),
prepared as TFRecord or ArrayRecord by TFDS itself, as `tfds build` would prepare ImageNet."""
import numpy as np
import tensorflow_datasets as tfds

NAME = "tiny_digits"
SPLITS = {"train": (0, 60), "test": (60, 80)}


class TinyDigits(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(*bounds) for split, bounds in SPLITS.items()}

    def _generate_examples(self, first, end):
        from sklearn.datasets import load_digits

        digits = load_digits()
        for i in range(first, end):
            grey = np.kron(digits.images[i] * 15, np.ones((4, 4))).astype(np.uint8)  # 0..240, 32x32
            yield i, {"image": np.stack([grey, grey[::-1], grey.T], -1), "label": int(digits.target[i])}


def build(data_dir: str, file_format: str) -> str:
    """Prepares the dataset under `data_dir`; returns its version folder."""
    builder = TinyDigits(data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
    return str(builder.data_dir)
