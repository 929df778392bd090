"""Input pipeline throughput per host core at ImageNet resolution, on a TFDS dataset prepared as ArrayRecord.

    python experiments/tfds_pipeline_throughput.py --data_dir=/tmp/vitdistill/imagenet_like [--images=2000]

Builds (once) `imagenet_like`: JPEGs of ImageNet's typical size (500x375 and 375x500, quality 90, cut and
scaled from scikit-learn's two sample photos, so nothing is downloaded), prepared by TFDS as ArrayRecord as
`tfds build --file_format=array_record` prepares ImageNet. Then, for 1 and for all host cores (the process
pinned with `os.sched_setaffinity` before TensorFlow starts), times the DeiT-S train pipeline (random-resized
crop 224, flip, RandAugment m9, random erasing, repeated augmentation) and DINO's multi-crop (2x224 + 8x96)
through `vitdistill.bench --data=config`, and the same pipelines on in-memory JPEG bytes (`--data=
sample_images`: scikit-learn's 427x640 photos, larger than these, so the two also differ in decoding cost). Prints one JSON line per run and a Markdown table.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "imagenet_like"


def build(data_dir: str, images: int) -> None:
    import numpy as np
    import tensorflow_datasets as tfds

    class ImagenetLike(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=1000)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(images)}

        def _generate_examples(self, n):
            from PIL import Image
            from sklearn.datasets import load_sample_images

            photos = [Image.fromarray(p) for p in load_sample_images().images]
            rng = np.random.RandomState(0)
            for i in range(n):
                photo = photos[i % 2]
                w, h = (500, 375) if i % 3 else (375, 500)
                scale = rng.uniform(0.6, 1.0)
                cw, ch = int(photo.width * scale), int(photo.height * scale)
                x, y = rng.randint(0, photo.width - cw + 1), rng.randint(0, photo.height - ch + 1)
                image = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
                yield i, {"image": np.asarray(image), "label": i % 1000}

    builder = ImagenetLike(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()


def bench(config: str, data: str, cores: int, data_dir: str, steps: int, batch: int) -> dict:
    args = [sys.executable, "-c",
            "import os, sys; os.sched_setaffinity(0, range(int(sys.argv[1]))); sys.argv = sys.argv[1:]; "
            "from absl import app; from vitdistill import bench; app.run(bench.main)",
            str(cores), f"--config={config}", "--what=pipeline", f"--data={data}", f"--steps={steps}",
            f"--config.batch_size={batch}",
            "--config.data.source=tfds", f"--config.data.name={NAME}", f"--config.data.data_dir={data_dir}",
            "--config.data.eval_split=train"]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data_dir", default="/tmp/vitdistill/imagenet_like")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=5, help="4x this many batches are timed (median)")
    parser.add_argument("--batch", type=int, default=48)
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.data_dir, NAME)):
        build(args.data_dir, args.images)
    rows = []
    for config in ("configs/deit_s.py", "configs/dino_vits16.py"):
        for cores in sorted({1, os.cpu_count()}):
            for data in ("config", "sample_images"):
                result = {"config": config, "cores": cores, "data": data,
                          **bench(config, data, cores, args.data_dir, args.steps, args.batch)}
                print(json.dumps(result), flush=True)
                rows.append(result)
    print("\n| pipeline | cores | ArrayRecord img/s | per core | in-memory JPEG img/s | ratio |")
    print("|---|---|---|---|---|---|")
    for config in ("configs/deit_s.py", "configs/dino_vits16.py"):
        for cores in sorted({1, os.cpu_count()}):
            got = {r["data"]: r["images_per_sec"] for r in rows if r["config"] == config and r["cores"] == cores}
            print(f"| {config} | {cores} | {got['config']:.1f} | {got['config'] / cores:.1f} | "
                  f"{got['sample_images']:.1f} | {got['config'] / got['sample_images']:.2f} |")


if __name__ == "__main__":
    main()
