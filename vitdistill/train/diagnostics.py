"""Warnings for the ways training goes wrong on small data, each with the figures and the change to try.

The loop calls a task's `check_metrics(step, metrics)` at every logged step; the checks here keep what
they need between calls (a few recent values, what they have already said) and say each problem once per
process. What they watch, and the rules that decide:

DINO (the teacher's output over the K = out_dim dimensions, `losses.dino_monitoring`):
- **towards uniform**: the teacher's mean row entropy above 3/4 of log K. A row that spreads its mass
  evenly over K^(3/4) outputs (over 4,000 of 65,536, 180 of 1,024) gives the student next to no target;
  the loss then sits near log K and k-NN barely moves (the official repository's issues #61, #190,
  #246: the remedies that worked there are the advice).
- **onto a few outputs**: exp of the teacher's marginal entropy (the batch-mean distribution's), the
  number of outputs the batch's images spread over, below max(2, min(K, B) / 16) for a global batch of B
  images: fewer than one output for every 16 images. Sharp rows on distinct outputs are healthy
  (marginal high); sharp rows on the same few are the collapse centring exists to prevent.
- Neither is judged before max(the lr warm-up, the teacher temperature's warm-up, 10% of the run): until
  then the teacher is still being shaped, and a fresh teacher is near uniform by construction. Each rule
  must hold over the last 3 logged steps (one noisy batch says nothing).

Supervised (DeiT, the CNN teacher): the cross-entropy against the labels (the base part when distilling)
starts at log C for C classes (a fresh head's outputs are near uniform). **Stalled**: after 25% of the
run, the mean of the last 5 logged losses is still above 9/10 of log C: it has moved less than a tenth of
its starting value. Training losses under DeiT's augmentation stay far above the smoothed labels' entropy
even in runs that end well, so the rule only asks whether the loss has moved: the digits quick start's
distilled student (93-94% top-1 at the end) is at 0.82 of log C at a quarter of its run (an earlier rule,
a quarter of the way to the smoothed labels' entropy, warned there), and a student whose lr is 0 stays at
1.0.
"""
from __future__ import annotations

import collections
import math
from typing import Optional

URL = "https://github.com/facebookresearch/dino/issues"
UNIFORM_SHARE = 0.75        # of log K
IMAGES_PER_OUTPUT = 16      # the marginal's effective outputs, at most min(K, B), below min(K, B) / this
DINO_START_SHARE = 0.10     # of the run, at the least
SUPERVISED_CHECK_SHARE = 0.25
SUPERVISED_STALLED = 0.9    # of log C, the loss's starting value
WINDOW = {"dino": 3, "supervised": 5}


def few_outputs_floor(out_dim: int, global_batch: int) -> float:
    """The fewest outputs a batch of `global_batch` images may spread over before 'onto a few outputs'."""
    return max(2.0, min(out_dim, global_batch) / IMAGES_PER_OUTPUT)


class DinoHealth:
    """`check_metrics` for DINO: warns once when the teacher drifts towards uniform, once when it collapses
    onto a few outputs."""

    def __init__(self, *, out_dim: int, global_batch: int, start_step: int):
        self.log_k = math.log(out_dim)
        self.out_dim, self.global_batch = out_dim, global_batch
        self.floor = few_outputs_floor(out_dim, global_batch)
        self.start_step = start_step
        self.recent = collections.deque(maxlen=WINDOW["dino"])
        self.said = set()

    @classmethod
    def for_run(cls, *, out_dim: int, global_batch: int, total_steps: int, warmup_steps: int,
                teacher_warmup_steps: int) -> "DinoHealth":
        start = max(warmup_steps, teacher_warmup_steps, int(math.ceil(DINO_START_SHARE * total_steps)))
        return cls(out_dim=out_dim, global_batch=global_batch, start_step=start)

    def __call__(self, step: int, metrics: dict) -> Optional[str]:
        if "teacher_entropy" not in metrics:
            return None
        entropy = float(metrics["teacher_entropy"])
        marginal = float(metrics.get("teacher_marginal_entropy", self.log_k))
        self.recent.append((entropy, marginal))
        if step < self.start_step or len(self.recent) < self.recent.maxlen:
            return None
        said = []
        if "uniform" not in self.said and all(e > UNIFORM_SHARE * self.log_k for e, _ in self.recent):
            self.said.add("uniform")
            smaller = max(256, self.out_dim // 4)
            head = (f"a smaller head (config.model.out_dim {self.out_dim} -> {smaller}), " if smaller < self.out_dim
                    else "")
            said.append(
                f"WARNING step {step}: the DINO teacher's output is drifting towards uniform: row entropy "
                f"{entropy:.2f} of log K = {self.log_k:.2f} ({entropy / self.log_k:.0%}; above "
                f"{UNIFORM_SHARE:.0%} over the last {len(self.recent)} logged steps), so the student gets next "
                "to no target. Try, one at a time: a sharper teacher (lower config.dino.teacher_temp, e.g. "
                "0.04 -> 0.02, and config.dino.warmup_teacher_temp with it), a lower teacher momentum "
                "(config.dino.momentum_teacher 0.996 -> 0.99 or 0.98: the teacher follows the student sooner), "
                f"{head}BatchNorm in the head on small data (config.model.use_bn_in_head=True), a larger batch or a "
                f"longer run. ({URL}/61, /190, /246)")
        effective = math.exp(marginal)
        if "few" not in self.said and all(math.exp(m) < self.floor for _, m in self.recent):
            self.said.add("few")
            said.append(
                f"WARNING step {step}: the DINO teacher is collapsing onto a few outputs: a batch of "
                f"{self.global_batch} images spreads over about {effective:.1f} of K = {self.out_dim} "
                f"outputs (marginal entropy {marginal:.2f}; below {self.floor:g}, one per "
                f"{IMAGES_PER_OUTPUT} images, over the last {len(self.recent)} logged steps; row entropy "
                f"{entropy:.2f}). Try, one at a time: stronger centring (config.dino.center_momentum 0.9 -> "
                "0.8), a slower teacher (raise config.dino.momentum_teacher, e.g. 0.96 -> 0.99), a softer teacher "
                "(raise config.dino.teacher_temp, e.g. 0.02 -> 0.04), a lower peak lr "
                "or a longer warm-up (config.optim.lr, config.optim.warmup_epochs), a longer frozen last "
                f"layer (config.optim.freeze_last_layer). ({URL}/225, /273)")
        return "\n".join(said) or None


class SupervisedHealth:
    """`check_metrics` for supervised training (DeiT, the CNN teacher): warns once when the cross-entropy
    against the labels has hardly moved from log C after a quarter of the run."""

    def __init__(self, *, num_classes: int, total_steps: int, distilled: bool, what: str = "the student"):
        self.start = math.log(num_classes)
        self.check_from = int(math.ceil(SUPERVISED_CHECK_SHARE * total_steps))
        self.total_steps = total_steps
        self.key = "loss_base" if distilled else "loss"
        self.what = what
        self.recent = collections.deque(maxlen=WINDOW["supervised"])
        self.said = False

    def __call__(self, step: int, metrics: dict) -> Optional[str]:
        if self.key not in metrics:
            return None
        loss = float(metrics[self.key])
        if math.isfinite(loss):
            self.recent.append(loss)
        if self.said or step < self.check_from or not self.recent:
            return None
        mean = sum(self.recent) / len(self.recent)
        if mean <= SUPERVISED_STALLED * self.start:
            return None
        self.said = True
        part = "cross-entropy part of the loss" if self.key == "loss_base" else "loss"
        return (f"WARNING step {step}/{self.total_steps}: {self.what}'s {part} has hardly moved: {mean:.3f} "
                f"(mean of the last {len(self.recent)} logged), {mean / self.start:.0%} of log C = {self.start:.3f} "
                f"where it started, after {step / self.total_steps:.0%} of the run (above "
                f"{SUPERVISED_STALLED:.0%} after {SUPERVISED_CHECK_SHARE:.0%}). Try, one at a time: a lower peak lr "
                "or a longer warm-up (config.optim.lr x 0.5, config.optim.warmup_epochs), lighter augmentation on "
                "small data (config.augment.ra_magnitude, config.augment.erase_prob, config.mixup.mixup_alpha / "
                "cutmix_alpha 0), less drop path (config.model.drop_path_rate), more epochs; for a ViT on small "
                "data, distillation from a CNN teacher (config.distill.kind=hard) is DeiT's answer.")
