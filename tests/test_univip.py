"""Tests of univip.py: the scene-pair sampler, the box filter, Sinkhorn, the three losses, the
training step, and whole runs (demo path, torchrun, exact resume, box files, COCO, bad flags)."""
import copy
import json
import math
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.transforms import v2

import cifar_scenes as cifar_scenes_builder
import common
import eval_linear
import univip
from conftest import (REPO, assert_bf16_run_close_to_fp32, assert_same_state, read_log,
                      run_killed_after_first_checkpoint, run_script, run_signalled_mid_epoch)

# A tiny configuration for whole runs: small crops and heads keep every run to a few seconds.
TINY = ("--subset", "64", "--batch-size", "32", "--scene-size", "32", "--instance-size", "16",
        "--hidden-dim", "128", "--eval-every", "0", "--workers", "0")
LONG_EPOCH = ("--epochs", 2, *TINY, "--batch-size", 8)  # 8 steps per epoch: room to stop inside one


def inside(box, window, tol=1e-3):
    x, y, w, h = box
    wx, wy, ww, wh = window
    return x >= wx - tol and y >= wy - tol and x + w <= wx + ww + tol and y + h <= wy + wh + tol


def classic_sinkhorn(cost, b, a, eps, iters):
    """Textbook Sinkhorn-Knopp in linear space and float64 (fine at these eps): the plan diag(u) K diag(v)."""
    kernel = torch.exp(-cost.double() / eps)
    u, v = torch.ones_like(b, dtype=torch.double), torch.ones_like(a, dtype=torch.double)
    for _ in range(iters):
        u = b.double() / (kernel @ v.unsqueeze(-1)).squeeze(-1)
        v = a.double() / (kernel.transpose(-1, -2) @ u.unsqueeze(-1)).squeeze(-1)
    return u.unsqueeze(-1) * kernel * v.unsqueeze(-2)


# ----------------------------------------------------------------------------------------------
# The sampler and the box filter
# ----------------------------------------------------------------------------------------------
def test_every_chosen_box_lies_inside_both_windows():
    random.seed(0)
    rng = np.random.default_rng(0)
    fallbacks = 0
    for trial in range(400):
        width, height = int(rng.integers(40, 300)), int(rng.integers(40, 300))
        n = int(rng.integers(0, 12))
        xy = rng.uniform(0, 1, (n, 2)) * [width, height]
        wh = rng.uniform(4, 80, (n, 2))
        min_box = float(rng.choice([4, 8, 16, 30]))
        boxes = univip.filter_boxes(np.concatenate([xy, wh], 1), width, height, min_box)
        k = int(rng.integers(1, 6))
        w1, w2, chosen, fell_back = univip.sample_scene_pair(width, height, boxes, k, min_box, (0.08, 1.0))
        fallbacks += fell_back
        assert chosen.shape == (k, 4)
        for window in (w1, w2):
            assert all(isinstance(v, int) for v in window)
            assert window[2] > 0 and window[3] > 0
            assert window[0] + window[2] <= width and window[1] + window[3] <= height
        for box in chosen:
            assert inside(box, w1) and inside(box, w2), (trial, box, w1, w2)
            side = min(min_box, width, height)
            assert min(box[2], box[3]) >= side - 1e-3 and max(box[2], box[3]) <= 3 * min(box[2], box[3]) + 1e-3
        if not fell_back:  # without fallback every chosen box is one of the image's (filtered) boxes
            assert all(any(np.allclose(b, c) for c in boxes) for b in chosen)
    assert 0 < fallbacks < 400  # both paths were exercised


def test_fallback_yields_exactly_k_valid_boxes_also_without_any_box():
    random.seed(1)
    for width, height, boxes, min_box in [(96, 96, np.zeros((0, 4)), 8.0), (640, 480, np.zeros((0, 4)), 64.0),
                                          (50, 40, np.zeros((0, 4)), 64.0),  # image smaller than --min-box
                                          (96, 96, np.array([[10, 10, 20, 20]], np.float32), 8.0)]:
        for _ in range(200):
            w1, w2, chosen, fell_back = univip.sample_scene_pair(width, height, boxes, 4, min_box)
            assert fell_back and chosen.shape == (4, 4) and np.isfinite(chosen).all()
            side = min(min_box, width, height)
            for box in chosen:
                assert inside(box, w1) and inside(box, w2)
                assert min(box[2], box[3]) >= side - 1e-3 and max(box[2], box[3]) <= 3 * min(box[2], box[3]) + 1e-3


def test_no_fallback_when_the_boxes_are_there():
    random.seed(2)
    grid = np.array([[x, y, 20, 20] for x in range(0, 100, 25) for y in range(0, 100, 25)], np.float32)
    for _ in range(50):  # windows covering the whole image must succeed on the first try
        w1, w2, chosen, fell_back = univip.sample_scene_pair(100, 100, grid, 4, 8.0, scale=(1.0, 1.0))
        assert not fell_back and len({tuple(b) for b in chosen.tolist()}) == 4


@pytest.mark.parametrize("width, height", [(400, 20), (20, 400), (300, 200), (101, 99)])
def test_random_window_falls_back_as_torchvisions_random_resized_crop(width, height):
    """After 10 failed tries: the centre crop at the ratio bounds, as RandomResizedCrop.get_params (whole image if its
    aspect is within them). Scales this large fail every try on the thin images; (1, 1) fails on the near squares."""
    scale = (0.9, 1.0) if max(width, height) > 5 * min(width, height) else (1.0, 1.0)
    random.seed(0)
    torch.manual_seed(0)
    for ratio in ((3 / 4, 4 / 3), (0.5, 2.0)):
        top, left, h, w = v2.RandomResizedCrop.get_params(torch.zeros(3, height, width), list(scale), list(ratio))
        assert (left, top) == ((width - w) // 2, (height - h) // 2)  # torchvision fell back too
        assert univip.random_window(width, height, scale, ratio) == (left, top, w, h)


def fallback_rate(dataset, pairs=300):
    """The share of `pairs` scene-view pairs (the images in turn) that fall back, with the sampler as univip.py
    runs it on `dataset`: the defaults of K, --scene-scale and --min-box (resolved from the images' size), 20 tries."""
    args = univip.get_args_parser().parse_args([])
    univip.resolve_recipe(args, common.native_image_size(dataset))
    random.seed(0)
    fell = 0
    for i in range(pairs):
        image, boxes = dataset[i % len(dataset)]
        boxes = univip.filter_boxes(boxes, *image.size, args.min_box)
        fell += univip.sample_scene_pair(*image.size, boxes, args.num_instances, args.min_box,
                                         tuple(args.scene_scale))[3]
    return fell / pairs


def test_the_demo_scenes_hold_k_boxes_in_most_view_pairs():
    """The synthetic scenes (the demo's): at most one pair in five falls back to random boxes."""
    assert fallback_rate(common.build_scene_dataset("synthetic")) <= 0.2


@pytest.fixture(scope="module")
def cifar_scenes(tmp_path_factory, cifar10_root):
    """100 scenes made by the results table's builder (tests/cifar_scenes.py) from the CIFAR-10 training images."""
    out = tmp_path_factory.mktemp("cifar_scenes") / "scenes"
    cifar_scenes_builder.build(cifar10_root / "train", str(out), 100)
    return cifar10_root / "train", out


def test_cifar_scenes_boxes_hold_their_images_and_rarely_fall_back(cifar_scenes):
    source, out = cifar_scenes
    with open(f"{out}.json") as f, open(f"{out}_sources.json") as g:
        boxes, sources = json.load(f), json.load(g)
    assert sorted(boxes) == sorted(sources) == [f"{i:05d}.png" for i in range(100)]
    sides = set()
    for name, scene_boxes in boxes.items():
        scene = Image.open(out / name).convert("RGB")
        assert scene.size == (128, 128) and len(scene_boxes) == len(sources[name]) >= 6
        for (x, y, w, h), path in zip(scene_boxes, sources[name]):  # each box's pixels are its image, as pasted
            pasted = Image.open(source / path).convert("RGB").resize((w, h), Image.BILINEAR)
            assert np.array_equal(np.asarray(scene.crop((x, y, x + w, y + h))), np.asarray(pasted)), (name, path)
            sides.add(w)
    assert sides == {20, 24, 28, 32}
    dataset = common.build_scene_dataset(str(out), boxes_file=f"{out}.json")
    assert fallback_rate(dataset) <= 0.2


def test_box_filter_size_aspect_overlap_and_clipping():
    boxes = [[0, 0, 30, 30],      # kept
             [2, 2, 30, 30],      # IoU with the first ~0.77 > 0.5: dropped
             [50, 0, 5, 40],      # side 5 < min 8: dropped
             [0, 50, 40, 10],     # aspect 4 > 3: dropped
             [60, 60, 90, 20],    # clipped to 40 x 20 (the image is 100 px): kept
             [40, 40, 20, 20]]    # IoU with the clipped box small: kept
    kept = univip.filter_boxes(boxes, 100, 100, 8.0)
    np.testing.assert_allclose(kept, [[0, 0, 30, 30], [60, 60, 40, 20], [40, 40, 20, 20]])
    assert univip.filter_boxes(np.zeros((0, 4)), 100, 100, 8.0).shape == (0, 4)


def test_instances_are_cut_from_the_original_image_at_their_boxes():
    """White boxes on black: every real instance crop is white, whatever the windows and flips."""
    image = Image.new("RGB", (120, 120))
    draw = ImageDraw.Draw(image)
    boxes = [[5, 5, 30, 25], [70, 10, 40, 30], [10, 70, 25, 35], [60, 65, 45, 45], [45, 40, 20, 20]]
    for x, y, w, h in boxes:
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=(255, 255, 255))
    aug = univip.SceneInstanceAugmentation(48, 16, 4, 8.0, (0.08, 1.0))  # the worker's half: no colour yet
    torch.manual_seed(0)
    random.seed(0)
    real = 0
    for _ in range(40):
        (s1, _), (s2, _), (online, _), (target, _), fell_back = aug(image, np.array(boxes, np.float32))
        assert s1.shape == s2.shape == (3, 48, 48) and online.shape == target.shape == (4, 3, 16, 16)
        if not fell_back:
            real += 1
            assert online.float().mean() > 0.97 * 255 and target.float().mean() > 0.97 * 255
    assert real > 0


def test_crops_are_orls_crop_then_resize_bilinear_and_the_blur_follows_orl(monkeypatch):
    """ORL's choices where the paper is silent: scene and instance crops as its TF.resized_crop (the integer box cut
    out, then resized bilinear; a sub-pixel box rounded); sigma 0.1 to 2 px on every crop, the instances too (not
    scaled with their size); no blur on small scenes (the CIFAR stem, as solo-learn)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 100, 3), dtype=np.uint8))
    box, window = (10.4, 19.6, 36.8, 29.3), (5, 8, 70, 60)  # the box rounds to x 10..47, y 20..49
    monkeypatch.setattr(univip, "sample_scene_pair", lambda *a, **k: (window, window, np.array([box] * 2), False))
    aug = univip.SceneInstanceAugmentation(48, 24, 2, 8.0, (0.08, 1.0))
    aug.flip = lambda crop: crop
    (scene, _), _, (online, _), _, _ = aug(image, np.array([box]))
    for got, size, (x, y, w, h), (top, left, height, width) in ((online[0], 24, box, (20, 10, 29, 37)),
                                                                (scene, 48, window, (8, 5, 60, 70))):
        orl = lambda mode: v2.functional.pil_to_tensor(v2.functional.resized_crop(image, top, left, height, width,
                                                                                   [size, size], mode))
        assert torch.equal(got, orl(v2.InterpolationMode.BILINEAR))
        assert not torch.equal(got, orl(v2.InterpolationMode.BICUBIC))
        in_box = v2.functional.pil_to_tensor(image.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h)))
        ring = (got.float() - in_box.float()).abs()  # resize(box=...) reads pixels outside the box at the edges
        print(f"{size} px: |crop-then-resize - resize(box=)| mean {ring.mean():.2f}, max {ring.max():.0f} levels")
        assert ring.max() > 0
    assert [c.blur_p for c in aug.colours] == [1.0, 0.1] and all(c.sigma == (0.1, 2.0) for c in aug.colours)
    small = univip.SceneInstanceAugmentation(64, 32, 2, 8.0, (0.08, 1.0), small=True)
    assert [c.blur_p for c in small.colours] == [0.0] * 2


def test_projector_and_predictor_are_orls_without_last_bias_and_with_kaiming_init():
    """ORL's init_weights(init_linear='kaiming'): every Linear kaiming normal (fan_in, std sqrt(2 / fan_in)), bias 0."""
    torch.manual_seed(0)
    backbone, dim = common.build_backbone("resnet_tiny", True, 32)
    model = univip.UniVIP(backbone, dim, num_instances=2, hidden_dim=512, proj_dim=64)
    for head in (model.projector, model.predictor, model.momentum_projector):
        assert head[0].bias is not None and head[-1].bias is None and head[-1].out_features == 64
        assert torch.equal(head[0].bias, torch.zeros(512))
        for layer in (head[0], head[-1]):
            expected = math.sqrt(2 / layer.in_features)
            print(f"{layer.in_features} -> {layer.out_features}: std {layer.weight.std().item():.4g}, "
                  f"sqrt(2 / fan_in) {expected:.4g}")
            assert abs(layer.weight.std().item() / expected - 1) < 0.1 and abs(layer.weight.mean()) < 0.1 * expected


# ----------------------------------------------------------------------------------------------
# Sinkhorn and the losses
# ----------------------------------------------------------------------------------------------
def test_sinkhorn_marginals_and_near_identity_plan():
    torch.manual_seed(0)
    o, t, scene = torch.randn(64, 4, 256), torch.randn(64, 4, 256), torch.randn(64, 256)
    t[:8] = o[:8] + 0.1 * torch.randn(8, 4, 256)  # some images with matching instances
    cost = 1 - F.cosine_similarity(o.unsqueeze(2), t.unsqueeze(1), dim=-1)
    b, a = univip.transport_marginal(o, scene), univip.transport_marginal(t, -scene)
    plan = univip.sinkhorn_plan(cost, b, a, eps=0.1, iters=50)
    assert (plan >= 0).all()
    assert torch.allclose(plan.sum(2), b, atol=1e-3) and torch.allclose(plan.sum(1), a, atol=1e-3)
    # S close to the identity, uniform marginals: the plan is close to the diagonal
    similarity = torch.eye(5) * 0.9 + 0.05 + 0.02 * torch.rand(5, 5)
    uniform = torch.full((5,), 0.2)
    plan = univip.sinkhorn_plan(1 - similarity, uniform, uniform)
    assert plan.diagonal().sum() > 0.99 and torch.allclose(plan.diagonal(), uniform, atol=2e-3)


def test_sinkhorn_equals_the_classic_scaling_iterations():
    torch.manual_seed(1)
    cost = torch.rand(3, 4, 4)
    b, a = torch.softmax(torch.randn(3, 4), 1), torch.softmax(torch.randn(3, 4), 1)
    reference = classic_sinkhorn(cost, b, a, eps=0.5, iters=200)
    plan = univip.sinkhorn_plan(cost, b, a, eps=0.5, iters=200)
    torch.testing.assert_close(plan.double(), reference, atol=1e-5, rtol=1e-4)


def test_transport_marginal_relu_normalised_uniform_if_all_zero():
    scene = torch.tensor([[1.0, 0.0]])
    instances = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]])  # cos 1, 1/sqrt2, -1 -> relu 0
    expected = torch.tensor([[1.0, 2 ** -0.5, 0.0]]) / (1 + 2 ** -0.5)
    torch.testing.assert_close(univip.transport_marginal(instances, scene), expected)
    torch.testing.assert_close(univip.transport_marginal(-instances[:, [0, 0]], scene), torch.full((1, 2), 0.5))


def test_each_loss_term_equals_a_hand_computed_value():
    # one image, K = 2, D = 2: scenes all (1, 1); instances o = t = the two unit axes
    p = z = torch.tensor([[1.0, 1.0]])
    o = t = torch.eye(2).unsqueeze(0)
    agg = torch.tensor([[1.0, 0.0]])
    out = univip.univip_loss((p, p), (z, z), o, t, agg, eps=0.1, iters=50)
    # L_ss = d(p1, z2) + d(p2, z1) = 0;  L_si = 2 d((1, 0), (1, 1)) = 2 (2 - sqrt 2)
    assert abs(out["loss_ss"].item()) < 1e-6
    assert abs(out["loss_si"].item() - 2 * (2 - math.sqrt(2))) < 1e-5
    # marginals uniform (both cosines 1/sqrt 2); cost [[0, 1], [1, 0]] -> Y = 0.5 [[1, e], [e, 1]] / (1 + e)
    # with e = exp(-1 / 0.1); d(o, t) = [[0, 2], [2, 0]] -> L_ii = 2 e / (1 + e)
    e = math.exp(-10)
    assert abs(out["loss_ii"].item() - 2 * e / (1 + e)) < 1e-7
    assert abs(out["loss"].item() - (out["loss_ss"] + out["loss_si"] + out["loss_ii"]).item()) < 1e-6
    # a second image with the target instances swapped: OT moves the plan off the diagonal, so L_ii is
    # again 2 e / (1 + e) (a fixed diagonal pairing would give 4); the batch loss is the mean over images
    out2 = univip.univip_loss((p.repeat(2, 1),) * 2, (z.repeat(2, 1),) * 2, torch.cat([o, o]),
                              torch.cat([t, t.flip(1)]), agg.repeat(2, 1), eps=0.1, iters=50)
    assert abs(out2["loss_ii"].item() - 0.5 * (2 * e / (1 + e) + 2 * e / (1 + e))) < 1e-6  # OT finds the swap
    # only the terms that were asked for
    assert set(univip.univip_loss((p, p), (z, z), losses=("ss",))) == {"loss_ss", "loss"}


def test_identical_online_and_target_outputs_give_zero_loss():
    torch.manual_seed(0)
    scenes = torch.randn(8, 16)
    instances = torch.linalg.qr(torch.randn(8, 16, 4)).Q.transpose(1, 2)  # K = 4 orthonormal instances
    out = univip.univip_loss(scenes.chunk(2), scenes.chunk(2)[::-1], instances[:4], instances[:4],
                             losses=("ss", "ii"))
    assert out["loss_ss"].abs() < 1e-6 and out["loss_ii"] < 1e-3
    out = univip.univip_loss((scenes[:4], scenes[:4]), (scenes[:4], scenes[:4]), aggregate=scenes[:4] * 2,
                             losses=("ss", "si"))
    assert out["loss_ss"].abs() < 1e-6 and out["loss_si"].abs() < 1e-6


def test_batch_loss_is_the_mean_of_per_image_losses():
    """No cross-image term: N processes with batch B give the loss of one process with batch N*B."""
    torch.manual_seed(0)
    p, z, agg = torch.randn(2, 6, 32), torch.randn(2, 6, 32), torch.randn(6, 32)
    o, t = torch.randn(6, 4, 32), torch.randn(6, 4, 32)
    full = univip.univip_loss(p, z, o, t, agg)
    halves = [univip.univip_loss(p[:, s], z[:, s], o[s], t[s], agg[s]) for s in (slice(0, 3), slice(3, 6))]
    for key in full:
        torch.testing.assert_close(full[key], (halves[0][key] + halves[1][key]) / 2)


def test_ii_gradient_flows_through_the_distances_only():
    torch.manual_seed(0)
    p = [torch.randn(2, 8) for _ in range(2)]
    z = [torch.randn(2, 8) for _ in range(2)]
    o, t = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 3, 8, requires_grad=True)
    univip.univip_loss(p, z, o, t, losses=("ii",))["loss"].backward()
    assert t.grad is None  # the target side never gets a gradient
    with torch.no_grad():  # the same loss with the plan as a constant
        b, a = univip.transport_marginal(o, z[0] + z[1]), univip.transport_marginal(t, p[0] + p[1])
        plan = univip.sinkhorn_plan(1 - F.cosine_similarity(o.unsqueeze(2), t.unsqueeze(1), dim=-1), b, a)
    o2 = o.detach().clone().requires_grad_(True)
    ((plan * univip.distance(o2.unsqueeze(2), t.detach().unsqueeze(1))).sum((1, 2)).mean()).backward()
    torch.testing.assert_close(o.grad, o2.grad)


def test_training_step_updates_online_only_and_target_follows_by_momentum():
    torch.manual_seed(0)
    backbone, dim = common.build_backbone("resnet_tiny", True, 32)
    model = univip.UniVIP(backbone, dim, num_instances=2, hidden_dim=32, proj_dim=16)
    momentum, online = model.momentum_pairs()
    assert len(momentum) == len(online) > 0 and all(m is not o for m, o in zip(momentum, online))
    assert all(m.shape == o.shape for m, o in zip(momentum, online))
    target_before = [p.detach().clone() for p in momentum]
    optimizer = torch.optim.SGD(common.param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    out = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(8, 3, 16, 16),
                torch.randn(8, 3, 16, 16))
    assert set(out) == {"loss_ss", "loss_si", "loss_ii", "loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in momentum)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # aggregator included
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(target_before, momentum))
    common.momentum_update(momentum, online, 0.99)
    for before, tp, op in zip(target_before, momentum, online):
        torch.testing.assert_close(tp, 0.99 * before + 0.01 * op.detach())
    assert univip.UniVIP(backbone, dim, losses=("ss",)).aggregator is None  # BYOL: no unused parameters


def reference_step(model, view1, view2, online_crops, target_crops, per_view=True):
    """One UniVIP step written out from the model's submodules as a BYOL-based reference computes it: each
    view through each network in a call of its own (per_view=False: both scene views in one call, as this
    project did before), and the three terms as the paper's Eq. 1 - 5 with d = 2 - 2 cos. Returns the loss."""
    def online(x):
        return model.predictor(model.projector(model.backbone(x)))

    def target(x):
        with torch.no_grad():
            return model.momentum_projector(model.momentum_backbone(x))

    def d(a, b):
        return 2 - 2 * F.cosine_similarity(a, b, dim=-1)

    def mass(x, scene):  # relu(cos), normalised to sum 1 (uniform if all zero)
        w = F.relu(F.cosine_similarity(x, scene.unsqueeze(1), dim=-1))
        return torch.where(w.sum(1, keepdim=True) > 0, w / w.sum(1, keepdim=True), 1 / w.shape[1])

    if per_view:
        (p1, p2), (z1, z2) = (online(view1), online(view2)), (target(view1), target(view2))
    else:
        p1, p2 = online(torch.cat([view1, view2])).chunk(2)
        z1, z2 = target(torch.cat([view1, view2])).chunk(2)
    o = online(online_crops).unflatten(0, (len(view1), -1))  # (B, K, D)
    t = target(target_crops).unflatten(0, (len(view1), -1))
    aggregate = model.aggregator(o.flatten(1))
    with torch.no_grad():
        cost = 1 - F.cosine_similarity(o.unsqueeze(2), t.unsqueeze(1), dim=-1)
        plan = classic_sinkhorn(cost, mass(o, (z1 + z2) / 2), mass(t, (p1 + p2) / 2), model.eps, model.iters)
    l_ss = d(p1, z2) + d(p2, z1)
    l_si = d(aggregate, z1) + d(aggregate, z2)
    l_ii = (plan.float() * d(o.unsqueeze(2), t.unsqueeze(1))).sum((1, 2))
    return (l_ss + l_si + l_ii).mean()


def test_training_step_equals_the_per_view_reference_and_not_the_concatenated_call():
    """Loss, every gradient and every batch-norm buffer of the module's step equal a step computed by hand
    the BYOL way (fp32, CPU, 1e-5 relative); the old call on both scene views together differs."""
    torch.manual_seed(0)
    backbone, dim = common.build_backbone("resnet_tiny", True, 32)
    model = univip.UniVIP(backbone, dim, num_instances=2, hidden_dim=64, proj_dim=16)
    views = [torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32), torch.randn(12, 3, 16, 16),
             torch.randn(12, 3, 16, 16)]
    results = []
    for step in ("module", "per_view", "concatenated"):
        clone = copy.deepcopy(model)
        loss = clone(*views)["loss"] if step == "module" else reference_step(clone, *views, step == "per_view")
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in clone.named_parameters() if p.requires_grad},
                        dict(clone.named_buffers())))
    (loss, grads, buffers), (ref_loss, ref_grads, ref_buffers), (cat_loss, cat_grads, _) = results

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()
    assert rel(loss, ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) > 20 and all(g is not None for g in grads.values())
    # biases in front of a BatchNorm have a gradient of 0 up to float noise (the BN cancels them): checked
    # as such; every other gradient within 1e-5 relative
    full = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    zero = {n for n, g in ref_grads.items() if g.norm() < 1e-6 * full}
    assert zero <= {"projector.0.bias", "predictor.0.bias"}
    assert all(grads[n].norm() < 1e-6 * full for n in zero)
    worst = max(rel(grads[n], ref_grads[n]) for n in grads if n not in zero)
    assert worst < 1e-5, worst
    assert all(rel(buffers[n], ref_buffers[n]) < 1e-5 for n in buffers if buffers[n].is_floating_point())
    # the test can fail: one call on both scene views gives another loss and other gradients
    assert rel(cat_loss, ref_loss) > 1e-4
    assert max(rel(cat_grads[n], ref_grads[n]) for n in grads if n not in zero) > 1e-2


# ----------------------------------------------------------------------------------------------
# Data sources
# ----------------------------------------------------------------------------------------------
def test_coco_annotations_feed_the_sampler(tmp_path):
    os.makedirs(tmp_path / "train2017")
    os.makedirs(tmp_path / "annotations")
    images, annotations = [], []
    for i in range(3):
        Image.new("RGB", (160, 120), (40 * i, 80, 120)).save(tmp_path / "train2017" / f"{i:012d}.jpg")
        images.append({"id": i + 1, "file_name": f"{i:012d}.jpg", "width": 160, "height": 120})
    annotations += [{"id": 1, "image_id": 1, "bbox": [10, 10, 40, 30], "iscrowd": 0},
                    {"id": 2, "image_id": 1, "bbox": [0, 0, 160, 120], "iscrowd": 1},
                    {"id": 3, "image_id": 2, "bbox": [50, 40, 60, 50], "iscrowd": 0}]  # image 3: no boxes
    with open(tmp_path / "annotations" / "instances_train2017.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": []}, f)
    data = common.build_scene_dataset("coco", str(tmp_path))
    assert len(data) == 3 and data[0][1].shape == (1, 4) and data[2][1].shape == (0, 4)
    aug = univip.SceneInstanceAugmentation(64, 32, 4, 16.0, (0.08, 1.0))
    *views, fell_back = univip.collate_scene_pairs([aug(*data[i]) for i in range(3)])
    views = aug.on_device(*views, torch.device("cpu"))
    assert views[0].shape == views[1].shape == (3, 3, 64, 64) and views[2].shape == views[3].shape == (12, 3, 32, 32)
    assert all(v.dtype == torch.float32 for v in views)
    assert fell_back.dtype == torch.bool and fell_back.all()  # never K boxes here: always the fallback


def test_recipe_sizes_come_from_the_dataset_and_the_flags_override_them(tmp_path):
    """A folder of 320 x 240 photos whose first file is 400 x 100: the paper's sizes, not small-scene ones
    (the first file alone would say 100 px); the 96 px synthetic scenes get the small sizes. The lr and
    warmup defaults: the paper's 0.4 per 512 images (resnet_tiny 3.2), 4 warmup epochs, at most epochs / 5."""
    sizes = [(400, 100)] + [(320, 240)] * 6
    for i, size in enumerate(sizes):
        Image.new("RGB", size).save(tmp_path / f"{i}.jpg")
    with open(tmp_path / "boxes.json", "w") as f:
        json.dump({f"{i}.jpg": [] for i in range(len(sizes))}, f)
    folder = common.build_scene_dataset(str(tmp_path), None, str(tmp_path / "boxes.json"))
    synthetic = common.build_scene_dataset("synthetic")
    parser = univip.get_args_parser()
    for data, flags, expected in [(folder, [], (224, 96, 64.0)), (synthetic, [], (64, 32, 8.0)),
                                  (folder, ["--scene-size", "160", "--instance-size", "64", "--min-box", "20"],
                                   (160, 64, 20.0))]:
        args = parser.parse_args(flags)
        small, recipe, _ = univip.resolve_recipe(args, common.native_image_size(data))
        assert (args.scene_size, args.instance_size, args.min_box) == expected
        assert small == (args.instance_size <= 64) and f"scene {expected[0]} px" in recipe["crops"]
    for flags, lr, warmup in [([], 3.2, 0.8), (["--arch", "resnet50", "--epochs", "100"], 0.4, 4.0),
                              (["--lr", "0.6", "--warmup-epochs", "10", "--batch-size", "4096"], 0.6, 10.0)]:
        args = parser.parse_args(flags)
        _, recipe, _ = univip.resolve_recipe(args, 96)
        assert (args.lr, args.warmup_epochs) == (lr, warmup)
        assert recipe["lr"].startswith(f"{lr * args.batch_size / 512:.4g} ({lr} x {args.batch_size}/512")


def mmcv_cosine_by_epoch(base, epochs, iters_per_epoch, warmup_epochs, ratio=1e-4):
    """mmcv's CosineAnnealingLrUpdaterHook(min_lr=0, warmup='linear', warmup_by_epoch=True) as ORL's runner calls it:
    before each epoch the regular lr annealing_cos(base, 0, epoch / epochs) is set; before each iteration (global
    index i) the warmup lr replaces it while i < the warmup iterations, and i == them sets the regular lr again."""
    lrs, warmup_iters, lr = [], warmup_epochs * iters_per_epoch, None
    for epoch in range(epochs):
        regular = 0.0 + 0.5 * (base - 0.0) * (math.cos(math.pi * epoch / epochs) + 1)  # before_train_epoch
        lr = regular
        for i in range(epoch * iters_per_epoch, (epoch + 1) * iters_per_epoch):  # before_train_iter
            if i == warmup_iters:
                lr = regular
            elif i < warmup_iters:
                lr = regular * (1 - (1 - i / warmup_iters) * (1 - ratio))
            lrs.append(lr)
    return lrs


@pytest.mark.parametrize("epochs, per_epoch, warmup", [(800, 3, 4.0), (10, 7, 2.0), (5, 4, 1.5), (3, 2, 0.0),
                                                     (5, 3, 1.5)])  # the last: the warmup ends between steps 4 and 5
def test_lr_is_orls_stage3_schedule_step_for_step(epochs, per_epoch, warmup):
    base = 0.4
    got, ref = univip.orl_lr_schedule(base, epochs, per_epoch, warmup), mmcv_cosine_by_epoch(base, epochs, per_epoch,
                                                                                              warmup)
    assert len(got) == len(ref) == epochs * per_epoch
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)
    end = math.ceil(warmup * per_epoch)  # the first step past the warmup
    if end != warmup * per_epoch:  # mmcv keeps the last warmup lr until the epoch ends
        assert got[end] == got[end - 1] < 0.5 * base * (1 + math.cos(math.pi * (end // per_epoch) / epochs))
        end = (end // per_epoch + 1) * per_epoch
    print(f"{epochs} epochs x {per_epoch}, warmup {warmup}: first {got[0]:.6g}, warmup end {got[end]:.6g}, "
          f"last {got[-1]:.6g}")
    assert got[0] == pytest.approx(base * (1e-4 if warmup else 1), rel=1e-12)
    assert got[end] == pytest.approx(0.5 * base * (1 + math.cos(math.pi * (end // per_epoch) / epochs)), rel=1e-12)
    assert got[-1] == pytest.approx(0.5 * base * (1 + math.cos(math.pi * (epochs - 1) / epochs)), rel=1e-12)
    assert got[-1] > 0 and all(got[i] == got[i - 1] for i in range(end + 1, len(got)) if i % per_epoch)


# ----------------------------------------------------------------------------------------------
# Whole runs
# ----------------------------------------------------------------------------------------------
def test_demo_path_and_eval_linear(tmp_path):
    out = tmp_path / "demo"
    result = run_script("univip.py", "--epochs", "1", "--subset", "256", "--batch-size", "32", "--workers", "1",
                        "--eval-every", "1", "--eval-subset", "500", "--out", out)
    header, init, epoch = read_log(out)
    assert header["args"]["losses"] == "ss,si,ii" and header["args"]["scene_size"] == 64
    assert init["epoch"] == 0 and 0 <= init["knn_top1"] <= 100
    assert epoch["epoch"] == 1 and 0 <= epoch["fallback_rate"] <= 0.2 and epoch["images_per_s"] > 0  # the scenes
    for key in ("loss", "loss_ss", "loss_si", "loss_ii", "lr", "ema", "knn_top1", "knn_top5", "peak_mem_mb"):
        assert math.isfinite(epoch[key]), key
    assert abs(epoch["loss"] - epoch["loss_ss"] - epoch["loss_si"] - epoch["loss_ii"]) < 1e-4
    assert epoch["ema"] == 1.0 and header["recipe"]["ema"] == "0.99 -> 1 (cosine)"  # tau's last step: 1
    assert f"random-init backbone: kNN top-1 {init['knn_top1']:.1f}% on synthetic" in result.stdout
    assert (f"kNN top-1 on synthetic: {epoch['knn_top1']:.1f}% after training vs {init['knn_top1']:.1f}% at "
            "random init") in result.stdout
    assert "recipe: lr 0.2 (3.2 x 32/512, cosine to 0 by epoch)" in result.stdout
    assert "crop sizes: scene 64 px, instance 32 px (images of about 96 px" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1] == univip.DEMO_NOTE  # the last line: what the demo shows
    record = eval_linear.load_backbone(str(out / "backbone.pt"))
    assert record["method"] == "univip" and record["small_images"] and record["img_size"] == 32
    sgd = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["optimizer"]["param_groups"]
    assert len(sgd) == 1 and sgd[0]["weight_decay"] == 1e-4  # ORL's SGD decays every parameter, biases and norms
    if (REPO / "eval_linear.py").exists():
        run_script("eval_linear.py", "--ckpt", out / "backbone.pt", "--data", "synthetic", "--subset", "500")
        with open(out / "eval_synthetic.json") as f:
            assert 0 <= json.load(f)["knn"]["top1"] <= 100
    else:  # eval_linear.py not written yet: the record must rebuild the backbone on its own
        backbone, _ = eval_linear.backbone_from_record(record)
        assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, record["feat_dim"])


def test_knn_monitor_off_on_eval_data_without_labels(tmp_path):
    """--eval-data naming a folder of unlabelled images (no class subfolders, no val/): one line says the
    monitor is off and the run trains to its end (it once ended in a TypeError on the missing kNN result)."""
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 120, 200)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    result = run_script("univip.py", "--eval-data", folder, "--subset", "16", "--epochs", "1", "--batch-size", "8",
                        "--eval-every", "1", "--scene-size", "32", "--instance-size", "16", "--hidden-dim", "64",
                        "--workers", "0", "--out", out, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"kNN monitor off: {folder} has no labelled validation split" in result.stdout
    assert "Traceback" not in result.stderr
    header, epoch = read_log(out)  # no kNN line at init
    assert epoch["epoch"] == 1 and math.isfinite(epoch["loss"]) and "knn_top1" not in epoch


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    run_script("univip.py", "--epochs", "1", *TINY, "--out", out, nproc=2)
    (epoch,) = read_log(out)[1:]
    assert math.isfinite(epoch["loss"]) and 0 <= epoch["fallback_rate"] <= 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and len(ckpt["rng"]) == 2


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted run that the crashed, stopped and resumed ones must equal."""
    out = tmp_path_factory.mktemp("univip") / "straight"
    run_script("univip.py", *LONG_EPOCH, "--out", out)
    return out


def test_exact_resume_after_a_crash(tmp_path, straight_run):
    first = run_killed_after_first_checkpoint("univip.py", *LONG_EPOCH, out=tmp_path / "resumed")
    assert first["epoch"] == 1
    run_script("univip.py", *LONG_EPOCH, "--out", tmp_path / "resumed")
    a, b = (torch.load(out / "checkpoint.pt", weights_only=True) for out in (straight_run, tmp_path / "resumed"))
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 16
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])
    assert [r["epoch"] for r in read_log(tmp_path / "resumed")[1:]] == [1, 2]


def test_sigterm_mid_epoch_saves_and_the_resumed_run_is_bit_equal(tmp_path, straight_run):
    code, stderr = run_signalled_mid_epoch("univip.py", *LONG_EPOCH, out=tmp_path / "stopped")
    assert code == common.EXIT_STOPPED and "stopped by SIGTERM after step" in stderr and "Traceback" not in stderr
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 0 and 3 <= saved["step"] < 8  # inside the first epoch of 8 steps
    assert len(read_log(tmp_path / "stopped")) == 1  # the header: no epoch has ended
    run_script("univip.py", *LONG_EPOCH, "--out", tmp_path / "stopped")
    a, b = (torch.load(out / "checkpoint.pt", weights_only=True) for out in (straight_run, tmp_path / "stopped"))
    assert a["step"] == b["step"] == 16
    assert_same_state(a["model"], b["model"])  # online and target networks, aggregator, BN buffers
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])
    log_a, log_b = read_log(straight_run), read_log(tmp_path / "stopped")
    assert [r["epoch"] for r in log_b[1:]] == [1, 2]  # one line per epoch
    for key in ("loss", "loss_ss", "loss_si", "loss_ii", "fallback_rate"):  # the stopped epoch's sums are whole
        assert [r[key] for r in log_a[1:]] == pytest.approx([r[key] for r in log_b[1:]], rel=1e-6)


def test_real_images_with_a_box_file(tmp_path, cifar10_root):
    """CIFAR-10 images pasted onto larger canvases: the --boxes JSON route of a user's own photos."""
    paths = sorted((cifar10_root / "train").rglob("*.jpg"))[::997][:40]
    folder, table, rng = tmp_path / "scenes", {}, random.Random(0)
    os.makedirs(folder / "a")
    for i in range(8):
        canvas = Image.new("RGB", (128, 112), tuple(rng.randrange(256) for _ in range(3)))
        cells = rng.sample([(x, y) for x in (0, 40, 80) for y in (0, 38, 76)], 5)
        boxes = []
        for j, (x, y) in enumerate(cells):
            canvas.paste(Image.open(paths[(5 * i + j) % len(paths)]).convert("RGB"), (x + 4, y + 2))
            boxes.append([x + 4, y + 2, 32, 32])
        name = f"a/scene{i}.jpg"
        canvas.save(folder / name)
        table[name] = boxes
    with open(tmp_path / "boxes.json", "w") as f:
        json.dump(table, f)
    out = tmp_path / "run"
    run_script("univip.py", "--data", folder, "--boxes", tmp_path / "boxes.json", "--epochs", "2",
               "--batch-size", "4", "--scene-size", "48", "--instance-size", "24", "--hidden-dim", "64",
               "--eval-every", "0", "--workers", "0", "--out", out)
    epochs = read_log(out)[1:]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(math.isfinite(e["loss_ii"]) for e in epochs)
    assert eval_linear.load_backbone(str(out / "backbone.pt"))["args"]["min_box"] == 8.0  # small scenes


@pytest.mark.parametrize("flags, words", [
    (("--losses", "ss,xx"), "--losses"),
    (("--num-instances", "0"), "--num-instances"),
    (("--scene-scale", "0.5", "0.2"), "--scene-scale"),
    (("--boxes", "b.json"), "--boxes"),
])
def test_bad_flags_exit_with_one_sentence_and_no_output(tmp_path, flags, words):
    out = tmp_path / "never"
    result = run_script("univip.py", *flags, "--out", out, check=False)
    assert result.returncode != 0 and words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()


def test_bf16_run_is_close_to_fp32(tmp_path, straight_run):
    assert_bf16_run_close_to_fp32("univip.py", *LONG_EPOCH, out=tmp_path / "bf16", fp32_out=straight_run)
