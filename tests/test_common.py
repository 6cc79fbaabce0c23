"""common.py: backbones, synthetic data, loaders, checkpoint record, LARS, schedules, kNN."""
import argparse
import json
import math
import os
import random
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision
from torchvision.transforms import v2

import common
import eval_linear
from conftest import save_backbone


def test_resnet_tiny_is_small_and_maps_images_to_features():
    model, dim = common.build_backbone("resnet_tiny", small_images=True, img_size=32)
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 1_000_000
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, dim) == (4, 128)
    assert isinstance(model.maxpool, nn.Identity) and model.conv1.kernel_size == (3, 3)
    big, _ = common.build_backbone("resnet_tiny", small_images=False)
    assert big.conv1.kernel_size == (7, 7) and big(torch.randn(2, 3, 64, 64)).shape == (2, 128)


def test_vit_small_runs_on_small_images_and_other_sizes():
    model, dim = common.build_backbone("vit_small", small_images=True, img_size=32)
    assert model.patch_size == 4 and dim == 384  # 8 x 8 tokens on 32 px images
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 384)
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 384)  # local crops: interpolated positions


def test_vit_is_moco_v3s_fixed_sincos_position_embedding_and_initialisation(tmp_path):
    torch.manual_seed(0)
    model, dim = common.build_backbone("vit_small", small_images=False, img_size=224)
    attention = model.encoder.layers[0].self_attention
    assert attention.num_heads == 12 and dim == 384  # MoCo v3's ViT-S: 12 heads of 32
    # the position embedding is a buffer (not trained, not decayed) holding the 2-D sin-cos table
    assert "encoder.pos_embedding" not in dict(model.named_parameters())
    assert "encoder.pos_embedding" in model.state_dict()
    pos, grid, quarter = model.encoder.pos_embedding[0], 14, dim // 4
    assert pos.shape == (1 + grid * grid, dim) and not pos[0].any()  # the class token's row is zero
    for token, (r, c) in [(1, (0, 0)), (2, (0, 1)), (1 + grid, (1, 0)), (1 + 5 * grid + 9, (5, 9))]:
        for i in (0, 7, quarter - 1):
            w = 10000.0 ** (-i / quarter)
            expected = [math.sin(r * w), math.cos(r * w), math.sin(c * w), math.cos(c * w)]
            got = [pos[token, i + j * quarter].item() for j in range(4)]
            assert got == pytest.approx(expected, abs=1e-6), (token, i)
    # MoCo v3's initialisation: q, k, v as three xavier blocks, xavier elsewhere, zero biases
    assert attention.in_proj_weight.std().item() == pytest.approx(math.sqrt(1 / dim), rel=0.02)  # 0.051
    bound = math.sqrt(6 / (3 * 16 * 16 + dim))
    assert model.conv_proj.weight.abs().max().item() <= bound
    assert model.conv_proj.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # 0.042
    fc1 = model.encoder.layers[0].mlp[0]
    assert fc1.weight.std().item() == pytest.approx(math.sqrt(2 / (dim + 4 * dim)), rel=0.02)
    assert not fc1.bias.any() and not attention.in_proj_bias.any() and not attention.out_proj.bias.any()
    assert 0 < model.class_token.std().item() < 1e-5
    # backbone.pt still loads into torchvision's VisionTransformer of the same shape
    save_backbone(tmp_path / "backbone.pt", model, method="test", arch="vit_small", small_images=False,
                  img_size=224, feat_dim=dim, args=argparse.Namespace(x=1), epoch=1)
    record = torch.load(tmp_path / "backbone.pt", map_location="cpu", weights_only=True)
    reference = torchvision.models.VisionTransformer(224, 16, 12, 12, 384, 1536)
    result = reference.load_state_dict(record["state_dict"], strict=False)
    assert sorted(result.missing_keys) == ["heads.head.bias", "heads.head.weight"] and not result.unexpected_keys
    assert torch.equal(reference.encoder.pos_embedding, model.encoder.pos_embedding)
    with torch.no_grad():
        reference.heads = nn.Identity()
        x = torch.randn(2, 3, 224, 224)
        assert torch.allclose(reference(x), model(x), atol=1e-5)


def test_native_image_size_is_decided_by_a_sample_not_the_first_image(tmp_path):
    from PIL import Image
    folder = tmp_path / "photos" / "a"
    folder.mkdir(parents=True)
    Image.new("RGB", (240, 180)).save(folder / "0.jpg")  # the first file is an odd one out
    for i in range(1, 12):
        Image.new("RGB", (500, 375)).save(folder / f"{i}.jpg")
    assert common.native_image_size(common.image_folder(tmp_path / "photos")) == 375
    assert common.native_image_size(common.Synthetic("train", size=20)) == 32
    small = tmp_path / "tiny" / "a"
    small.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (32, 32)).save(small / f"{i}.png")
    assert common.native_image_size(common.image_folder(tmp_path / "tiny")) == 32 <= common.SMALL_IMAGES
    (small / "4.png").write_bytes(b"\x89PNG broken")  # its header cannot be read: one sentence, not a traceback
    with pytest.raises(common.UserError, match=r"^cannot read image .*4\.png \(\w+\); remove or replace the file$"):
        common.native_image_size(common.image_folder(tmp_path / "tiny"))


def test_zero_init_residual_zeroes_the_last_bn_of_every_block():
    model, _ = common.build_backbone("resnet_tiny", True, zero_init_residual=True)
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for b in model.modules()
               if isinstance(b, torchvision.models.resnet.BasicBlock))


def torchvision_model(r):
    """The README's recipe: a plain torchvision ResNet holding a backbone.pt record `r`'s weights, loaded strictly."""
    net = getattr(torchvision.models, r["arch"])()
    net.fc = nn.Identity()
    if r["small_images"]:  # the CIFAR stem: conv1 3x3 stride 1 (padding stem_padding), no max-pool
        net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, r["stem_padding"], bias=False), nn.Identity()
    net.load_state_dict(r["state_dict"])
    return net


@pytest.mark.parametrize("arch,small,padding", [("resnet18", False, 1), ("resnet18", True, 1), ("resnet18", True, 2),
                                                ("resnet50", False, 1)])
def test_backbone_record_loads_strictly_into_torchvision(arch, small, padding, tmp_path):
    model, dim = common.build_backbone(arch, small, 32 if small else 224, stem_padding=padding)
    save_backbone(tmp_path / "backbone.pt", model.eval(), method="test", arch=arch, small_images=small,
                  img_size=32 if small else 224, feat_dim=dim, args=argparse.Namespace(x=1), epoch=3,
                  stem_padding=padding)
    record = torch.load(tmp_path / "backbone.pt", map_location="cpu", weights_only=True)
    assert {"method", "arch", "small_images", "img_size", "mean", "std", "feat_dim", "stem_padding", "state_dict",
            "args", "epoch"} <= record.keys()
    net = torchvision_model(record).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))  # the same stem: the same features
    if not small:  # the ImageNet stem: torchvision's model as it is, missing only fc
        result = getattr(torchvision.models, arch)().load_state_dict(record["state_dict"], strict=False)
        assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    else:  # the CIFAR stem does not fit torchvision's 7x7 conv1: the recipe's replacement is needed
        with pytest.raises(RuntimeError, match="size mismatch for conv1.weight"):
            getattr(torchvision.models, arch)().load_state_dict(record["state_dict"], strict=False)


def test_resnet_tiny_and_vit_records_load_strictly(tmp_path):
    """resnet_tiny is no torchvision builder: build_backbone makes the torchvision ResNet it is; a ViT record loads
    into torchvision's VisionTransformer (its learned position embedding takes the fixed sin-cos table)."""
    for arch in ("resnet_tiny", "vit_small"):
        model, dim = common.build_backbone(arch, True, 32)
        record = common.backbone_record(model.eval(), method="m", arch=arch, small_images=True, img_size=32,
                                        feat_dim=dim, args=argparse.Namespace(), epoch=1)
        if arch == "resnet_tiny":
            net, _ = common.build_backbone(record["arch"], record["small_images"], record["img_size"],
                                           stem_padding=record["stem_padding"])
        else:
            patch = record["state_dict"]["conv_proj.weight"].shape[-1]
            net = torchvision.models.VisionTransformer(record["img_size"], patch, 12, 12, dim, 4 * dim)
            net.heads = nn.Identity()
        net.load_state_dict(record["state_dict"])  # strict
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(net.eval()(x), model(x), atol=1e-5)


def test_state_dict_prefixes_of_ddp_and_compile_are_removed():
    sd = {"module._orig_mod.conv1.weight": torch.ones(1), "module.fc.weight": torch.ones(1)}
    assert list(common.clean_state_dict(sd)) == ["conv1.weight"]


def test_load_backbone_accepts_records_checkpoints_and_bare_state_dicts(tmp_path):
    model, dim = common.build_backbone("resnet_tiny", True)
    fields = dict(method="m", arch="resnet_tiny", small_images=True, img_size=32, feat_dim=dim,
                  args=argparse.Namespace(), epoch=1)
    save_backbone(tmp_path / "backbone.pt", model, **fields)
    record = common.backbone_record(model, **fields)
    common.atomic_save({"model": {}, "backbone": record}, tmp_path / "old_checkpoint.pt")  # earlier layout
    # today's checkpoint.pt: the record without weights, which are the model's entries under the prefix
    weights = {f"net.backbone.{k}": v for k, v in model.state_dict().items()}
    meta = {k: v for k, v in record.items() if k != "state_dict"}
    common.atomic_save({"model": {"net.head.weight": torch.zeros(2), **weights},
                        "backbone": dict(meta, state_dict_prefix="net.backbone.")}, tmp_path / "checkpoint.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    for name in ("backbone.pt", "old_checkpoint.pt", "checkpoint.pt", "bare.pt"):
        rebuilt, _ = eval_linear.backbone_from_record(eval_linear.load_backbone(tmp_path / name, arch="resnet_tiny"))
        assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic writes leave no temporary file


@pytest.mark.parametrize("case", ["missing", "garbage", "wrong_arch", "bare_without_arch", "foreign_dict"])
def test_load_backbone_rejects_bad_files_with_one_sentence(case, tmp_path):
    path = tmp_path / "x.pt"
    model, dim = common.build_backbone("resnet_tiny", True)
    if case == "garbage":
        path.write_text("not a checkpoint")
    elif case == "wrong_arch":
        save_backbone(path, model, method="m", arch="resnet_tiny", small_images=True, img_size=32,
                      feat_dim=dim, args=argparse.Namespace(), epoch=0)
    elif case == "bare_without_arch":
        torch.save(model.state_dict(), path)
    elif case == "foreign_dict":
        torch.save({"hello": 1}, path)
    with pytest.raises(common.UserError) as e:
        eval_linear.load_backbone(path, arch="resnet18" if case == "wrong_arch" else None)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_synthetic_images_are_deterministic_balanced_and_differ():
    ds = common.Synthetic("train")
    a, la = ds[7]
    b, lb = common.Synthetic("train")[7]
    assert np.array_equal(np.asarray(a), np.asarray(b)) and la == lb and a.size == (32, 32)
    assert not np.array_equal(np.asarray(a), np.asarray(ds[17][0]))  # same class, another image
    assert not np.array_equal(np.asarray(a), np.asarray(common.Synthetic("val")[7][0]))
    assert np.bincount([ds[i][1] for i in range(100)]).tolist() == [10] * 10
    assert len(ds) == 10_000 and len(common.Synthetic("val")) == 2_000


def test_synthetic_scenes_boxes_are_the_shapes_bounding_boxes(monkeypatch):
    """Drawn at twice the size (before the downsampling), a scene differs from its background (the texture alone,
    the first draw of the image's generator) inside the boxes only, and each box touches changed pixels on all four
    sides: each box is the bounding box of what was drawn, to the pixel."""
    image, first_boxes = common.Synthetic("train", scenes=True, boxes_only=True)[0]
    assert image.size == (96, 96)
    monkeypatch.setattr(common.Synthetic, "_finish", lambda self, array: array)
    ds, sizes = common.Synthetic("train", scenes=True), []
    for i in range(30):
        drawing, target = ds[i]
        boxes, big = target["boxes"] * 2, drawing.shape[0]
        assert big == 192 and np.array_equal(boxes, boxes.round()) and len(target["labels"]) == len(boxes) >= 4
        changed = (drawing != common._texture(np.random.default_rng([0, 0, i]), big)).any(-1)
        covered = np.zeros_like(changed)
        for x, y, w, h in boxes.astype(int):
            assert x >= 0 and y >= 0 and x + w <= big and y + h <= big
            rows, cols = np.nonzero(changed[y:y + h, x:x + w])
            assert (rows.min(), cols.min(), rows.max(), cols.max()) == (0, 0, h - 1, w - 1)
            covered[y:y + h, x:x + w] = True
            sizes.append(max(w, h) / 2)
        assert changed.any() and not (changed & ~covered).any()
    assert min(sizes) < 14 and max(sizes) > 24  # several sizes (in the 96 px image)
    assert np.array_equal(first_boxes, ds[0][1]["boxes"])  # boxes_only: the same boxes


def test_epoch_sampler_partitions_the_subset_across_ranks_and_reshuffles():
    shards = [list(common.EpochSampler(103, rank, 3, seed=1, subset=50)) for rank in range(3)]
    seen = [i for s in shards for i, _ in s]
    assert len(seen) == len(set(seen)) == 48  # 50 // 3 per rank, no index twice
    subset = set(common.EpochSampler(103, seed=1, subset=50).indices.tolist())
    assert set(seen) <= subset and len(subset) == 50
    s = common.EpochSampler(103, seed=1)
    first = list(s)
    s.set_epoch(1)
    assert first != list(s) and all(e == 1 for _, e in s)
    s.set_epoch(0)
    assert first == list(s)


class _Jitter:
    def __init__(self):
        self.tf = v2.Compose([v2.RandomResizedCrop(16), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])

    def __call__(self, image, label):
        return self.tf(image), label, random.random()


def test_augmentation_depends_only_on_seed_epoch_and_index():
    ds = common.Augmented(common.Synthetic("train"), _Jitter(), seed=3)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, b = ds[(5, 2)], ds[(5, 2)]
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    assert not torch.equal(a[0], ds[(5, 3)][0])  # another epoch, another augmentation
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched


def test_train_loader_gives_the_same_batches_with_and_without_workers():
    ddp = common.init_distributed()
    batches = []
    for workers in (0, 2):
        loader = common.train_loader(common.Synthetic("train"), _Jitter(), 8, ddp, workers, seed=0, subset=32)
        loader.sampler.set_epoch(1)
        state = torch.get_rng_state()
        batches.append([x for x, _, _ in loader])
        assert torch.equal(state, torch.get_rng_state())  # loading never advances the training's RNG
    assert len(batches[0]) == 4 and all(torch.equal(a, b) for a, b in zip(*batches))
    with pytest.raises(common.UserError):
        common.train_loader(common.Synthetic("train"), _Jitter(), 64, ddp, 0, seed=0, subset=32)


def test_lars_matches_a_hand_computed_step():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([2.0])
    opt = common.LARS([{"params": [w], "weight_decay": 0.1},
                       {"params": [b], "weight_decay": 0.1, "lars_exclude": True}], lr=0.5, momentum=0.9,
                      trust_coefficient=0.01)
    opt.step()
    update = torch.tensor([[0.6, 0.8]]) + 0.1 * torch.tensor([[3.0, 4.0]])  # g + wd * w, ||.|| = 1.5
    expected = torch.tensor([[3.0, 4.0]]) - 0.5 * (0.01 * 5.0 / 1.5) * update
    assert torch.allclose(w, expected)
    assert torch.allclose(b, torch.tensor([0.0]))  # excluded: plain momentum SGD, no decay: 1 - 0.5 * 2


def test_clipped_lars_caps_the_layer_rate_at_the_global_one():
    def step(lr, grad):
        w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
        w.grad = torch.tensor(grad)
        common.LARS([w], lr=lr, momentum=0.0, trust_coefficient=0.02, clip=True).step()
        return w.detach()
    # large gradient: eta * ||w|| / (lr * ||g||) = 0.02 * 5 / (1 * 10) < 1, so the step is eta * ||w|| = 0.1 long
    moved = step(1.0, [[6.0, 8.0]])
    assert torch.allclose(moved, torch.tensor([[3.0, 4.0]]) - 0.1 * torch.tensor([[0.6, 0.8]]))
    # small gradient: the ratio exceeds 1 and is clipped, so this is a plain SGD step lr * g
    moved = step(0.5, [[0.006, 0.008]])
    assert torch.allclose(moved, torch.tensor([[3.0, 4.0]]) - 0.5 * torch.tensor([[0.006, 0.008]]))


def test_clipped_lars_at_lr_0_puts_the_unscaled_update_in_the_buffer_as_larc():
    """LARC's min(ratio / lr, 1) is 1 at lr 0 (the first step of a warmup from 0): the buffer takes g + wd w, not
    eta ||w|| / ||g|| times it, and carries it into the next step."""
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    w.grad = torch.tensor([[0.006, 0.008]])  # unclipped: eta ||w|| / ||g + wd w|| = 0.02 * 5 / 0.015 = 6.7
    opt = common.LARS([w], lr=0.0, weight_decay=0.001, momentum=0.9, trust_coefficient=0.02, clip=True)
    opt.step()
    update = torch.tensor([[0.006, 0.008]]) + 0.001 * torch.tensor([[3.0, 4.0]])
    buffer = opt.state[w]["momentum_buffer"]
    print(f"buffer / (g + wd w) at lr 0: {(buffer / update).flatten().tolist()}")
    assert torch.equal(w.detach(), torch.tensor([[3.0, 4.0]])) and torch.allclose(buffer, update)


def test_param_groups_decay_only_weights():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    decay, no_decay = common.param_groups(m, 0.5)
    assert [p.shape for p in decay["params"]] == [(4, 3)] and decay["weight_decay"] == 0.5
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0 and no_decay["lars_exclude"]


def test_cosine_schedule_warms_up_then_decays():
    s = common.cosine_schedule(1.0, 0.1, epochs=4, iters_per_epoch=10, warmup_epochs=1, warmup_start=0.2)
    assert len(s) == 40 and s[0] == pytest.approx(0.2) and s[10] == pytest.approx(1.0)
    assert np.all(np.diff(s[:11]) > 0) and np.all(np.diff(s[10:]) < 0) and s[-1] == pytest.approx(0.1)
    m = common.cosine_schedule(0.99, 1.0, 2, 5)
    assert m[0] == pytest.approx(0.99) and m[-1] == 1.0


def test_momentum_update_is_an_exponential_moving_average():
    target, online = [torch.zeros(3), torch.ones(2)], [torch.ones(3), torch.zeros(2)]
    common.momentum_update(target, online, 0.9)
    assert torch.allclose(target[0], torch.full((3,), 0.1)) and torch.allclose(target[1], torch.full((2,), 0.9))


def test_knn_votes_are_weighted_by_similarity():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7]])
    labels = torch.tensor([0, 0, 1, -1])  # the unlabelled neighbour must not vote
    test = torch.tensor([[1.0, 0.05], [0.1, 1.0]])
    top1, top5 = common.knn_classify(train, labels, test, torch.tensor([0, 1]), num_classes=2, k=3)
    assert top1 == 100.0 and top5 == 100.0
    # k = 3 neighbours: two of class 0 at similarity ~0.2, one of class 1 at 1.0 -> class 1 wins by weight
    test2 = torch.tensor([[0.05, 1.0]])
    top1, _ = common.knn_classify(train, labels, test2, torch.tensor([1]), num_classes=2, k=3, temperature=0.07)
    assert top1 == 100.0


def _extract_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, _ = common.build_backbone("resnet_tiny", True)
    ds = common.Transformed(common.Synthetic("val"), common.eval_transform(32, True), range(7))
    f, y = common.extract_features(model, ds, 2, 0, torch.device("cpu"))
    if rank == 0:
        torch.save((f, y), out)
    common.destroy_process_group()


def test_feature_extraction_over_two_processes_equals_one(tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_extract_worker, args=(2, port, tmp_path / "f.pt"), nprocs=2)
    f2, y2 = torch.load(tmp_path / "f.pt")
    torch.manual_seed(0)
    model, _ = common.build_backbone("resnet_tiny", True)
    ds = common.Transformed(common.Synthetic("val"), common.eval_transform(32, True), range(7))
    f1, y1 = common.extract_features(model, ds, 3, 0, torch.device("cpu"))
    assert torch.equal(y1, y2) and y1.tolist() == [i % 10 for i in range(7)]
    assert torch.allclose(f1, f2, atol=1e-5)


def test_bad_data_paths_raise_one_sentence(tmp_path):
    with pytest.raises(common.UserError, match="does not exist|no such"):
        common.build_dataset(str(tmp_path / "missing"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(common.UserError, match="no images"):
        common.build_dataset(str(tmp_path / "empty"))
    with pytest.raises(common.UserError, match="fp16"):
        common.mixed_precision("fp16", torch.device("cpu"))


def test_unlabelled_folder_gives_label_minus_one(tmp_path):
    for i in range(3):
        common.Synthetic("train")[i][0].save(tmp_path / f"{i}.png")
    ds = common.build_dataset(str(tmp_path))
    assert len(ds) == 3 and ds[0][1] == -1 and common.num_classes_of(ds) == 0
    assert common.build_dataset(str(tmp_path), "val") is None


class _Loader:
    """What TrainingRun needs of a loader (len, iteration, sampler.set_epoch): the sampler's indices as batches,
    each after `seconds` of waiting."""

    def __init__(self, n, seconds=0.0):
        self.sampler, self.seconds = common.EpochSampler(n, seed=1), seconds

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        for index, _ in self.sampler:
            time.sleep(self.seconds)
            yield torch.full((1, 2), index / 10)


def _training_run(out, steps=6, epochs=1, loader_seconds=0.0, **flags):
    """A TrainingRun of a one-layer model on `steps` batches of one image, in `out`, resumed from its checkpoint."""
    args = argparse.Namespace(**{**dict(arch="resnet_tiny", data="synthetic", subset=0, seed=0, batch_size=1,
                                        epochs=epochs, script="test", out=str(out), compile=False, log_every=3,
                                        save_every=0, eval_every=0), **flags})
    ddp = common.init_distributed()
    torch.manual_seed(0)
    random.seed(0)
    model = nn.Sequential(nn.Linear(2, 1))
    autocast, scaler = common.mixed_precision("fp32", ddp.device)
    run = common.TrainingRun(args, ddp, model, torch.optim.SGD(model.parameters(), lr=0.1), scaler, autocast,
                             backbone=model[0], record=dict(method="test", small_images=True, img_size=2, feat_dim=1))
    run.test_loader = _Loader(steps, loader_seconds)
    run.resume()
    return run


def _train(run, nan_at=None, step_seconds=0.0, each_step=lambda step: None):
    """Runs the epochs as a method's main() does; returns [(step, batch index, a draw of torch's and of Python's
    RNG)]. `nan_at`: the step whose logged loss is NaN."""
    seen = []
    train_model = run.distribute()
    run.start()
    for epoch in range(run.start_epoch, run.args.epochs):
        for step, x in run.steps(run.test_loader, epoch):
            each_step(step)
            loss = train_model(x).pow(2).mean()
            run.optimizer.zero_grad()
            loss.backward()
            run.optimizer.step()
            time.sleep(step_seconds)
            run.log({"loss": loss.detach() * math.nan if step == nan_at else loss.detach()})
            seen.append((step, round(10 * x[0, 0].item()), torch.rand(()).item(), random.random()))
        run.end_epoch(epoch)
    run.finish()
    return seen


@pytest.fixture
def signal_handlers():
    """TrainingRun.start installs handlers for SIGTERM and SIGUSR1: put pytest's back afterwards."""
    import signal
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, signal_handlers):
    # checked every --log-every (3) steps: a NaN at step 1 is caught at the check after step 3
    with pytest.raises(common.UserError, match="not finite at or before step 3;"):
        _train(_training_run(tmp_path / "a"), nan_at=1)
    # at an epoch's end also when it is not a multiple of --log-every: 3 steps pass, the check after 5 does not
    with pytest.raises(common.UserError, match="not finite at or before step 5;"):
        _train(_training_run(tmp_path / "b", steps=5), nan_at=4)
    assert len(_train(_training_run(tmp_path / "c", steps=5))) == 5  # finite losses: no error


def test_subset_defaults_to_the_demo_size_on_synthetic_data_only():
    parser = argparse.ArgumentParser()
    common.add_common_args(parser, "m", epochs=1, batch_size=8, lr=0.1, wd=0.0, warmup_epochs=0, demo_subset=300)
    resolved = []
    for argv in ([], ["--data", "cifar10"], ["--subset", "0"], ["--data", "cifar10", "--subset", "50"]):
        args = parser.parse_args(argv)
        common.check_common_args(args, world_size=1)
        resolved.append(args.subset)
    assert resolved == [300, 0, 0, 50]  # an explicit --subset always wins; 0 = every image


def test_compile_on_a_torch_that_cannot_compile_here_is_refused_in_one_sentence(monkeypatch):
    import torch._dynamo
    parser = argparse.ArgumentParser()
    common.add_common_args(parser, "m", epochs=1, batch_size=8, lr=0.1, wd=0.0, warmup_epochs=0)
    args = parser.parse_args(["--compile"])
    def unsupported():  # what torch 2.2 says on Python 3.12
        raise RuntimeError("Python 3.12+ not yet supported for torch.compile")
    monkeypatch.setattr(torch._dynamo.eval_frame, "check_if_dynamo_supported", unsupported)
    with pytest.raises(common.UserError, match=r"^--compile is not available here: Python 3\.12\+ not yet supported"):
        common.check_common_args(args, world_size=1)


def test_resume_refuses_a_checkpoint_of_other_options(tmp_path):
    saved = argparse.Namespace(arch="resnet_tiny", data="synthetic", subset=300, seed=0, batch_size=8, epochs=2, tau=0.1,
                               script="trex")
    common.atomic_save({"args": common.plain_args(saved), "epoch": 1}, str(tmp_path / "checkpoint.pt"))
    assert common.load_checkpoint(str(tmp_path), saved)["epoch"] == 1  # the same run resumes
    assert common.load_checkpoint(str(tmp_path / "elsewhere"), saved) is None  # no checkpoint: a fresh run
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "log.jsonl").write_text('{"args": {}}\n')  # killed before its first checkpoint
    assert common.load_checkpoint(str(tmp_path / "elsewhere"), saved) is None
    assert not (tmp_path / "elsewhere" / "log.jsonl").exists()  # the fresh run writes one header, not two
    for key, value in (("subset", 0), ("seed", 1), ("tau", 0.2)):  # a common key, and the method's own
        other = argparse.Namespace(**{**vars(saved), key: value})
        with pytest.raises(common.UserError, match=f"--{key} "):
            common.load_checkpoint(str(tmp_path), other)


def test_resume_refuses_another_methods_checkpoint_and_tidies_the_output_folder(tmp_path):
    args = argparse.Namespace(arch="resnet_tiny", data="synthetic", subset=0, seed=0, batch_size=8, epochs=3,
                              script="rotssl")
    common.atomic_save({"args": common.plain_args(args), "epoch": 1, "step": 5}, str(tmp_path / "checkpoint.pt"))
    for stale in ("checkpoint.pt.tmp123", "backbone.pt.tmp4"):  # left by saves that a kill interrupted
        (tmp_path / stale).write_bytes(b"x" * 100)
    (tmp_path / "notes.tmp1").write_text("the user's")
    lines = [{"args": {}}, {"epoch": 0, "knn_top1": 10.0}, {"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert common.load_checkpoint(str(tmp_path), args)["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "log.jsonl", "notes.tmp1"]
    # epoch 2 was logged but its checkpoint was never written: its line goes, the run will log it again
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == lines[:3]
    for script in ("opera", "univip", "trex"):
        with pytest.raises(common.UserError, match="checkpoint of rotssl, not of " + script):
            common.load_checkpoint(str(tmp_path), argparse.Namespace(**{**vars(args), "script": script}))
    # a checkpoint that does not say which method wrote it: refused, not guessed
    old = {"args": {k: v for k, v in common.plain_args(args).items() if k != "script"}, "epoch": 1, "step": 5}
    common.atomic_save(old, str(tmp_path / "checkpoint.pt"))
    with pytest.raises(common.UserError, match="does not say which method"):
        common.load_checkpoint(str(tmp_path), args)


def test_the_sampler_skip_resumes_inside_an_epoch():
    sampler = common.EpochSampler(50, rank=1, world_size=2, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, skip=6)
    assert list(sampler) == full[6:] and len(full) == 25 == len(sampler)


def test_a_signal_saves_and_stops_and_the_run_resumes_at_the_next_batch(tmp_path, signal_handlers, capsys):
    import signal
    def stopped_run(signal_at):  # the signal arrives during step `signal_at`: that step is finished, then saved
        run = _training_run(tmp_path, epochs=2)
        with pytest.raises(SystemExit) as stopped:
            _train(run, each_step=lambda step: step == signal_at and os.kill(os.getpid(), signal.SIGUSR1))
        assert stopped.value.code == common.EXIT_STOPPED  # SLURM's --signal=USR1@120
        assert f"stopped by SIGUSR1 after step {signal_at + 1}: the checkpoint in {tmp_path}" in capsys.readouterr().err
        return run
    full = _train(_training_run(tmp_path / "uninterrupted", epochs=2))
    assert [s[0] for s in full] == list(range(12))
    fresh = _training_run(tmp_path, epochs=2)  # no checkpoint: from the start
    assert (fresh.start_epoch, fresh.step) == (0, 0)
    stopped_run(signal_at=1)
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == 2
    run = _training_run(tmp_path, epochs=2)
    assert (run.start_epoch, run.step) == (0, 2)  # inside epoch 1: at its third batch
    stopped_run(signal_at=7)  # resumed at step 2, stopped inside epoch 2
    run = _training_run(tmp_path, epochs=2)
    assert (run.start_epoch, run.step) == (1, 8)  # the checkpoint: epoch 1 done, 8 steps (2 into epoch 2)
    assert _train(run) == full[8:]  # the same batches and random numbers as the run that was never stopped
    run = _training_run(tmp_path, epochs=2)  # at the last epoch's end: nothing left to do
    assert (run.start_epoch, run.step) == (2, 12) and _train(run) == []


def test_save_every_saves_inside_an_epoch_without_stopping(tmp_path, signal_handlers, monkeypatch):
    real, offset = time.monotonic, [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real() + offset[0])
    def each_step(step):  # 25 s pass per step; note which step checkpoint.pt holds when the step starts
        saved.append(torch.load(tmp_path / "checkpoint.pt")["step"] if (tmp_path / "checkpoint.pt").exists() else None)
        offset[0] += 25.0
    saved = []
    assert len(_train(_training_run(tmp_path, steps=8, save_every=1.0), each_step=each_step)) == 8
    # a save after steps 3 (75 s) and 6 (150 s): the clock restarts at each save
    assert saved == [None, None, None, 3, 3, 3, 6, 6]
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == 8  # and at the epoch's end


@pytest.mark.parametrize("script", ["trex.py", "opera.py", "rotssl.py", "univip.py", "eval_linear.py"])
def test_an_out_that_is_a_file_or_below_one_is_refused_in_one_sentence(script, tmp_path):
    from conftest import run_script
    (tmp_path / "taken").write_text("a file, not a folder")
    ckpt = ("--ckpt", "random", "--arch", "resnet_tiny") if script == "eval_linear.py" else ()
    for out, reason in ((tmp_path / "taken", "is a file, not a folder"),
                        (tmp_path / "taken" / "sub" / "run", f"cannot be created: {tmp_path / 'taken'} is a file")):
        result = run_script(script, *ckpt, "--out", out, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [f"error: --out {out} {reason}; choose another --out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing written


def test_knn_monitor_bank_is_a_fixed_seeded_subset_of_the_training_images_in_use():
    device = torch.device("cpu")
    def bank(**kw):
        monitor = common.KNNMonitor("synthetic", "data", 32, True, 0, device, **kw)
        return monitor.train.indices
    default = bank(subset=3000, seed=0)
    assert len(default) == 3000  # below the default cap of 20,000: every image in use
    in_use = set(common.EpochSampler(10_000, subset=3000, seed=0).indices.tolist())
    capped = bank(subset=3000, seed=0, bank=500)
    assert len(capped) == 500 and set(capped) <= in_use and capped == sorted(capped)
    assert capped == bank(subset=3000, seed=0, bank=500)  # the same bank every time (and after a resume)
    assert capped != bank(subset=3000, seed=1, bank=500)
    assert len(bank(bank=0)) == 10_000 and len(bank(bank=common.KNN_BANK)) == 10_000


def test_data_wait_is_the_fraction_of_time_spent_waiting_for_the_loader(tmp_path, signal_handlers):
    def logged(name, **kw):
        run = _training_run(tmp_path / name, steps=5, loader_seconds=kw.pop("loader_seconds", 0.0))
        seen = _train(run, **kw)
        assert [s[:2] for s in seen] == [(i, index) for i, (index, _) in enumerate(run.loader.sampler)]  # in order
        return json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[-1])
    input_bound = logged("input_bound", loader_seconds=0.05)
    assert input_bound["data_wait"] > 0.8 and 0 < input_bound["images_per_s"] < 1 / 0.05
    compute_bound = logged("compute_bound", step_seconds=0.05)
    assert compute_bound["data_wait"] < 0.2 and 0 < compute_bound["images_per_s"] < 1 / 0.05
