"""One full training step of each method, ours against the same step written in PyTorch the official way.

Both sides start from identical weights (ours, loaded into timm's models and an official-layout DINO
head) and see identical inputs. The PyTorch side follows facebookresearch/dino `main_dino.py`
(`train_one_epoch`, `DINOLoss`, `utils.clip_gradients`, `utils.cancel_gradients_last_layer`,
`utils.get_params_groups`, `utils.cosine_scheduler`, `DINOHead` with and without `use_bn`) and
facebookresearch/deit `main.py` / `engine.py` / `losses.py` (`DistillationLoss`, timm's label-smoothing
or soft-target criterion, timm 0.3.2's Mixup per GPU, AdamW with timm 0.3.2's no-decay groups, timm's
cosine scheduler per update or per epoch as main.py steps it, ModelEma). After every step the logged loss
and lr and the student (DINO: also the EMA teacher, the center and a BatchNorm head's running statistics;
DeiT: also the model EMA) must agree.

Randomness is shared, not re-drawn: mixup/cutmix take the draws our step made (`mixup.group_mix_params`
from `deit.step_rngs`; test_mixup checks the draws' distributions against timm 0.3.2), and drop path takes
the masks our step drew (read back with `our_drop_masks`), applied with timm 0.3.2's formula.

Float32 on the CPU on both sides. The settings make every piece visible: a base lr of 2e-3 (updates
~1e-3), weight decay 0.4-1.0 (DINO) / 0.5 (DeiT) so a wrong decay mask moves a tensor by ~2e-6 or more,
DINO's per-tensor clipping at 3.0 biting on some tensors and not others, the teacher temperature
warm-up and the head's frozen last layer crossing an epoch boundary (2 steps per epoch), drop path 0.3
and an EMA decay of 0.9 so that masks and averages move the weights. Seen here: each tensor's 99th
percentile of |Δ| <= 2.4e-7 (2 float32 ulps of 1), max |Δ| <= 1.4e-6 in the first steps, center
<= 4e-8, loss rel <= 2e-6. Replacing one piece of the reference at a time (no clipping, global-norm
clipping, last layer not frozen or frozen with zero grads, decay on every tensor, DeiT's mask in DINO
and DINO's in DeiT, a constant teacher temperature, KL / B, no label smoothing) fails the test, and so
does each of these changes to our step: one mixup draw over the batch instead of one per device, the
teacher on the unmixed images, the EMA of the pre-update weights, other drop path masks, a DINO teacher
whose BatchNorm head uses running statistics, an undecayed or never-frozen learned gain, and Flax's
BatchNorm (whose running variance is the biased one).
"""
import copy
import sys

import flax.traverse_util
import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

# conftest imports TensorFlow; triton's import would then crash torch.optim (see test_optim.py).
sys.modules.setdefault("triton", None)
torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[torch]')")
timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[torch]')")
F = torch.nn.functional

from vitdistill import recipes, small_data  # noqa: E402
from vitdistill.convert import torch_key  # noqa: E402
from vitdistill.data import mixup  # noqa: E402
from vitdistill.data.multicrop import view_names  # noqa: E402
from vitdistill.methods import deit, dino  # noqa: E402
from vitdistill.train import schedules  # noqa: E402
from test_models_parity import official_dino_forward  # noqa: E402

MICRO = dict(patch_size=4, embed_dim=128, depth=4, num_heads=4)  # vitdistill's *_micro_patch4_32 ViTs
STEPS = 3
PARAM_Q99_ATOL = 5e-7  # each tensor's 99th percentile of |Δ| after a step (see param_diffs)
PARAM_MAX_ATOL = 2e-6  # max |Δ| of any element, plus 5% of the lrs summed so far (25% on the attention key biases)
CENTER_ATOL = 1e-6
LOSS_RTOL = 1e-5


# ---------------------------------------------------------------------------
# Weights across frameworks.
# ---------------------------------------------------------------------------


def torch_layout(params) -> dict:
    """Our Flax params as {torch key: numpy array in torch's layout} (the inverse of convert's rule)."""
    out = {}
    for path, value in flax.traverse_util.flatten_dict(jax.device_get(params)).items():
        value = np.asarray(value, np.float32)
        if value.ndim == 2:  # Dense [in, out] -> Linear [out, in]; the head's weight_v likewise
            value = value.T
        elif value.ndim == 4:  # Conv [kh, kw, in, out] -> [out, in, kh, kw]
            value = value.transpose(3, 2, 0, 1)
        out[torch_key(("params", *map(str, path)))] = np.ascontiguousarray(value)
    return out


def load_into(module, params, *, allow_missing=()):
    state = {k: torch.from_numpy(v.copy()) for k, v in torch_layout(params).items()}
    result = module.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(allow_missing), result.missing_keys


# |gradient| below which Adam's update lr * g / (|g| + eps) is float32 noise: at 1e-7 (10 eps), a relative
# difference of 1e-6 in g between the frameworks already moves that element's update by ~1e-7 of the lr,
# and below eps the update is a fraction of the lr set by the noise itself.
NOISE_GRADIENT = 1e-7


def record_small_gradients(module, small: dict):
    """Marks, in `small` {torch key: bool array}, the elements whose gradient was ever below NOISE_GRADIENT."""
    for name, p in module.named_parameters():
        if p.grad is not None:
            tiny = (p.grad.abs() < NOISE_GRADIENT).numpy()
            small[name] = small[name] | tiny if name in small else tiny


def param_diffs(ours, module, what, small_gradients=None, zero_gradient=()):
    """Our params against the module's same-named tensors: {'max', 'max_key', 'q99', 'q99_key', 'key_bias'}.

    'max': the largest |Δ| of any element. 'q99': the largest, over tensors, of a tensor's 99th
    percentile of |Δ|, which a systematic error in one tensor (a wrong decay mask, a wrong update)
    moves but which ignores the few elements whose gradient happens to be ~1e-9, comparable to
    Adam's eps, where float32 noise in the gradient changes lr·g/(|g| + eps) by ~1% of the lr.
    'key_bias': the key third of the fused qkv biases, kept apart: it adds the same q·b_k to every
    logit of a softmax row, so its exact gradient is 0 and both frameworks compute float32 noise
    (~1e-10) that Adam's first steps scale up to a few % of the lr. `zero_gradient`: tensors whose exact
    gradient is 0 for the same reason (a bias feeding a BatchNorm), left out; the caller shows their
    gradients are float32 noise in both frameworks.
    """
    theirs = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    out = dict(max=0.0, max_key=None, q99=0.0, q99_key=None, key_bias=0.0)
    for key, value in torch_layout(ours).items():
        assert key in theirs, f"{what}: {key} has no PyTorch counterpart"
        if key in zero_gradient:
            continue
        assert value.shape == theirs[key].shape, (what, key, value.shape, theirs[key].shape)
        diff = np.abs(value - theirs[key]).ravel()
        noise = (small_gradients or {}).get(key)
        # Elements whose gradient was ever ~eps are float32 noise: left out of the max, kept in the q99.
        max_diff = np.where(noise.ravel(), 0.0, diff) if noise is not None else diff
        if key.endswith("attn.qkv.bias"):
            dim = diff.shape[0] // 3
            out["key_bias"] = max(out["key_bias"], float(diff[dim:2 * dim].max()))
            diff = np.concatenate([diff[:dim], diff[2 * dim:]])
            max_diff = np.concatenate([max_diff[:dim], max_diff[2 * dim:]])
        for stat, value in (("max", float(max_diff.max())), ("q99", float(np.quantile(diff, 0.99)))):
            if value > out[stat]:
                out[stat], out[f"{stat}_key"] = value, key
    return out


def check_params(ours, module, what, lr_sum, small_gradients=None, zero_gradient=()):
    d = param_diffs(ours, module, what, small_gradients, zero_gradient)
    print(f"    {what}: max |Δ| {d['max']:.2e} ({d['max_key']}), worst tensor's 99th percentile {d['q99']:.2e} "
          f"({d['q99_key']}), attention key biases {d['key_bias']:.2e}")
    assert d["q99"] <= PARAM_Q99_ATOL, f"{what}: {d['q99_key']} differs by {d['q99']:.3g} (99th percentile)"
    assert d["max"] <= PARAM_MAX_ATOL + 0.05 * lr_sum, f"{what}: {d['max_key']} differs by {d['max']:.3g}"
    assert d["key_bias"] <= PARAM_MAX_ATOL + 0.25 * lr_sum, \
        f"{what}: attention key biases differ by {d['key_bias']:.3g}"


def nchw(images):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)))


def micro_vit(img_size, num_classes, *, distilled=False, dynamic=False, drop_path_rate=0.0):
    cls = timm.models.deit.VisionTransformerDistilled if distilled else timm.models.vision_transformer.VisionTransformer
    return cls(img_size=img_size, num_classes=num_classes, dynamic_img_size=dynamic, drop_path_rate=drop_path_rate,
               **MICRO)


# ---------------------------------------------------------------------------
# DINO, the official way (facebookresearch/dino).
# ---------------------------------------------------------------------------


class DinoHead(torch.nn.Module):
    """DINOHead(nlayers=3): mlp.0/2/4 (with use_bn: Linear-BatchNorm1d-GELU twice, mlp.0/1, mlp.3/4, then mlp.6),
    F.normalize, weight-normalised last layer with its gain at 1, trained unless norm_last_layer."""

    def __init__(self, in_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=True, use_bn=False):
        super().__init__()
        layers = []
        for dim in (in_dim, hidden_dim):
            layers.append(torch.nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(torch.nn.BatchNorm1d(hidden_dim))
            layers.append(torch.nn.GELU())
        self.mlp = torch.nn.Sequential(*layers, torch.nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = torch.nn.utils.weight_norm(torch.nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(torch.nn.Module):
    """The backbone once per run of equal-resolution crops, then the head once on everything."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops):
        widths = torch.tensor([crop.shape[-1] for crop in crops])
        ends = torch.cumsum(torch.unique_consecutive(widths, return_counts=True)[1], 0)
        features, start = [], 0
        for end in ends.tolist():
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))


class DINOLoss(torch.nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp, center_momentum):
        super().__init__()
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate([
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.full(nepochs - warmup_teacher_temp_epochs, teacher_temp)])

    def forward(self, student_output, teacher_output, epoch):
        student_chunks = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.teacher_temp_schedule[epoch]
        teacher_chunks = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total, terms = 0.0, 0
        for i, q in enumerate(teacher_chunks):
            for v, s in enumerate(student_chunks):
                if v == i:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                terms += 1
        total = total / terms
        self.update_center(teacher_output)
        return total

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)  # one process
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([warmup, cosine])


def get_params_groups(model):
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (not_regularized if name.endswith(".bias") or param.ndim == 1 else regularized).append(param)
    return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


def clip_gradients(model, clip):
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            norm = p.grad.data.norm(2)
            norms.append(norm.item())
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.data.mul_(coef)
    return norms


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    if epoch >= freeze_last_layer:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None


class OfficialDino:
    """main_dino.py's train_one_epoch, one iteration at a time, on one process."""

    def __init__(self, config, params, steps_per_epoch):
        mc, hp, opt, m = config.multicrop, config.dino, config.optim, config.model
        epochs = int(config.epochs)
        self.steps_per_epoch, self.clip, self.freeze_last_layer = steps_per_epoch, opt.clip_grad, opt.freeze_last_layer

        def network(drop_path_rate):
            backbone = micro_vit(mc.global_size, 0, dynamic=True, drop_path_rate=drop_path_rate)
            # official DINO's forward: local crops get interpolate_pos_encoding's resampling
            backbone.forward = lambda x, vit=backbone: official_dino_forward(vit, x)
            return MultiCropWrapper(backbone, DinoHead(backbone.embed_dim, m.out_dim, m.hidden_dim,
                                                       m.bottleneck_dim, m.norm_last_layer, m.use_bn_in_head))

        # main_dino.py: the student with drop path, the teacher without; both stay in train mode throughout, so
        # a BatchNorm head normalises with each batch's statistics in the teacher too.
        self.student, self.teacher = network(m.drop_path_rate), network(0.0)
        self.drop_masks = []
        replay_drop_path(self.student.backbone, self.drop_masks)
        missing = ["head.last_layer.weight_g"] if m.norm_last_layer else []
        if m.use_bn_in_head:
            # (num_batches_tracked, also a buffer, is filled in by BatchNorm's own load hook)
            missing += [f"head.mlp.{i}.{b}" for i in (1, 4) for b in ("running_mean", "running_var")]
        load_into(self.student, params, allow_missing=missing)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.optimizer = torch.optim.AdamW(get_params_groups(self.student), betas=(opt.b1, opt.b2), eps=opt.eps)
        self.loss = DINOLoss(m.out_dim, 2 + mc.num_local, hp.warmup_teacher_temp, hp.teacher_temp,
                             int(hp.warmup_teacher_temp_epochs), epochs, hp.student_temp, hp.center_momentum)
        self.lr_schedule = cosine_scheduler(opt.lr * config.batch_size / 256.0, opt.min_lr, epochs, steps_per_epoch,
                                            warmup_epochs=int(opt.warmup_epochs))
        self.wd_schedule = cosine_scheduler(opt.weight_decay, opt.weight_decay_end, epochs, steps_per_epoch)
        self.momentum_schedule = cosine_scheduler(hp.momentum_teacher, 1, epochs, steps_per_epoch)
        self.names = view_names(mc.num_local)
        # A bias that shifts every row of a BatchNorm's input alike is subtracted out with the batch mean: the
        # final norm's (through the Linear mlp.0) and the Linears' before each BatchNorm. Their exact gradient
        # is 0, and what each framework computes is float32 noise that Adam scales up to ~lr.
        self.zero_gradient = (("backbone.norm.bias", "head.mlp.0.bias", "head.mlp.3.bias") if m.use_bn_in_head
                              else ())

    def step(self, it, batch, drop_masks=()):
        epoch = it // self.steps_per_epoch
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.lr_schedule[it]
            if i == 0:
                group["weight_decay"] = self.wd_schedule[it]
        images = [nchw(batch[name]) for name in self.names]
        teacher_output = self.teacher(images[:2])
        self.drop_masks[:] = list(drop_masks)
        student_output = self.student(images)
        assert not self.drop_masks, f"{len(self.drop_masks)} of our drop path masks were not used"
        loss = self.loss(student_output, teacher_output, epoch)
        self.optimizer.zero_grad()
        loss.backward()
        named = dict(self.student.named_parameters())
        before_bn = {key: float(named[key].grad.abs().max()) for key in self.zero_gradient}
        grad_norms = clip_gradients(self.student, self.clip)
        cancel_gradients_last_layer(epoch, self.student, self.freeze_last_layer)
        self.optimizer.step()
        with torch.no_grad():
            m = self.momentum_schedule[it]
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        return dict(loss=loss.item(), lr=self.lr_schedule[it], weight_decay=self.wd_schedule[it], momentum=m,
                    teacher_temp=self.loss.teacher_temp_schedule[epoch], grad_norms=grad_norms, before_bn=before_bn)


def _dino_config():
    config = recipes.dino("vit_micro_patch4_32")
    small_data.runlocal(config)
    config.batch_size = 8
    config.data.train_limit = 16        # 2 steps per epoch: steps 0, 1 in epoch 0 (last layer frozen), 2 in epoch 1
    config.epochs = 10.0
    config.multicrop.global_size = 16
    config.multicrop.local_size = 8
    config.multicrop.num_local = 2
    config.model.drop_path_rate = 0.0   # deterministic
    config.optim.lr = 0.064             # x 8/256: a base lr of 2e-3, so the updates are clearly visible
    config.optim.warmup_epochs = 2.0    # lr 0, 1/3, 2/3 of the base over steps 0..2
    config.optim.weight_decay = 0.4     # larger than the recipe's 0.04 -> 0.4 so the decay masks matter
    config.optim.weight_decay_end = 1.0
    assert config.optim.clip_grad == 3.0  # per tensor: bites on most tensors here, not on all (norms 0.06..600)
    config.dino.warmup_teacher_temp = 0.04
    config.dino.teacher_temp = 0.07     # the paper's warm-up: epoch 1 uses 0.055
    config.dino.warmup_teacher_temp_epochs = 3.0
    return config


def _dino_head_config():
    """The official options the default config leaves off: a learned last-layer gain (`norm_last_layer=False`,
    DINO's README for ViT-S/16's best run), BatchNorm in the head (`use_bn_in_head`), and drop path on."""
    config = _dino_config()
    config.model.norm_last_layer = False
    config.model.use_bn_in_head = True
    config.model.drop_path_rate = 0.3    # 0.1 (the recipe's) would drop ~4 of the 96 block-samples a step
    return config


def _scanned(config):
    """The same config with the blocks run as one lax.scan (`model.scan_blocks`), each recomputed in the
    backward pass (`model.remat`)."""
    config.model.scan_blocks = True
    config.model.remat = True
    return config


DINO_CASES = {"frozen gain, no BatchNorm": _dino_config,
              "learned gain, BatchNorm head, drop path": _dino_head_config,
              "frozen gain, no BatchNorm, blocks scanned and remat": lambda: _scanned(_dino_config())}


def _dino_batch(config, seed):
    rng = np.random.RandomState(seed)
    mc, b = config.multicrop, config.batch_size
    return {name: rng.randn(b, size, size, 3).astype(np.float32)
            for name, size in zip(view_names(mc.num_local), [mc.global_size] * 2 + [mc.local_size] * mc.num_local)}


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")  # the official head uses the old spelling
@pytest.mark.parametrize("case", list(DINO_CASES))
def test_dino_steps_match_official_pytorch(tmp_path, case):
    config = DINO_CASES[case]()
    task = dino.build_task(config, str(tmp_path))
    setup = task.train_step.keywords["setup"]
    assert setup.student.backbone.scan_blocks == setup.teacher.backbone.remat == bool(config.model.get("scan_blocks"))
    assert task.length.steps_per_epoch == 2
    state = jax.jit(task.init)(jax.random.key(0))
    assert ("weight_g" in state.params["head"]["last_layer"]) == (not config.model.norm_last_layer)
    assert bool(state.batch_stats) == config.model.use_bn_in_head
    reference = OfficialDino(config, state.params, task.length.steps_per_epoch)
    train_step = jax.jit(task.train_step)
    lr_sum, dropped = 0.0, 0
    for it in range(STEPS):
        batch = _dino_batch(config, it)
        masks = []
        if config.model.drop_path_rate:
            variables = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
            masks = our_drop_masks(setup.student, variables, [batch[name] for name in setup.views],
                                   dino.step_rng(setup, it), mutable=["batch_stats"] if state.batch_stats else False)
            dropped += sum(int((~keep).sum()) for _, keep in masks)
        state, metrics = train_step(state, batch, None)
        metrics = jax.device_get(metrics)
        want = reference.step(it, batch, masks)
        lr_sum += want["lr"]
        center_diff = float(np.abs(np.asarray(state.center) - reference.loss.center.numpy()).max())
        clipped = sum(n > config.optim.clip_grad for n in want["grad_norms"])
        print(f"DINO {case} step {it}: loss {float(metrics['loss']):.7f} vs {want['loss']:.7f}, lr "
              f"{float(metrics['lr']):.4e} vs {want['lr']:.4e}, {clipped}/{len(want['grad_norms'])} grads clipped, "
              f"center max |Δ| {center_diff:.2e}")
        assert float(metrics["loss"]) == pytest.approx(want["loss"], rel=LOSS_RTOL)
        assert float(metrics["lr"]) == pytest.approx(want["lr"], rel=1e-6, abs=1e-12)
        assert float(metrics["weight_decay"]) == pytest.approx(want["weight_decay"], rel=1e-6)
        assert float(metrics["teacher_momentum"]) == pytest.approx(want["momentum"], rel=1e-7)
        assert float(metrics["teacher_temp"]) == pytest.approx(want["teacher_temp"], rel=1e-6)
        check_params(state.params, reference.student, "student", lr_sum, zero_gradient=reference.zero_gradient)
        check_params(state.teacher_params, reference.teacher, "teacher", lr_sum, zero_gradient=reference.zero_gradient)
        for key, value in want["before_bn"].items():  # noise: the head's other gradients are ~1e-3 and up
            assert value < 1e-6, f"step {it}: {key}'s gradient is {value:.3g}, not the 0 a bias before BatchNorm has"
        assert center_diff <= CENTER_ATOL, f"step {it}: center differs by {center_diff:.3g}"
        if state.batch_stats:  # the student head's running statistics, PyTorch's BatchNorm1d buffers
            # The variance ignores the zero-gradient biases (a shift of every row); the mean carries their noise,
            # up to ~the lr summed before this step's forward (exactly 0 at step 0, whose lr is 0).
            mean_atol = 1e-6 + 0.25 * (lr_sum - want["lr"])
            for layer in ("mlp_1", "mlp_4"):
                bn = reference.student.head.mlp[int(layer[-1])]
                for ours, theirs, atol in (("mean", bn.running_mean, mean_atol), ("var", bn.running_var, 1e-6)):
                    value = np.asarray(state.batch_stats["head"][layer][ours])
                    np.testing.assert_allclose(value, theirs.numpy(), rtol=1e-5, atol=atol,
                                               err_msg=f"step {it}: head {layer} running {ours}")
    if config.model.drop_path_rate:
        assert dropped >= 5, f"only {dropped} residual branches were dropped: the masks were barely exercised"


# ---------------------------------------------------------------------------
# DeiT, the official way (facebookresearch/deit engine.py, losses.py; timm's optimiser and scheduler).
# ---------------------------------------------------------------------------


class DistillationLoss(torch.nn.Module):
    def __init__(self, base_criterion, teacher_model, distillation_type, alpha, tau):
        super().__init__()
        self.base_criterion, self.teacher_model = base_criterion, teacher_model
        self.distillation_type, self.alpha, self.tau = distillation_type, alpha, tau

    def forward(self, inputs, outputs, labels):
        outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, labels)
        with torch.no_grad():
            teacher_outputs = self.teacher_model(inputs)
        if self.distillation_type == "soft":
            T = self.tau
            distillation_loss = F.kl_div(F.log_softmax(outputs_kd / T, dim=1),
                                         F.log_softmax(teacher_outputs / T, dim=1),
                                         reduction="sum", log_target=True) * (T * T) / outputs_kd.numel()
        else:
            distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
        return base_loss * (1 - self.alpha) + distillation_loss * self.alpha


def timm_param_groups(model, weight_decay):
    """timm 0.3.2's add_weight_decay with the no_weight_decay() of its VisionTransformer, {'pos_embed',
    'cls_token'}, which DeiT's DistilledVisionTransformer inherits (DeiT pins 0.3.2; the installed timm's
    distilled model also skips 'dist_token', so its own list is not used)."""
    skip = {"pos_embed", "cls_token"}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def official_deit_scheduler(config, optimizer, base_lr):
    """timm's create_scheduler with the arguments DeiT's main.py passes (per-epoch cosine with warm-up)."""
    import argparse

    from timm.scheduler import create_scheduler

    opt = config.optim
    args = argparse.Namespace(sched="cosine", epochs=int(config.epochs), lr=base_lr, min_lr=opt.min_lr,
                              warmup_lr=opt.warmup_lr, warmup_epochs=int(opt.warmup_epochs), decay_epochs=30,
                              decay_rate=0.1, cooldown_epochs=10, patience_epochs=10, lr_noise=None,
                              lr_noise_pct=0.67, lr_noise_std=1.0)
    return create_scheduler(args, optimizer)[0]


def timm_032_mix(x, target, *, lam, use_cutmix, box, num_classes, smoothing):
    """timm 0.3.2's Mixup(mode='batch', correct_lam=True) on one GPU's batch, given its draw: `_mix_batch`
    (CutMix pastes the box from the flipped batch; mixup blends with it) and `mixup_target`."""
    x = x.clone()
    if use_cutmix:
        y_lo, y_hi, x_lo, x_hi = box
        x[:, :, y_lo:y_hi, x_lo:x_hi] = x.flip(0)[:, :, y_lo:y_hi, x_lo:x_hi]
    elif lam != 1.0:
        x_flipped = x.flip(0).mul_(1.0 - lam)
        x.mul_(lam).add_(x_flipped)
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value

    def one_hot(t):
        return torch.full((t.size(0), num_classes), off_value).scatter_(1, t.long().view(-1, 1), on_value)

    return x, one_hot(target) * lam + one_hot(target.flip(0)) * (1.0 - lam)


def soft_target_cross_entropy(x, target):
    """timm's SoftTargetCrossEntropy, which main.py picks when mixup or cutmix is on."""
    return torch.sum(-target * F.log_softmax(x, dim=-1), dim=-1).mean()


class ReplayDropPath(torch.nn.Module):
    """timm 0.3.2's DropPath, `x.div(keep_prob) * random_tensor`, with the per-sample keep mask taken from a
    queue (the masks our step drew) instead of torch's generator."""

    def __init__(self, rate, queue):
        super().__init__()
        self.rate, self.queue = rate, queue

    def forward(self, x):
        if not self.training:
            return x
        rate, keep = self.queue.pop(0)
        assert rate == pytest.approx(self.rate) and keep.shape == (x.shape[0],), (rate, self.rate, keep.shape)
        mask = torch.from_numpy(keep.astype(np.float32)).view((-1,) + (1,) * (x.ndim - 1))
        return x.div(1.0 - self.rate) * mask


def replay_drop_path(model, queue):
    """Replaces every timm DropPath in `model`'s blocks by a ReplayDropPath reading `queue`."""
    for block in model.blocks:
        for name in ("drop_path1", "drop_path2"):
            module = getattr(block, name)
            if isinstance(module, timm.layers.DropPath):
                setattr(block, name, ReplayDropPath(module.drop_prob, queue))


def our_drop_masks(module, variables, inputs, rng, **kwargs) -> list:
    """[(rate, keep mask [B] bool)] of every DropPath call of `module.apply(..., train=True)` with dropout key
    `rng`, in call order. Flax derives each call's key from `rng`, the module's path and its call count, not
    from the values, so a second forward with the same key draws the masks the train step drew."""
    import flax.linen as nn

    from vitdistill.models.vit import DropPath

    masks = []

    def interceptor(next_fun, args, call_kwargs, context):
        if isinstance(context.module, DropPath) and context.method_name == "__call__" and call_kwargs.get("train") \
                and context.module.rate > 0:
            x = args[0]
            scaled = next_fun(jax.numpy.ones_like(x), **call_kwargs)  # keep / (1 - rate), per sample
            masks.append((context.module.rate, np.asarray(scaled).reshape(x.shape[0], -1)[:, 0] > 0))
            return x * scaled
        return next_fun(*args, **call_kwargs)

    with nn.intercept_methods(interceptor):
        module.apply(variables, inputs, train=True, rngs={"dropout": rng}, **kwargs)
    return masks


class OfficialDeit:
    """engine.train_one_epoch as main.py sets it up, on `groups` simulated GPUs.

    Without mixup: label smoothing through timm's LabelSmoothingCrossEntropy. With mixup/cutmix: each GPU
    mixes its own rows with timm 0.3.2's Mixup, given the draw our step made (`mixup.group_mix_params`;
    test_mixup checks the draws' distribution), the criterion is SoftTargetCrossEntropy and the teacher sees
    the mixed images; DDP's averaged gradients are those of the mean loss over the whole batch. Drop path:
    timm 0.3.2's formula on the masks our step drew. The lr: timm's CosineLRScheduler stepped per update
    (`schedule_per_epoch=False`), or per epoch exactly as main.py steps it (`step(epoch)` after each epoch).
    The model EMA: timm's ModelEma, updated after each optimizer step."""

    def __init__(self, config, params, teacher_params, steps_per_epoch, num_classes, groups=1):
        from timm.loss import LabelSmoothingCrossEntropy
        from timm.scheduler.cosine_lr import CosineLRScheduler

        size, opt = config.data.image_size, config.optim
        self.num_classes, self.groups, self.mix = num_classes, groups, config.mixup
        self.mixes = config.mixup.mixup_alpha > 0 or config.mixup.cutmix_alpha > 0
        self.steps_per_epoch, self.per_epoch = steps_per_epoch, opt.schedule_per_epoch
        self.drop_masks = []
        self.student = micro_vit(size, num_classes, distilled=True, drop_path_rate=config.model.drop_path_rate)
        load_into(self.student, params)
        replay_drop_path(self.student, self.drop_masks)
        self.student.set_distilled_training(True)
        self.student.train()
        self.ema_decay = config.model_ema_decay
        self.ema = copy.deepcopy(self.student) if self.ema_decay else None  # ModelEma deep-copies the model
        self.teacher = micro_vit(size, num_classes)
        load_into(self.teacher, teacher_params)
        self.teacher.eval()
        base = soft_target_cross_entropy if self.mixes else LabelSmoothingCrossEntropy(
            smoothing=config.mixup.label_smoothing)
        self.criterion = DistillationLoss(base, self.teacher, config.distill.kind, config.distill.alpha,
                                          config.distill.tau)
        base_lr = opt.lr * config.batch_size / 512.0
        self.optimizer = torch.optim.AdamW(timm_param_groups(self.student, opt.weight_decay), lr=base_lr,
                                           betas=(opt.b1, opt.b2), eps=opt.eps)
        self.small_gradients = {}
        if self.per_epoch:
            assert opt.schedule_official_lag
            self.scheduler = official_deit_scheduler(config, self.optimizer, base_lr)
        else:
            self.scheduler = CosineLRScheduler(
                self.optimizer, t_initial=int(config.epochs * steps_per_epoch), lr_min=opt.min_lr, cycle_limit=1,
                warmup_lr_init=opt.warmup_lr, warmup_t=int(opt.warmup_epochs * steps_per_epoch), t_in_epochs=False)

    def mixed(self, samples, targets, draws):
        """Each GPU's rows mixed with its own draw; the batch's rows in GPU order."""
        per_gpu = samples.shape[0] // self.groups
        out, soft = [], []
        for g in range(self.groups):
            rows = slice(g * per_gpu, (g + 1) * per_gpu)
            x, y = timm_032_mix(samples[rows], targets[rows], lam=float(draws["lam"][g]),
                                use_cutmix=bool(draws["use_cutmix"][g]), box=[int(v) for v in draws["box"][g]],
                                num_classes=self.num_classes, smoothing=self.mix.label_smoothing)
            out.append(x)
            soft.append(y)
        return torch.cat(out), torch.cat(soft)

    def step(self, it, batch, draws=None, drop_masks=()):
        lr = self.optimizer.param_groups[0]["lr"]
        samples, targets = nchw(batch["image"]), torch.from_numpy(batch["label"]).long()
        if self.mixes:
            samples, targets = self.mixed(samples, targets, draws)
        self.drop_masks[:] = list(drop_masks)
        outputs = self.student(samples)
        assert not self.drop_masks, f"{len(self.drop_masks)} of our drop path masks were not used"
        loss = self.criterion(samples, outputs, targets)
        self.optimizer.zero_grad()
        loss.backward()
        record_small_gradients(self.student, self.small_gradients)
        self.optimizer.step()
        if self.ema is not None:  # timm 0.3.2 ModelEma.update
            with torch.no_grad():
                model_state = self.student.state_dict()
                for k, ema_v in self.ema.state_dict().items():
                    ema_v.copy_(ema_v * self.ema_decay + (1.0 - self.ema_decay) * model_state[k].detach())
        if self.per_epoch:
            if (it + 1) % self.steps_per_epoch == 0:
                self.scheduler.step(it // self.steps_per_epoch)  # main.py: lr_scheduler.step(epoch)
        else:
            self.scheduler.step_update(num_updates=it + 1)
        return dict(loss=loss.item(), lr=lr)


def _deit_config(kind, alpha, tau):
    config = recipes.deit("deit_micro_distilled_patch4_32", distilled=True)
    small_data.runlocal(config)
    config.model.name = "deit_micro_distilled_patch4_32"
    config.distill.kind, config.distill.alpha, config.distill.tau = kind, alpha, tau
    config.teacher.train = ConfigDict()          # no teacher run: a randomly initialised one, task.frozen
    config.teacher.checkpoint = "random"
    config.teacher.model = "deit_micro_patch4_32"  # timm has its twin; the teacher runs in inference mode
    config.data.image_size = 16
    config.data.train_limit = 16                 # 2 steps per epoch
    config.data.eval_limit = 8
    config.batch_size = 8
    config.model.drop_path_rate = 0.0            # deterministic
    config.mixup.mixup_alpha = 0.0
    config.mixup.cutmix_alpha = 0.0
    config.mixup.label_smoothing = 0.1
    config.epochs = 10.0
    config.optim.lr = 0.002 * 512 / 8            # a base lr of 2e-3 at batch 8
    config.optim.warmup_epochs = 1.0             # steps 0..2: warm-up lr, halfway, the cosine's start
    config.optim.warmup_lr = 1e-4
    config.optim.min_lr = 1e-5
    config.optim.weight_decay = 0.5              # larger than 0.05 so the no-decay groups matter
    config.optim.schedule_per_epoch = False
    return config


def _deit_recipe_config(kind, alpha, tau):
    """The recipe's training-time randomness and schedule on: mixup and cutmix (one draw per device, as per
    GPU under DDP), drop path, the per-epoch lr with main.py's lag, a model EMA."""
    config = _deit_config(kind, alpha, tau)
    recipe = recipes.deit("deit_small_distilled_patch16_224", distilled=True)
    for key in ("mixup_alpha", "cutmix_alpha", "switch_prob", "prob", "label_smoothing", "groups"):
        config.mixup[key] = recipe.mixup[key]
    assert config.mixup.groups == 0 and jax.device_count() == 2  # tests run on 2 host devices: 2 draws a step
    config.model.drop_path_rate = 0.3            # the recipe's 0.1 would drop ~2 of the 48 block-samples a step
    config.data.train_limit = 8                  # 1 step per epoch, so the per-epoch lr moves within 4 steps
    config.optim.schedule_per_epoch = True
    config.optim.schedule_official_lag = True
    config.optim.warmup_epochs = 2.0             # steps 0..3: warm-up lr, again (the lag), halfway, the cosine
    config.model_ema_decay = 0.9                 # the recipe's 0.99996 would move the EMA by ~1e-8
    return config


def _deit_batch(config, num_classes, seed, levels=False):
    """Normal images, or with `levels` uint8 levels as the training pipeline ships them (erase boxes off)."""
    rng = np.random.RandomState(100 + seed)
    s, b = config.data.image_size, config.batch_size
    images = rng.randint(0, 256, (b, s, s, 3)).astype(np.uint8) if levels else rng.randn(b, s, s, 3).astype(np.float32)
    batch = {"image": images, "label": rng.randint(0, num_classes, b).astype(np.int32)}
    if levels:
        batch["erase"] = np.zeros((b, 6), np.int32)
    return batch


def torchvision_normalised(batch):
    """The batch as the official pipeline hands its levels to the model: ToTensor (/ 255), Normalize (ImageNet)."""
    functional = pytest.importorskip("torchvision.transforms.functional")
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float().div(255)
    images = functional.normalize(images, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return {**batch, "image": images.permute(0, 2, 3, 1).numpy()}


DEIT_CASES = {
    "hard": (("hard", 0.5, 1.0), _deit_config, STEPS),
    "hard, blocks scanned and remat": (("hard", 0.5, 1.0), lambda *distill: _scanned(_deit_config(*distill)), STEPS),
    "soft": (("soft", 0.3, 3.0), _deit_config, STEPS),
    "hard, mixup/cutmix, drop path, per-epoch lr, EMA": (("hard", 0.5, 1.0), _deit_recipe_config, 4),
    "soft, mixup/cutmix, drop path, per-epoch lr, EMA": (("soft", 0.5, 1.0), _deit_recipe_config, 4),
    # the training pipeline's form: uint8 levels, normalised in the step; the reference gets torchvision's
    "hard, uint8 levels normalised in the step": (("hard", 0.5, 1.0), _deit_config, 2),
}


@pytest.mark.parametrize("case", list(DEIT_CASES))
def test_deit_steps_match_official_pytorch(tmp_path, case):
    distill, make_config, steps = DEIT_CASES[case]
    config = make_config(*distill)
    task = deit.build_task(config, str(tmp_path))
    setup = task.train_step.keywords["setup"]
    assert (setup.model.scan_blocks, setup.model.remat) == (bool(config.model.get("scan_blocks")),) * 2
    num_classes = 10  # digits
    state = jax.jit(task.init)(jax.random.key(0))
    reference = OfficialDeit(config, state.params, task.frozen["params"], task.length.steps_per_epoch, num_classes,
                             groups=setup.mixing.groups)
    train_step = jax.jit(task.train_step)
    lr_sum, modes, dropped = 0.0, set(), 0
    levels = "uint8 levels" in case
    for it in range(steps):
        batch = _deit_batch(config, num_classes, it, levels=levels)
        mix_rng, drop_rng = deit.step_rngs(setup, it)
        draws, masks = None, []
        if setup.mixing.mixes:
            draws = jax.device_get(mixup.group_mix_params(
                mix_rng, (config.data.image_size,) * 2, groups=setup.mixing.groups, mixup_alpha=setup.mixing.mixup_alpha,
                cutmix_alpha=setup.mixing.cutmix_alpha, switch_prob=setup.mixing.switch_prob, prob=setup.mixing.prob))
            modes.update("cutmix" if c else "mixup" for c in draws["use_cutmix"])
        if config.model.drop_path_rate:
            # the unmixed images: the masks depend on shapes and keys, not on values
            masks = our_drop_masks(setup.model, {"params": state.params}, batch["image"], drop_rng)
            dropped += sum(int((~keep).sum()) for _, keep in masks)
        state, metrics = train_step(state, batch, task.frozen)
        metrics = jax.device_get(metrics)
        want = reference.step(it, torchvision_normalised(batch) if levels else batch, draws, masks)
        lr_sum += want["lr"]
        print(f"DeiT {case} step {it}: loss {float(metrics['loss']):.7f} vs {want['loss']:.7f}, "
              f"lr {float(metrics['lr']):.4e} vs {want['lr']:.4e}")
        assert float(metrics["loss"]) == pytest.approx(want["loss"], rel=LOSS_RTOL)
        assert float(metrics["lr"]) == pytest.approx(want["lr"], rel=1e-6)
        check_params(state.params, reference.student, "student", lr_sum, reference.small_gradients)
        if reference.ema is not None:
            check_params(state.ema_params, reference.ema, "model EMA", lr_sum, reference.small_gradients)
    if setup.mixing.mixes:  # both of timm's modes were exercised, on separately drawn groups
        assert modes == {"mixup", "cutmix"}, modes
    if config.model.drop_path_rate:
        assert dropped >= 5, f"only {dropped} residual branches were dropped: the masks were barely exercised"
    noisy = sum(int(v.sum()) for v in reference.small_gradients.values())
    total = sum(v.size for v in reference.small_gradients.values())
    # The max |Δ| check still covers all but ~0.1 % of the elements (512 of them the attention key biases,
    # whose exact gradient is 0).
    assert noisy < 2.5e-3 * total, (noisy, total)


def test_deit_per_epoch_lr_follows_the_official_main_loop():
    """The recipe's per-epoch lr against main.py's loop: scheduler built by timm's create_scheduler with
    DeiT's arguments, the lr read while an epoch trains (as engine.py logs it), then `step(epoch)`."""
    config = recipes.deit("deit_small_patch16_224")
    opt, epochs, steps_per_epoch = config.optim, int(config.epochs), 7
    assert opt.schedule_per_epoch
    base_lr = schedules.scaled_lr(opt.lr, config.batch_size, opt.lr_reference_batch)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = official_deit_scheduler(config, optimizer, base_lr)
    schedule = schedules.deit_lr_schedule(base_lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                                          warmup_epochs=opt.warmup_epochs, warmup_lr=opt.warmup_lr,
                                          min_lr=opt.min_lr, per_epoch=True,
                                          official_lag=opt.schedule_official_lag)
    ours = np.asarray(jax.jit(jax.vmap(schedule))(np.arange(epochs * steps_per_epoch)))
    official = []
    for epoch in range(epochs):  # main.py: for epoch in range(start_epoch, epochs)
        official += [optimizer.param_groups[0]["lr"]] * steps_per_epoch  # train_one_epoch
        scheduler.step(epoch)
    official = np.asarray(official)
    mismatched = np.flatnonzero(~np.isclose(ours, official, rtol=2e-6, atol=1e-12))
    assert not mismatched.size, (
        f"{mismatched.size} of {ours.size} steps differ, the first at step {mismatched[0]} (epoch "
        f"{mismatched[0] // steps_per_epoch}): ours {ours[mismatched[0]]:.6g}, official {official[mismatched[0]]:.6g}")
