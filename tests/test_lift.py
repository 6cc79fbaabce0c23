"""Each method lifted out of its script, as its copy kit says: the model, loss and augmentation of the method file in
a plain loop of two steps (torchvision images and backbone, torch's SGD and collate), with no common.TrainingRun and no
common.train_loader; of common only the helpers the kits name (momentum_update, cosine_schedule). Each test checks
that the loss is finite and that the momentum encoder (against the closed-form EMA of the online weights the script's
step reads) or the memory / queue moved exactly as in the script's step: a loop that forgets the update fails."""
import copy
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import default_collate
from torchvision.ops import Conv2dNormActivation

import common
import opera
import rotssl
import trex
import univip

CPU = torch.device("cpu")


def tiny_backbone(width=8):
    """A torchvision conv-BN-ReLU block, pooled: (n, 3, h, w) -> (n, width); BatchNorm as in a ResNet."""
    return nn.Sequential(Conv2dNormActivation(3, width, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten()), width


def images(n, size=32):
    data = torchvision.datasets.FakeData(n, (3, size, size), num_classes=3)
    return [data[i] for i in range(n)]


def sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def clone(tensors):
    return [t.detach().clone() for t in tensors]


def ema(start, onlines, taus):
    """The closed form: x <- tau x + (1 - tau) online, for each (online weights, tau) in turn."""
    expected = clone(start)
    for online, tau in zip(onlines, taus):
        expected = [tau * x + (1 - tau) * o for x, o in zip(expected, online)]
    return expected


def assert_ema(momentum, start, onlines, taus):
    expected = ema(start, onlines, taus)
    for got, want in zip(momentum, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the move is visible: a loop without the update (momentum still at `start`) fails the assertion above
    assert any(not torch.allclose(s, e, rtol=1e-5, atol=1e-6) for s, e in zip(start, expected))


def step(model, optimizer, loss):
    assert torch.isfinite(loss)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("sup_weight", [0.5, 0.0], ids=["opera", "mocov3"])
def test_opera_lifted(sup_weight):
    torch.manual_seed(0)
    backbone, feat_dim = tiny_backbone()
    model = opera.OPERA(backbone, feat_dim, 3 if sup_weight else 0, dim=16, mlp_dim=32, sup_weight=sup_weight)
    augmentation = opera.TwoViewAugmentation(crop_size=32, crop_min=0.5, small=True)
    optimizer, data = sgd(model), [(x, -1 if i % 3 == 0 else y) for i, (x, y) in enumerate(images(8))]  # -1: none
    taus = common.cosine_schedule(0.9, 1.0, 1, 2, endpoint=False)  # main()'s per-step cosine
    momentum, online = model.momentum_pairs()
    start, read = clone(momentum), []
    for i in range(2):
        view1, view2, labels = default_collate([augmentation(x, y) for x, y in data])
        view1, view2 = augmentation.on_device(view1, view2, CPU)
        read.append(clone(online))
        common.momentum_update(momentum, online, taus[i])  # before the forward, from this step's online weights
        losses = model(view1, view2, labels)
        assert (losses["loss_class"] > 0) == (sup_weight > 0)
        step(model, optimizer, losses["loss"])
    assert_ema(momentum, start, read, taus)


def test_trex_lifted():
    torch.manual_seed(0)
    backbone, feat_dim = tiny_backbone()
    model = trex.TReX(backbone, feat_dim, 3, projector_layers=1, hidden_dim=16, bottleneck_dim=8, memory_size=32,
                      ema=0.9)
    augmentation = trex.MultiCropAugmentation(global_size=32, local_size=16, n_local=2, scale_split=0.4, small=True)
    optimizer, data, b = sgd(model), images(8), 8
    momentum = [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    online = [*model.backbone.parameters(), *model.projector.parameters()]
    reference = nn.Sequential(copy.deepcopy(model.momentum_backbone), copy.deepcopy(model.momentum_projector))
    start, read, keys, labels_seen = clone(momentum), [], [], []
    for i in range(3):  # three steps: the first one's gradient is zero (an empty memory: every logit 0)
        crops, labels = default_collate([augmentation(x, y) for x, y in data])
        crops = augmentation.on_device(crops, CPU)
        read.append(clone(online))
        with torch.no_grad():  # the keys the script's step writes: the EMA moved first, then the global crops
            for p, value in zip(reference.parameters(), ema(start, read, [0.9] * len(read))):
                p.copy_(value)
            keys.append(reference(crops[0]))
        labels_seen.append(labels)
        loss = model(crops, labels)  # the whole step's model side: EMA and memory move here, once
        if i == 0:  # an empty memory: every prototype zero, the loss ln(C) (detail 4)
            assert loss.item() == pytest.approx(math.log(3), abs=1e-6)
        step(model, optimizer, loss)
    assert_ema(momentum, start, read, [0.9] * 3)
    memory = model.memory
    torch.testing.assert_close(memory.features[:3 * b], torch.cat(keys), rtol=1e-5, atol=1e-6)
    assert torch.equal(memory.labels[:3 * b], torch.cat(labels_seen)) and (memory.labels[3 * b:] == -1).all()
    assert memory.ptr.item() == 3 * b
    state = clone([*momentum, *memory.buffers()])
    model.eval()
    model.predict(crops[0])  # evaluation: no state moves
    assert all(torch.equal(a, c) for a, c in zip(state, [*momentum, *memory.buffers()]))


def test_rotssl_swav_lifted():
    torch.manual_seed(0)
    backbone, feat_dim = tiny_backbone()
    model = rotssl.RotSSL(backbone, feat_dim, "swav", rot_weight=0.1, n_prototypes=10, queue_length=16)
    augmentation = rotssl.Augmentation("swav", 32, 16, n_local=2, rotate=True, small=True)
    optimizer, data, b = sgd(model), images(4), 4
    expected = []
    for i in range(2):
        batch = augmentation.on_device(default_collate([augmentation(x) for x, _ in data]), CPU)
        model.normalize_prototypes()  # the loop's duty, before each forward
        with torch.no_grad():  # the global crops' z the script's step writes to the queue
            ref = copy.deepcopy(model)
            features = [ref.backbone(torch.cat(batch["global"])), ref.backbone(torch.cat(batch["local"]))]
            expected.insert(0, F.normalize(ref.projector(torch.cat(features)), dim=1)[:2 * b].view(2, b, -1))
        losses = model(batch, fill_queue=True, use_queue=False)  # fill from the first step, as --epoch-queue-starts 0
        assert torch.isfinite(losses["loss_rot"]) and losses["loss_rot"] > 0
        assert torch.isfinite(losses["loss"])
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        model.prototypes.weight.grad = None  # frozen prototypes (--freeze-prototypes-iters)
        optimizer.step()
    torch.testing.assert_close(model.queue[:, :2 * b], torch.cat(expected, 1), rtol=1e-5, atol=1e-6)
    assert (model.queue[:, 2 * b:] == 0).all()


@pytest.mark.parametrize("name", ["byol", "univip"])
def test_byol_target_lifted(name):
    """BYOL + rotation and UniVIP: the target moves after each optimizer step, from the weights just stepped."""
    torch.manual_seed(0)
    random.seed(0)  # UniVIP's windows and fallback boxes
    backbone, feat_dim = tiny_backbone()
    if name == "byol":
        model = rotssl.RotSSL(backbone, feat_dim, "byol", rot_weight=0.1)
        augmentation = rotssl.Augmentation("byol", 32, 16, n_local=0, rotate=True, small=True)
        batches = lambda: [augmentation.on_device(default_collate([augmentation(x) for x, _ in images(4)]), CPU)]
    else:
        model = univip.UniVIP(backbone, feat_dim, num_instances=2, hidden_dim=32, proj_dim=16)
        augmentation = univip.SceneInstanceAugmentation(32, 16, num_instances=2, min_box=8, scale=(0.2, 1.0),
                                                        small=True)
        boxes = [[0, 0, 30, 30], [34, 34, 30, 30], [10, 30, 24, 20]]
        batches = lambda: augmentation.on_device(
            *univip.collate_scene_pairs([augmentation(x, boxes) for x, _ in images(4, 64)])[:4], CPU)
    optimizer = sgd(model)
    taus = common.cosine_schedule(0.9, 1.0, 4, 2)  # main()'s tau, from --ema to 1
    momentum, online = model.momentum_pairs()
    start, read = clone(momentum), []
    for i in range(2):
        losses = model(*batches())
        step(model, optimizer, losses["loss"])
        read.append(clone(online))
        common.momentum_update(momentum, online, taus[i])  # after the optimizer step (BYOL's order)
    assert_ema(momentum, start, read, taus)
