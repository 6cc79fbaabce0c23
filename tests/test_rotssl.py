"""Tests of rotssl.py: the rotation task, Sinkhorn, the SwAV and BYOL losses, and the script end to end."""
import copy
import json
import math
import os
import signal
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import default_collate
from torchvision.transforms import v2

import common
import eval_linear
import rotssl
from conftest import (assert_bf16_run_close_to_fp32, assert_same_state, read_log, run_killed_after_first_checkpoint,
                      run_script, run_signalled_mid_epoch)

# a tiny run: 256 images, batch 32, 16 px global / 8 px local crops, no kNN monitor
TINY = ["--subset", "256", "--batch-size", "32", "--epochs", "2", "--eval-every", "0", "--workers", "0",
        "--global-size", "16", "--local-size", "8", "--n-local", "2"]


# ---------------------------------------------------------------------------- the rotation task
def test_rotation_labels_match_the_rotation_applied():
    torch.manual_seed(0)
    x, k = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))
    rotated = rotssl.rotate_views(x, k)
    for image, back, r in zip(x, rotated, k.tolist()):
        assert torch.equal(torch.rot90(back, -r, dims=(1, 2)), image)  # rotating back by -k is exact
        assert torch.equal(back, image) == (r == 0)  # and only k = 0 leaves the image as it was


def augmented_batch(aug, image, n):
    """n samples from the workers' half of `aug`, collated and finished on the CPU (the training loop's path)."""
    return aug.on_device(default_collate([aug(image) for _ in range(n)]), torch.device("cpu"))


def test_augmentation_draws_rotations_per_view_and_only_when_asked():
    image = common.Synthetic("train", size=4)[0][0]
    for base, n_local in (("swav", 3), ("byol", 0)):
        torch.manual_seed(0)
        aug = rotssl.Augmentation(base, 16, 8, 3, rotate=True)
        batch = augmented_batch(aug, image, 20)
        assert len(batch["global"]) == 2 and len(batch["local"]) == n_local
        assert batch["global"][0].dtype == torch.float32 and batch["global"][0].shape == (20, 3, 16, 16)
        assert batch["rotation"].shape == (20, 2) and set(batch["rotation"].flatten().tolist()) == {0, 1, 2, 3}
        assert (batch["rotation"][:, 0] != batch["rotation"][:, 1]).any()  # independent per view
        for view, rotated, k in zip(batch["global"], batch["rotated"], batch["rotation"].t()):
            for i in range(20):
                assert torch.equal(torch.rot90(rotated[i], -int(k[i]), dims=(1, 2)), view[i])
        plain = rotssl.Augmentation(base, 16, 8, 3, rotate=False)
        assert "rotation" not in plain(image) and "rotated" not in augmented_batch(plain, image, 2)


def count_backbone_calls(model):
    """Record the input of every call of the online and (BYOL) momentum (target) backbones."""
    calls = {"online": [], "target": []}
    for name, key in (("backbone", "online"), ("momentum_backbone", "target")):
        net = getattr(model, name, None)
        if net is not None:
            forward = net.forward
            net.forward = lambda x, forward=forward, key=key: (calls[key].append(x), forward(x))[1]
    return calls


@pytest.mark.parametrize("base", ["swav", "byol"])
def test_rot_weight_zero_runs_no_rotated_forward(base):
    image = common.Synthetic("train", size=4)[0][0]
    for rot_weight in (0.0, 0.1):
        torch.manual_seed(0)
        aug = rotssl.Augmentation(base, 16, 8, 2, rotate=rot_weight > 0)
        batch = augmented_batch(aug, image, 8)
        backbone, feat_dim = common.build_backbone("resnet_tiny", True, 16)
        model = rotssl.RotSSL(backbone, feat_dim, base, rot_weight, n_prototypes=10)
        calls = count_backbone_calls(model)
        losses = model(batch)
        # SwAV: one call per crop resolution; BYOL: one call per view, in the online and the target network
        expected = ([torch.cat(batch["global"]), torch.cat(batch["local"])] if base == "swav" else batch["global"])
        base_calls = len(expected)
        assert all(torch.equal(seen, x) for seen, x in zip(calls["online"], expected))
        if rot_weight == 0:
            assert len(calls["online"]) == base_calls and model.rotation_head is None
            assert set(losses) == {"loss", "loss_base"} and torch.equal(losses["loss"], losses["loss_base"])
        else:  # two more calls, one per rotated view, each with exactly the rotated batch
            assert len(calls["online"]) == base_calls + 2
            for seen, rotated in zip(calls["online"][base_calls:], batch["rotated"]):
                assert torch.equal(seen, rotated)
            expected = losses["loss_base"] + rot_weight * losses["loss_rot"]
            assert torch.allclose(losses["loss"], expected)
            assert losses["loss_rot"] > 2 * math.log(4) * 0.5  # a sum of two CEs near log 4 each at init
        if base == "byol":  # the target sees the two unrotated global views, one call each
            assert len(calls["target"]) == 2
            assert all(torch.equal(seen, x) for seen, x in zip(calls["target"], batch["global"]))


# ---------------------------------------------------------------------------- one step as the reference
def random_batch(b=8, size=16, local=8, n_local=2):
    torch.manual_seed(1)
    views, k = [torch.randn(b, 3, size, size) for _ in range(2)], torch.randint(0, 4, (b, 2))
    return {"global": views, "local": [torch.randn(b, 3, local, local) for _ in range(n_local)],
            "rotated": [rotssl.rotate_views(v, k[:, i]) for i, v in enumerate(views)], "rotation": k}


def rotation_loss_by_hand(m, batch):
    return sum(F.cross_entropy(m.rotation_head(m.backbone(r)), k) for r, k in zip(batch["rotated"], batch["rotation"].t()))


def one_step(model, loss_fn):
    """Loss and parameter gradients of one forward + backward of a fresh copy (BN in training mode)."""
    m = copy.deepcopy(model)
    loss = loss_fn(m)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def relative_gap(a, b, names=None):
    names = names or b.keys()
    return (sum((a[n] - b[n]).norm() ** 2 for n in names) / sum(b[n].norm() ** 2 for n in names)).sqrt().item()


def assert_same_step(step, reference):
    (loss, grads), (ref_loss, ref_grads) = step, reference
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    # every parameter gradient within 1e-5 relative; the floor (1e-7 of the whole gradient) is for a Linear bias
    # followed by batch norm, whose exact gradient is 0, so that its fp32 value is rounding noise alone
    floor = 1e-7 * sum(g.norm() ** 2 for g in ref_grads.values()).sqrt()
    for name in ref_grads:
        assert (grads[name] - ref_grads[name]).norm() <= 1e-5 * ref_grads[name].norm() + floor, name


def test_byol_step_equals_the_reference_computed_one_view_per_call():
    """DeepMind's BYOL and solo-learn run each view through each network in its own call."""
    torch.manual_seed(0)
    backbone, feat_dim = common.build_backbone("resnet_tiny", True, 16)
    model = rotssl.RotSSL(backbone, feat_dim, "byol", 0.1)
    batch = random_batch(n_local=0)

    def reference(m, per_view=True):
        x1, x2 = batch["global"]
        if per_view:
            p = [m.predictor(m.projector(m.backbone(x))) for x in (x1, x2)]
            with torch.no_grad():
                z = [m.momentum_projector(m.momentum_backbone(x)) for x in (x1, x2)]
        else:  # the old way: both views in one call, BN statistics over 2B mixed images
            p = m.predictor(m.projector(m.backbone(torch.cat([x1, x2])))).chunk(2)
            with torch.no_grad():
                z = m.momentum_projector(m.momentum_backbone(torch.cat([x1, x2]))).chunk(2)
        # solo-learn's byol_loss_func, summed over the two pairs
        byol = sum(2 - 2 * (F.normalize(pi, dim=-1) * F.normalize(zj, dim=-1)).sum(-1).mean()
                   for pi, zj in ((p[0], z[1]), (p[1], z[0])))
        return byol + 0.1 * rotation_loss_by_hand(m, batch)

    step = one_step(model, lambda m: m(batch)["loss"])
    assert_same_step(step, one_step(model, reference))
    # the test can tell: one call on the concatenated views gives another backbone gradient
    concatenated = one_step(model, lambda m: reference(m, per_view=False))[1]
    backbone_params = [n for n in step[1] if n.startswith("backbone.")]
    assert relative_gap(concatenated, step[1], backbone_params) > 1e-2


def reference_sinkhorn(out, eps=0.05, iters=3):
    """EffSSL's distributed_sinkhorn on one process."""
    Q = torch.exp(out / eps).t()
    B, K = Q.shape[1], Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(iters):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


def swav_reference(m, batch, groups=((0, 2), (2, 4)), queue=None):
    """EffSSL's step (swav's main_swav.py with its queue if `queue` is given: filled in place, as swav's)."""
    crops, bs = batch["global"] + batch["local"], batch["global"][0].shape[0]
    features = torch.cat([m.backbone(torch.cat(crops[a:b])) for a, b in groups])
    embedding = F.normalize(m.projector(features), dim=1)
    output, embedding = m.prototypes(embedding), embedding.detach()
    loss = 0
    for i, crop_id in enumerate((0, 1)):
        with torch.no_grad():
            out = output[bs * crop_id: bs * (crop_id + 1)].detach()
            if queue is not None:
                out = torch.cat((torch.mm(queue[i], m.prototypes.weight.t()), out))
                queue[i, bs:] = queue[i, :-bs].clone()
                queue[i, :bs] = embedding[crop_id * bs: (crop_id + 1) * bs]
            q = reference_sinkhorn(out)[-bs:]
        subloss = 0
        for v in [v for v in range(len(crops)) if v != crop_id]:
            subloss -= torch.mean(torch.sum(q * F.log_softmax(output[bs * v: bs * (v + 1)] / 0.1, dim=1), dim=1))
        loss += subloss / (len(crops) - 1)
    return loss / 2 + 0.1 * rotation_loss_by_hand(m, batch)


def swav_model(**kwargs):
    torch.manual_seed(0)
    backbone, feat_dim = common.build_backbone("resnet_tiny", True, 16)
    model = rotssl.RotSSL(backbone, feat_dim, "swav", 0.1, n_prototypes=10, **kwargs)
    model.normalize_prototypes()
    return model


def test_swav_step_equals_the_reference_computed_one_call_per_resolution():
    """EffSSL (SwAV's multi-resolution forward): the backbone once per crop size, the heads on all crops."""
    model, batch = swav_model(), random_batch()
    step = one_step(model, lambda m: m(batch)["loss"])
    assert_same_step(step, one_step(model, lambda m: swav_reference(m, batch)))
    # the test can tell: one call per crop gives another gradient
    per_crop = one_step(model, lambda m: swav_reference(m, batch, groups=((0, 1), (1, 2), (2, 3), (3, 4))))[1]
    assert relative_gap(per_crop, step[1], [n for n in step[1] if n.startswith("backbone.")]) > 1e-2


def test_swav_step_with_the_queue_equals_swavs():
    """swav's queue: the codes of crop s from Sinkhorn over [queue_s scored by the current prototypes; the batch's
    crop s], the batch's rows kept, the loss on the batch only; then the queue shifts by the batch, newest first."""
    model, batch = swav_model(queue_length=24), random_batch()  # a queue of 3 batches of 8, full
    model.queue.copy_(F.normalize(torch.randn(2, 24, 128), dim=-1))
    queue = model.queue.clone()
    step = one_step(model, lambda m: m(batch, fill_queue=True, use_queue=True)["loss"])
    assert_same_step(step, one_step(model, lambda m: swav_reference(m, batch, queue=queue.clone())))
    after, expected = copy.deepcopy(model), queue.clone()
    after(batch, fill_queue=True, use_queue=True)
    swav_reference(copy.deepcopy(model), batch, queue=expected)
    assert torch.equal(after.queue[:, 8:], queue[:, :16]) and torch.allclose(after.queue, expected, atol=1e-6)
    # the test can tell: the queue changes the loss; while it fills (not yet in use) the step is the plain one
    assert abs(step[0] - one_step(model, lambda m: m(batch)["loss"])[0]) > 1e-3
    assert torch.equal(copy.deepcopy(model)(batch, fill_queue=True)["loss"], copy.deepcopy(model)(batch)["loss"])


# ---------------------------------------------------------------------------- crop sizes and recipes
def resolved(native, *flags):
    args = rotssl.get_args_parser().parse_args(list(flags))
    small, recipe, _ = rotssl.resolve_recipe(args, native)
    return small, args, recipe


def test_image_size_sets_the_crop_sizes_and_the_byol_recipe():
    # images above 64 px: the reference's 224 / 96 px whatever their size, and BYOL's ImageNet recipe
    small, args, recipe = resolved(375, "--base", "byol")  # 1 epoch: DeepMind's 40-epoch preset
    assert not small and (args.global_size, args.local_size) == (224, 96)
    assert (args.lr, args.wd, args.warmup_start_lr, args.final_lr) == (0.45, 1e-6, 0.0, 0.0)
    assert (args.lars_eta, args.lars_clip) == (0.001, False) and recipe["optimizer"] == "LARS (eta 0.001)"
    small, args, recipe = resolved(375)
    assert (args.global_size, args.local_size, args.n_prototypes, args.wd, args.warmup_start_lr) == (224, 96, 3000,
                                                                                                      1e-6, 0.3)
    assert (args.lr, args.final_lr, args.lars_eta, args.lars_clip) == (1.2, 0.0012, 0.001, False)
    assert recipe["lr"] == "1.2 (not batch-scaled, cosine to 0.0012)" and recipe["warmup"] == "0.2 epochs from 0.3"
    # 32 px images: native-size crops and solo-learn's CIFAR recipe in full, LARS eta 0.02 clipped
    small, args, recipe = resolved(32, "--base", "byol")
    assert small and (args.global_size, args.local_size) == (32, 16)
    assert (args.lr, args.wd, args.warmup_start_lr, args.lars_eta, args.lars_clip) == (1.0, 1e-5, 3e-5, 0.02, True)
    assert recipe["defaults"] == "byol_small" and recipe["lr"] == "0.125 (1.0 x 32/256, cosine to 0)"
    assert recipe["optimizer"] == "LARS (eta 0.02, each layer's rate clipped at the global one)"
    assert (args.mean, args.std, args.stem_padding) == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 2)
    assert "normalisation" in recipe and recipe["stem"] == "3x3 conv, padding 2"
    for row in (resolved(375, "--base", "byol")[1], resolved(32)[1]):  # the ImageNet rows, and SwAV on CIFAR
        assert (row.mean, row.std, row.stem_padding) == (common.IMAGENET_MEAN, common.IMAGENET_STD, 1)
    # the flags override; BYOL's small-image wd 1e-5 applies only when --wd is not given
    small, args, recipe = resolved(32, "--base", "byol", "--wd", "1e-4", "--global-size", "24", "--local-size", "12",
                                   "--warmup-start-lr", "0", "--lr", "0.5", "--warmup-epochs", "2")
    assert (args.global_size, args.local_size, args.wd, args.warmup_start_lr, args.lr) == (24, 12, 1e-4, 0.0, 0.5)
    assert args.warmup_epochs == 2 and (args.lars_eta, args.lars_clip) == (0.02, True)
    assert resolved(32, "--base", "byol", "--wd", "1.5e-6")[1].wd == 1.5e-6  # even when it is the ImageNet value
    # SwAV's recipe does not depend on the image size, only its prototypes do: min(300, batch + queue)
    small, args, recipe = resolved(32, "--batch-size", "64")
    assert (args.lr, args.wd, args.warmup_start_lr, args.lars_eta, args.n_prototypes) == (1.2, 1e-6, 0.3, 0.001, 64)
    assert resolved(32, "--queue-length", "64")[1].n_prototypes == 96 and "queue" not in recipe
    _, args, recipe = resolved(32, "--queue-length", "3840", "--epoch-queue-starts", "0")
    assert args.n_prototypes == 300 and recipe["queue"] == "3840 from epoch 0"


@pytest.mark.parametrize("epochs, preset", [(1, 40), (40, 40), (41, 100), (100, 100), (200, 300), (300, 300),
                                            (800, 1000), (1000, 1000), (3000, 1000)])
def test_byol_above_64_px_takes_deepminds_preset_at_or_above_epochs(epochs, preset):
    """byol/configs/byol.py: lr, wd and tau per run length; the run takes the shortest preset at or above --epochs."""
    lr, wd, tau = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99),
                   1000: (0.2, 1.5e-6, 0.996)}[preset]
    _, args, recipe = resolved(224, "--base", "byol", "--epochs", str(epochs), "--batch-size", "256")
    assert (args.lr, args.wd, args.ema) == (lr, wd, tau) and recipe["ema"] == f"{tau} -> 1 (cosine)"
    assert recipe["defaults"] == f"byol (DeepMind's {preset}-epoch preset: lr {lr:g}, wd {wd:g}, tau {tau:g})"
    assert recipe["lr"] == f"{lr:.4g} ({lr} x 256/256, cosine to 0)"
    flags = resolved(224, "--base", "byol", "--epochs", str(epochs), "--lr", "0.1", "--wd", "0", "--ema", "0.9")[1]
    assert (flags.lr, flags.wd, flags.ema) == (0.1, 0.0, 0.9)  # set flags win


def test_byol_target_momentum_follows_the_recipe_and_the_flag_overrides():
    # DeepMind's ImageNet BYOL's tau by run length (the 1-epoch run: 0.97), solo-learn's CIFAR BYOL 0.99; --ema wins
    _, args, recipe = resolved(224, "--base", "byol")
    assert args.ema == 0.97 and recipe["ema"] == "0.97 -> 1 (cosine)" and recipe["defaults"].startswith("byol (")
    assert resolved(32, "--base", "byol")[1].ema == 0.99
    assert resolved(224, "--base", "byol", "--ema", "0.99")[1].ema == 0.99
    assert resolved(32, "--base", "byol", "--ema", "0.9")[1].ema == 0.9 and resolved(224)[1].ema is None


def test_main_warms_up_from_the_recipes_start_lr_and_updates_the_target_after_the_step(tmp_path, monkeypatch):
    """The schedules main() builds from the recipe: on small images BYOL's lr starts at solo-learn's 3e-5, not 0,
    so that the clipped LARS step is clipped from step 0; tau starts at --ema; each momentum update follows the
    optimizer step (it sees the step's new online weights)."""
    events, set_lr, momentum_update, step = [], common.set_lr, common.momentum_update, common.LARS.step
    monkeypatch.setattr(common, "set_lr", lambda opt, lr: (events.append(("lr", lr)), set_lr(opt, lr))[1])
    monkeypatch.setattr(common, "momentum_update",
                        lambda t, o, m: (events.append(("ema", m)), momentum_update(t, o, m))[1])
    monkeypatch.setattr(common.LARS, "step", lambda self, closure=None: (events.append(("step",)), step(self))[1])
    monkeypatch.setattr("sys.argv", ["rotssl.py", "--base", "byol", *TINY, "--subset", "64", "--epochs", "1",
                                     "--warmup-epochs", "1", "--out", str(tmp_path / "byol")])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process, whatever launched pytest
        monkeypatch.delenv(name, raising=False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}  # the run installs its own
    try:
        rotssl.main()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert [e[0] for e in events] == ["lr", "step", "ema"] * 2  # 64 images, batch 32: two steps
    (_, lr0), (_, tau0) = events[0], events[2]
    assert lr0 == pytest.approx(3e-5) and lr0 > 0 and tau0 == pytest.approx(0.99)
    assert events[3][1] > lr0  # the warmup rises from there


def lrs_of_main(module, argv, monkeypatch):
    """The lr of every step of a whole in-process run of `module`.main() with `argv`."""
    lrs, set_lr = [], common.set_lr
    monkeypatch.setattr(common, "set_lr", lambda opt, lr: (lrs.append(lr), set_lr(opt, lr))[1])
    monkeypatch.setattr("sys.argv", [f"{module.__name__}.py", *argv])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process, whatever launched pytest
        monkeypatch.delenv(name, raising=False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}  # the run installs its own
    try:
        module.main()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return lrs


def test_swav_lr_is_swavs_schedule_step_for_step(tmp_path, monkeypatch):
    """main_swav.py: np.linspace(start_warmup, base_lr, iters x warmup_epochs) (its last step at base_lr), then
    final_lr + 0.5 (base_lr - final_lr)(1 + cos(pi t / T)) for t = 0 .. T - 1 (final_lr never reached)."""
    epochs, per_epoch, warmup, base, final, start = 4, 3, 1, 1.2, 0.0012, 0.3
    lrs = lrs_of_main(rotssl, [*TINY, "--subset", "96", "--epochs", str(epochs), "--warmup-epochs", str(warmup),
                               "--out", str(tmp_path / "swav")], monkeypatch)
    total = per_epoch * (epochs - warmup)
    swav = np.concatenate([np.linspace(start, base, per_epoch * warmup),
                           [final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / total)) for t in range(total)]])
    print(f"first {lrs[0]:.6g}, warmup end {lrs[per_epoch * warmup - 1]:.6g}, last {lrs[-1]:.6g}")
    assert len(lrs) == epochs * per_epoch and np.allclose(lrs, swav, rtol=1e-12, atol=0)
    assert lrs[0] == start and lrs[per_epoch * warmup - 1] == lrs[per_epoch * warmup] == base and lrs[-1] > final


def test_augmentation_blur_scale_and_interpolation_follow_the_references():
    bilinear, bicubic = v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC
    swav = rotssl.Augmentation("swav", 32, 16, 2, rotate=False, small=True)
    for crop, size in ((swav.global_crop, 32), (swav.local_crop, 16)):
        resize = crop.transforms[0]
        assert tuple(resize.size) == (size, size) and resize.interpolation == bilinear  # EffSSL: torchvision's default
    assert [c.blur_p for c in (*swav.global_colours, swav.local_colour)] == [0.0] * 3  # 64 px or less: no blur
    assert swav.local_colour.low.tolist() == pytest.approx([0.2, 0.2, 0.2, -0.2])  # jitter 0.8, hue 0.2
    swav = rotssl.Augmentation("swav", 160, 64, 2, rotate=False)
    for colour in (*swav.global_colours, swav.local_colour):  # local crops blurred like the global ones
        assert colour.blur_p == 0.5 and colour.sigma == pytest.approx((0.1 * 160 / 224, 2.0 * 160 / 224))
    byol = rotssl.Augmentation("byol", 224, 96, 0, rotate=False)
    assert byol.global_crop.transforms[0].interpolation == bicubic  # solo-learn
    assert [c.blur_p for c in byol.global_colours] == [1.0, 0.1] and byol.global_colours[0].sigma == (0.1, 2.0)
    assert byol.global_colours[0].mean.flatten().tolist() == pytest.approx(common.IMAGENET_MEAN)
    _, args, _ = resolved(32, "--base", "byol")  # solo-learn's CIFAR views: no blur, CIFAR-10's mean and std
    small = rotssl.Augmentation("byol", 32, 16, 0, rotate=False, small=True, mean=args.mean, std=args.std)
    assert [(c.blur_p, c.solarize_p) for c in small.global_colours] == [(0.0, 0.0), (0.0, 0.2)]
    assert small.global_colours[1].mean.flatten().tolist() == pytest.approx([0.4914, 0.4822, 0.4465])
    assert small.global_colours[1].std.flatten().tolist() == pytest.approx([0.2470, 0.2435, 0.2616])


# ---------------------------------------------------------------------------- SwAV
def test_sinkhorn_codes_are_assignments_with_uniform_prototype_marginals():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(256, 16), dim=1)
    prototypes = F.normalize(torch.randn(8, 16), dim=1)
    codes = rotssl.sinkhorn_codes(z @ prototypes.t(), eps=0.05, iters=3)
    assert codes.shape == (256, 8) and (codes >= 0).all()
    assert torch.allclose(codes.sum(1), torch.ones(256), atol=1e-5)  # each sample: a distribution
    # each prototype gets about B / K samples: roughly after the 3 iterations of the recipe (far closer
    # than the plain softmax of the same scores), and exactly when the iterations are run to convergence
    def deviation(c):
        return (c.sum(0) / (256 / 8) - 1).abs().max().item()
    assert deviation(codes) < 0.3
    assert deviation(codes) < 0.7 * deviation(F.softmax(z @ prototypes.t() / 0.05, dim=1))
    assert deviation(rotssl.sinkhorn_codes(z @ prototypes.t(), eps=0.05, iters=50)) < 1e-3


def test_swav_loss_equals_a_hand_computed_value():
    # 3 crops, 1 sample, 2 prototypes, temperature 0.1: scores / T are [1, 0], [0, 0] and [2, 0]
    scores = torch.tensor([[[0.1, 0.0]], [[0.0, 0.0]], [[0.2, 0.0]]])
    codes = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])]
    e1, e2 = math.log(math.e + 1), math.log(math.e ** 2 + 1)
    from_crop0 = (math.log(2) + (e2 - 2)) / 2  # code [1, 0] predicted by crops 1 and 2
    from_crop1 = ((2 * e1 - 1) / 2 + (2 * e2 - 2) / 2) / 2  # code [.5, .5] predicted by crops 0 and 2
    expected = (from_crop0 + from_crop1) / 2
    assert rotssl.swav_loss(scores, codes, temperature=0.1).item() == pytest.approx(expected, rel=1e-5)


def _sinkhorn_worker(rank, world, port, scores, queue_scores, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine, b = scores.chunk(world)[rank], len(scores) // world
        with_queue = torch.cat([queue_scores.chunk(world)[rank], mine])  # this process's queue, then its batch
        # a step that fills a model's queue (2 x 16 rows, 8 per process) with its z, caught at the projector
        torch.manual_seed(0)  # the same model on both processes, its own batch (4 feature vectors) on each
        model, z = rotssl.RotSSL(torch.nn.Identity(), 4, "swav", 0.0, n_prototypes=3, queue_length=16), []
        model.projector.register_forward_hook(lambda module, inputs, output: z.append(F.normalize(output, dim=1)))
        model.queue.copy_(torch.arange(2 * 16 * 128.0).view(2, 16, 128))
        model({"global": list(torch.randn(2, 2, 4, 4)[rank]), "local": []}, fill_queue=True)
        torch.save({"codes": rotssl.sinkhorn_codes(mine, 0.05, 3), "queue": model.queue,
                    "queued": rotssl.sinkhorn_codes(with_queue, 0.05, 3)[-b:], "z": z[0].detach().view(2, 4, 128)},
                   os.path.join(out, f"codes{rank}.pt"))
    finally:
        common.destroy_process_group()


def test_sinkhorn_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """Also with swav's queue: each process's codes over [its queue; its batch] are those of one process holding
    both queues and the whole batch (Sinkhorn's sums run over B = rows x processes)."""
    torch.manual_seed(0)
    prototypes = F.normalize(torch.randn(12, 16), dim=1).t()
    scores, queue_scores = [F.normalize(torch.randn(n, 16), dim=1) @ prototypes for n in (32, 48)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sinkhorn_worker, args=(2, port, scores, queue_scores, str(tmp_path)), nprocs=2)
    results = [torch.load(tmp_path / f"codes{r}.pt") for r in range(2)]
    single = rotssl.sinkhorn_codes(scores, 0.05, 3)
    assert torch.allclose(torch.cat([r["codes"] for r in results]), single, rtol=1e-5, atol=1e-7)
    queued = rotssl.sinkhorn_codes(torch.cat([queue_scores, scores]), 0.05, 3)[-32:]
    assert torch.allclose(torch.cat([r["queued"] for r in results]), queued, rtol=1e-5, atol=1e-7)
    # the halves alone (no all-reduce) would give other codes, as would the batch without the queue: the test can tell
    assert not torch.allclose(torch.cat([rotssl.sinkhorn_codes(h, 0.05, 3) for h in scores.chunk(2)]), single,
                              rtol=1e-3, atol=1e-4)
    assert not torch.allclose(queued, single, rtol=1e-3, atol=1e-4)
    # the queue: the same on both processes; process r's slice (8 rows) shifted by its batch, newest (its z) first
    assert torch.equal(results[0]["queue"], results[1]["queue"])
    old, new = torch.arange(2 * 16 * 128.0).view(2, 2, 8, 128), results[0]["queue"].view(2, 2, 8, 128)
    for r in range(2):
        assert torch.equal(new[:, r, :4], results[r]["z"]) and torch.equal(new[:, r, 4:], old[:, r, :4])
    assert not torch.equal(results[0]["z"], results[1]["z"])


# ---------------------------------------------------------------------------- BYOL
def test_byol_loss_is_0_for_identical_and_4_per_pair_for_opposite_vectors():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(5, 8), dim=1)
    assert rotssl.byol_loss(a, b, b, a).item() == pytest.approx(0.0, abs=1e-6)  # p1 = z2, p2 = z1
    assert rotssl.byol_loss(a, b, -b, a).item() == pytest.approx(4.0, abs=1e-5)  # one pair opposite
    assert rotssl.byol_loss(a, b, -b, -a).item() == pytest.approx(8.0, abs=1e-5)  # both: summed
    assert rotssl.byol_loss(3 * a, b, b, a).item() == pytest.approx(0.0, abs=1e-6)  # scale-invariant


def test_byol_target_is_a_frozen_momentum_average_of_the_online_networks():
    torch.manual_seed(0)
    backbone, feat_dim = common.build_backbone("resnet_tiny", True, 16)
    model = rotssl.RotSSL(backbone, feat_dim, "byol", 0.1)
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    target = [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    assert not any(p.requires_grad for p in target)  # trained only through the momentum update
    assert all(torch.equal(t, o) for t, o in zip(target, online))  # starts as a copy
    pairs = model.momentum_pairs()  # what main() updates: each target tensor with its online twin
    assert all(t is a for t, a in zip(pairs[0], target)) and all(o is b for o, b in zip(pairs[1], online))
    assert len(pairs[0]) == len(target) and len(pairs[1]) == len(online)
    before = [t.clone() for t in target]
    with torch.no_grad():
        for p in [*online, *model.predictor.parameters()]:
            p.add_(torch.randn_like(p))
    common.momentum_update(*pairs, 0.9)
    for t, t0, o in zip(target, before, online):
        assert torch.allclose(t, 0.9 * t0 + 0.1 * o, atol=1e-6)


# ---------------------------------------------------------------------------- the script
def test_demo_path_runs_and_logs_the_rotation_task(tmp_path):
    out = tmp_path / "demo"
    result = run_script("rotssl.py", "--epochs", "1", "--subset", "256", "--workers", "1", "--out", out)
    assert "kNN top-1: " in result.stdout and "% at random init" in result.stdout
    assert common.SELF_SUPERVISED_DEMO in result.stdout  # what to expect of the demo
    assert "crop sizes: global 32 px, local 16 px (images of about 32 px" in result.stdout
    assert result.stdout.count("recipe: defaults swav, lr 1.2 (not batch-scaled, cosine to 0.0012)") == 1
    header, init, epoch = read_log(out)
    assert header["recipe"]["optimizer"] == "LARS (eta 0.001)" and "ema" not in epoch  # SwAV has no target
    assert header["args"]["base"] == "swav" and header["args"]["n_prototypes"] == 32  # min(300, batch 32)
    assert (header["args"]["global_size"], header["args"]["local_size"]) == (32, 16)  # the sizes are logged
    assert init["epoch"] == 0 and "knn_top1" in init
    for key in ("loss", "loss_base", "loss_rot", "rot_acc", "lr", "images_per_s", "peak_mem_mb", "knn_top1"):
        assert math.isfinite(epoch[key]), key
    record = eval_linear.load_backbone(str(out / "backbone.pt"))
    assert record["method"] == "rotssl-swav" and record["img_size"] == 32
    eval_linear.backbone_from_record(record)


def test_byol_base_trains_a_momentum_target(tmp_path):
    out = tmp_path / "byol"
    run_script("rotssl.py", "--base", "byol", *TINY, "--out", out)
    logs = read_log(out)[1:]
    assert [r["epoch"] for r in logs] == [1, 2]
    assert all(0 <= r["rot_acc"] <= 100 and r["loss"] > r["loss_base"] for r in logs)
    assert all(0.99 <= r["ema"] <= 1 for r in logs) and logs[-1]["ema"] == 1.0  # tau: 0.99 -> 1, logged
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    target = {k[len("momentum_backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("momentum_backbone.")}
    online = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    assert target.keys() == online.keys()
    weights = [k for k in online if k.endswith("weight")]
    # the target trails the online network (momentum < 1), so the two differ
    assert any(not torch.equal(online[k], target[k]) for k in weights)
    assert "rotation_head.0.weight" in ckpt["model"] and "prototypes.weight" not in ckpt["model"]
    # small images get solo-learn's CIFAR recipe: lr 1.0 per 256 under LARS with eta 0.02, clipped, wd 1e-5,
    # warmup from 3e-5
    header = read_log(out)[0]["args"]
    assert (header["lr"], header["wd"], header["warmup_start_lr"]) == (1.0, 1e-5, 3e-5)
    assert (header["lars_eta"], header["lars_clip"]) == (0.02, True)  # resolved by the recipe, logged
    lars = ckpt["optimizer"]["param_groups"][0]
    assert lars["trust_coefficient"] == 0.02 and lars["clip"] and not lars["lars_exclude"]
    assert lars["weight_decay"] == 1e-5
    # and solo-learn's CIFAR stem (padding 2: 34 x 34 maps) and normalisation, which eval_linear.py reads back
    record = torch.load(out / "backbone.pt", map_location="cpu", weights_only=True)
    assert record["stem_padding"] == 2 and record["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    backbone, _ = eval_linear.backbone_from_record(record)
    assert backbone.conv1.padding == (2, 2) and backbone.conv1.kernel_size == (3, 3)
    assert backbone.layer1(backbone.relu(backbone.bn1(backbone.conv1(torch.zeros(1, 3, 32, 32))))).shape[-1] == 34


@pytest.mark.parametrize("base, queue", [("swav", 0), ("byol", 0), ("swav", 64)])
def test_two_processes_complete(tmp_path, base, queue):
    out = tmp_path / base
    run_script("rotssl.py", "--base", base, *TINY, "--epochs", "1", "--queue-length", queue, "--epoch-queue-starts", 0,
               "--out", out, nproc=2)
    assert read_log(out)[-1]["epoch"] == 1 and (out / "backbone.pt").exists()
    if queue:  # 2 processes x 32 rows, full after 2 of the 8 steps: each process filled its own slice
        slices = torch.load(out / "checkpoint.pt", weights_only=True)["model"]["queue"].view(2, 2, 32, 128)
        assert slices.norm(dim=-1).allclose(torch.ones(2, 2, 32)) and not slices[:, 0].allclose(slices[:, 1])


def test_exact_resume_after_a_crash(tmp_path):
    # prototypes frozen for 10 iterations: the freeze spans the first checkpoint (8 steps per epoch)
    args = [*TINY, "--freeze-prototypes-iters", "10"]
    run_script("rotssl.py", *args, "--out", tmp_path / "straight")
    first = run_killed_after_first_checkpoint("rotssl.py", *args, out=tmp_path / "resumed")
    assert first["epoch"] == 1 and first["step"] == 8
    # prototypes: l2-normalised before each step, and no gradient while frozen (steps 0 to 9), so the
    # optimizer has no state for them yet at the first checkpoint, and has at the end
    n_params = sum(len(group["params"]) for group in first["optimizer"]["param_groups"])
    assert len(first["optimizer"]["state"]) == n_params - 1
    assert torch.allclose(first["model"]["prototypes.weight"].norm(dim=1), torch.ones(32), atol=1e-6)
    run_script("rotssl.py", *args, "--out", tmp_path / "resumed")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert_same_state(a["model"], b["model"])
    assert len(a["optimizer"]["state"]) == n_params
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])
    # eval_linear.py reads the backbone.pt of the run
    run_script("eval_linear.py", "--ckpt", tmp_path / "resumed" / "backbone.pt", "--data", "synthetic",
               "--subset", "500", "--workers", "0", "--epochs", "5")
    result = json.loads((tmp_path / "resumed" / "eval_synthetic.json").read_text())
    assert 0 <= result["knn"]["top1"] <= 100 and 0 <= result["linear"]["top1"] <= 100


def test_swav_queue_survives_a_sigterm_resume_bit_equal(tmp_path):
    """The queue is part of checkpoint.pt: stopped mid-epoch while in use, the resumed run ends bit-equal."""
    args = [*TINY, "--epochs", "1", "--batch-size", "16", "--queue-length", "32", "--epoch-queue-starts", "0"]
    run_script("rotssl.py", *args, "--out", tmp_path / "straight")
    code, stderr = run_signalled_mid_epoch("rotssl.py", *args, out=tmp_path / "stopped")
    assert code == common.EXIT_STOPPED, stderr[-2000:]
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert 3 <= saved["step"] < 16 and saved["model"]["queue"].norm(dim=-1).allclose(torch.ones(2, 32))  # full
    run_script("rotssl.py", *args, "--out", tmp_path / "stopped")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 16 and not torch.equal(a["model"]["queue"], saved["model"]["queue"])
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])


def test_byol_sigterm_mid_epoch_saves_and_the_resumed_run_is_bit_equal(tmp_path):
    """SIGTERM inside an epoch: the step finishes, a checkpoint holds the position, and the resumed run
    ends bit-equal to an uninterrupted one (target network, tau schedule position, optimizer state)."""
    args = ["--base", "byol", *TINY, "--batch-size", "16"]  # 16 steps per epoch
    run_script("rotssl.py", *args, "--out", tmp_path / "straight")
    code, stderr = run_signalled_mid_epoch("rotssl.py", *args, out=tmp_path / "stopped")
    assert code == common.EXIT_STOPPED and "stopped by SIGTERM after step" in stderr and "Traceback" not in stderr
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and 3 <= saved["step"] < 16 and len(read_log(tmp_path / "stopped")) == 1
    run_script("rotssl.py", *args, "--out", tmp_path / "stopped")
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 32 and any(k.startswith("momentum_backbone.") for k in a["model"])
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])
    log_a, log_b = read_log(tmp_path / "straight"), read_log(tmp_path / "stopped")
    assert [r["epoch"] for r in log_b[1:]] == [1, 2]
    for key in ("loss", "loss_base", "loss_rot", "rot_acc"):
        assert [r[key] for r in log_a[1:]] == pytest.approx([r[key] for r in log_b[1:]], rel=1e-6)


@pytest.mark.parametrize("flag, value", [("--rot-weight", "-0.1"), ("--queue-length", "100")])
def test_bad_flag_exits_with_one_sentence_and_no_output(tmp_path, flag, value):
    out = tmp_path / "bad"
    result = run_script("rotssl.py", flag, value, "--out", out, check=False)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error:") and flag in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_bf16_run_is_close_to_fp32(tmp_path):
    assert_bf16_run_close_to_fp32("rotssl.py", *TINY, "--epochs", "1", out=tmp_path / "bf16")
