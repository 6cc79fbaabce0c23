"""Tests of trex.py: prototypes, memory, loss, augmentation, a step against the reference's computation, crop
sizes, two processes, the script."""
import copy
import json
import math
import os
import re
import signal
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import eval_linear
import trex
from conftest import (assert_bf16_run_close_to_fp32, assert_same_state, read_log, run_killed_after_first_checkpoint,
                      run_script, run_signalled_mid_epoch)

TINY_RUN = ("--subset", "128", "--batch-size", "32", "--eval-every", "0", "--workers", "1")


def tiny_model(memory_size=16, projector_layers=1, seed=0):
    torch.manual_seed(seed)
    backbone, feat_dim = common.build_backbone("resnet_tiny", small_images=True, img_size=16)
    return trex.TReX(backbone, feat_dim, num_classes=10, projector_layers=projector_layers, hidden_dim=32,
                     bottleneck_dim=8, memory_size=memory_size)


def tiny_batch(batch=4, n_local=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(batch, 3, 16, 16, generator=g)] + [torch.randn(batch, 3, 8, 8, generator=g)
                                                           for _ in range(n_local)]
    return crops, torch.randint(0, 10, (batch,), generator=g)


# ----------------------------------------------------------------------------------------------
# The pieces a user copies
# ----------------------------------------------------------------------------------------------
def test_class_prototypes_are_normalised_class_sums_and_zero_for_empty_classes():
    features = torch.randn(6, 4)
    labels = torch.tensor([0, 2, 0, -1, 2, 0])  # slot 3 is empty
    protos = trex.class_prototypes(features, labels, num_classes=4)
    for c, members in ((0, [0, 2, 5]), (2, [1, 4])):
        total = sum(features[i] for i in members)
        assert torch.allclose(protos[c], total / total.norm(), atol=1e-6)
    assert torch.equal(protos[1], torch.zeros(4)) and torch.equal(protos[3], torch.zeros(4))
    # an empty memory gives all-zero prototypes, hence all logits 0
    assert not trex.OCMMemory(8, 4).prototypes(3).any()


def test_memory_fills_to_the_end_then_restarts_at_slot_0_as_the_reference():
    memory = trex.OCMMemory(5, 2)  # 5 slots, writes of 3: not a multiple
    write = lambda chunk: memory.write(torch.stack([chunk, -chunk], 1), chunk.long())
    write(torch.arange(0.0, 3.0))
    assert memory.labels.tolist() == [0, 1, 2, -1, -1] and int(memory.ptr) == 3
    write(torch.arange(3.0, 6.0))  # slots 3, 4 take entries 3, 4; entry 5 is dropped (naver/trex's Memory.update)
    assert memory.labels.tolist() == [0, 1, 2, 3, 4] and int(memory.ptr) == 0
    write(torch.arange(6.0, 9.0))
    assert memory.labels.tolist() == [6, 7, 8, 3, 4] and int(memory.ptr) == 3
    assert torch.equal(memory.features[:, 0], torch.tensor([6.0, 7, 8, 3, 4])) and torch.equal(
        memory.features[:, 1], -memory.features[:, 0])
    write(torch.arange(100.0, 107.0))  # larger than the memory: the first entries that fit, then slot 0
    assert memory.labels.tolist() == [6, 7, 8, 100, 101] and int(memory.ptr) == 0
    write(torch.arange(200.0, 207.0))
    assert memory.labels.tolist() == [200, 201, 202, 203, 204] and int(memory.ptr) == 0


def test_loss_equals_hand_computed_cross_entropy_over_all_crops():
    logits = torch.tensor([[1.0, 2.0, 0.5],    # image 0, global crop
                           [0.0, -1.0, 3.0],   # image 1, global crop
                           [2.0, 0.0, 0.0],    # image 0, local crop
                           [0.5, 0.5, -2.0]])  # image 1, local crop
    labels = torch.tensor([1, 2])
    expected = 0.0
    for row, y in zip(logits.tolist(), [1, 2, 1, 2]):
        expected -= row[y] - math.log(sum(math.exp(v) for v in row))
    assert trex.multicrop_cross_entropy(logits, labels).item() == pytest.approx(expected / 4, abs=1e-6)
    z, w = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(trex.cosine_logits(z, w, tau=0.1), torch.tensor([[6.0, 8.0]]))


def test_augmentation_returns_one_global_and_n_local_crops():
    image = common.Synthetic("train")[0][0]
    aug = trex.MultiCropAugmentation(32, 16, n_local=3, scale_split=0.25)
    crops, target = aug(image, 7)  # the worker's half: uint8 crops and their colour parameters
    assert target == 7 and [tuple(c.shape) for c, _ in crops] == [(3, 32, 32)] + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.uint8 and p.shape == (common.ColorAugmentation.NUM_PARAMS,) for c, p in crops)
    batch = [(c[None], p[None]) for c, p in crops]  # a collated batch of one image
    finished = aug.on_device(batch, torch.device("cpu"))
    assert [tuple(c.shape) for c in finished] == [(1, 3, 32, 32)] + [(1, 3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in finished)
    assert (aug.global_colour.blur_p, aug.global_colour.solarize_p, aug.local_colour.blur_p) == (0.2, 0.2, 0.5)
    assert aug.local_colour.sigma == aug.global_colour.sigma  # the global crops' blur on the local ones too
    small = trex.MultiCropAugmentation(32, 16, n_local=3, small=True)  # 64 px or less: no blur, solarize kept
    assert (small.global_colour.blur_p, small.global_colour.solarize_p, small.local_colour.blur_p) == (0.0, 0.2, 0.0)
    crops, _ = trex.MultiCropAugmentation(n_local=2)(Image.new("RGB", (300, 260), (90, 20, 200)), 0)
    assert [tuple(c.shape) for c, _ in crops] == [(3, 224, 224), (3, 96, 96), (3, 96, 96)]


@pytest.mark.parametrize("local_size, calls", [(8, 2), (16, 1)])
def test_one_backbone_call_per_crop_resolution_as_the_references_multicrop_wrapper(local_size, calls):
    """naver/trex's MultiCropWrapper (DINO's) calls the backbone once per run of crops of one size: twice for global
    and local crops, once when --local-size equals --global-size (batch norm then sees all crops together)."""
    model = tiny_model()
    crops, labels = tiny_batch(n_local=2)
    crops = crops[:1] + [torch.randn(4, 3, local_size, local_size) for _ in crops[1:]]
    sizes = []
    model.backbone.register_forward_hook(lambda module, args, out: sizes.append(args[0].shape[0]))
    z = model.embed(crops)
    assert len(sizes) == calls and sum(sizes) == 12 and z.shape == (12, 8)
    if calls == 1:  # the one call's output is the concatenated batch's
        with torch.no_grad():
            assert torch.allclose(z, model.projector(model.backbone(torch.cat(crops))), atol=1e-6)


def test_lr_is_naver_trex_cosine_scheduler_step_for_step(tmp_path, monkeypatch):
    """naver/trex's utils.cosine_scheduler: np.linspace(0, base, warmup iterations) (its last step at base), then
    final + 0.5 (base - final)(1 + cos(pi t / T)) for t = 0 .. T - 1 (min_lr never reached)."""
    lrs, set_lr = [], common.set_lr
    monkeypatch.setattr(common, "set_lr", lambda opt, lr: (lrs.append(lr), set_lr(opt, lr))[1])
    monkeypatch.setattr("sys.argv", ["trex.py", "--subset", "96", "--batch-size", "32", "--eval-every", "0",
                                     "--workers", "0", "--global-size", "16", "--local-size", "8", "--n-local", "2",
                                     "--epochs", "4", "--warmup-epochs", "1", "--out", str(tmp_path / "run")])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process, whatever launched pytest
        monkeypatch.delenv(name, raising=False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}  # the run installs its own
    try:
        trex.main()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    base, final, per_epoch, total = 0.8 * 32 / 256, 1e-6, 3, 9  # resnet_tiny's lr 0.8; 3 steps x (4 - 1) epochs
    reference = np.concatenate([np.linspace(0, base, per_epoch),
                                final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(total) / total))])
    print(f"first {lrs[0]:.6g}, warmup end {lrs[per_epoch - 1]:.6g}, last {lrs[-1]:.6g}")
    assert len(lrs) == 12 and np.allclose(lrs, reference, rtol=1e-12, atol=0)
    assert lrs[0] == 0 and lrs[per_epoch - 1] == lrs[per_epoch] == base and lrs[-1] > final


# ----------------------------------------------------------------------------------------------
# The order of operations inside one step (spec: prototypes, online, momentum, memory, loss)
# ----------------------------------------------------------------------------------------------
def test_first_step_scores_against_the_empty_memory_then_writes_raw_momentum_outputs_of_global_crops():
    model = tiny_model(memory_size=16)
    crops, labels = tiny_batch(batch=4)
    momentum_before = copy.deepcopy(nn.Sequential(model.momentum_backbone, model.momentum_projector))
    loss = model(crops, labels)
    assert loss.item() == pytest.approx(math.log(10), abs=1e-6)  # every prototype is 0: the batch saw no own entry
    assert model.memory.labels[:4].tolist() == labels.tolist() and (model.memory.labels[4:] == -1).all()
    assert int(model.memory.ptr) == 4
    with torch.no_grad():  # momentum == online at init, so the update leaves it unchanged
        expected = momentum_before(crops[0])
    assert torch.allclose(model.memory.features[:4], expected, atol=1e-5)
    assert not torch.allclose(model.memory.features[:4].norm(dim=1), torch.ones(4))  # raw, not normalised


def test_momentum_encoder_follows_online_weights_of_the_step_before_the_optimizer_update():
    model = tiny_model(memory_size=16)
    optimizer = torch.optim.SGD(common.param_groups(model, 1e-4), lr=0.5, momentum=0.9)
    online = lambda: [p.detach().clone() for p in [*model.backbone.parameters(), *model.projector.parameters()]]
    target = lambda: [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    theta0 = online()
    for step in range(2):
        crops, labels = tiny_batch(seed=step)
        loss = model(crops, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 0:
            theta1 = online()
            assert all(torch.equal(t, p) for t, p in zip(target(), theta0))
            assert any(not torch.equal(a, b) for a, b in zip(theta0, theta1))
    for t, p0, p1 in zip(target(), theta0, theta1):
        assert torch.allclose(t, 0.999 * p0 + 0.001 * p1, atol=1e-6)
    assert not any(p.requires_grad for p in target())
    assert all(p.ndim >= 2 for p in optimizer.param_groups[0]["params"])  # weight decay on weights only
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


def test_the_momentum_encoder_runs_in_train_mode_even_after_model_eval():
    """Detail 5: the momentum forward normalises with batch statistics whatever the model's mode."""
    model = tiny_model(memory_size=16).eval()
    assert not model.backbone.training and not model.projector.training
    assert model.momentum_backbone.training and model.momentum_projector.training
    crops, labels = tiny_batch(seed=0)
    with torch.no_grad():
        model(crops, labels)
        keys = model.momentum_projector(model.momentum_backbone(crops[0]))  # train mode: running stats unused
    torch.testing.assert_close(model.memory.features[:len(labels)], keys.float())
    assert model.train().backbone.training and model.momentum_backbone.training


def test_loss_is_fp32_under_bf16_autocast():
    model = tiny_model()
    crops, labels = tiny_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(crops, labels)
        logits = model.predict(crops[0])
    assert loss.dtype == torch.float32 and logits.dtype == torch.float32
    assert model.memory.features.dtype == torch.float32


def test_recipes_and_the_ordinary_supervised_baseline():
    def parse(*flags):
        args = trex.get_args_parser().parse_args(list(flags))
        trex.check_args(args)  # before the recipe is resolved: unset values must pass
        trex.resolve_recipe(args, native=32)
        return args
    args = parse("--recipe", "trex_star")
    assert (args.projector_layers, args.scale_split, args.memory_size) == (1, 0.40, 8192)
    args = parse()  # the CPU demo network: the demo's values (DEMO_DEFAULTS), warmup 10 % of the epochs
    assert (args.lr, args.ema, args.hidden_dim, args.warmup_epochs) == (0.8, 0.99, 512, 0.4)
    args = parse("--arch", "resnet50", "--epochs", "100")  # the paper's
    assert (args.lr, args.ema, args.hidden_dim, args.warmup_epochs, args.memory_size) == (0.1, 0.999, 2048, 10, 8192)
    assert parse("--momentum", "0.9").ema == parse("--ema", "0.9").ema == 0.9  # the old flag name is an alias
    with pytest.raises(common.UserError, match="--ema"):
        parse("--ema", "1")
    args = parse("--recipe", "trex_star", "--projector-layers", "2", "--scale-split", "0.3")
    assert (args.projector_layers, args.scale_split) == (2, 0.3)
    assert parse("--recipe", "plain").memory_size == 0
    args = parse("--n-local", "0", "--projector-layers", "0", "--memory-size", "0")
    assert args.scale_split == 0.08  # the standard RandomResizedCrop range when there are no local crops
    model = tiny_model(memory_size=0, projector_layers=0)
    assert model.kind == "linear" and isinstance(model.projector, nn.Identity)
    assert model.classifier.bias is not None and not hasattr(model, "memory")
    crops, labels = tiny_batch(n_local=0)
    expected = F.cross_entropy(model.classifier(model.backbone(crops[0])), labels)
    assert torch.allclose(model(crops, labels), expected)
    assert tiny_model(memory_size=0, projector_layers=1).kind == "cosine"


def reference_step(model, crops, labels):
    """One training step as naver/trex computes it (trex.py tReX.forward, multi_crop.MultiCropWrapper,
    Memory.class_weights / update), written out from `model`'s own submodules, fp32."""
    n_crops = len(crops)
    # MultiCropWrapper: one encoder call per resolution, the head on the concatenated features
    pooled = torch.cat([model.backbone(crops[0]), model.backbone(torch.cat(crops[1:]))])
    x = model.projector.mlp(F.normalize(pooled, dim=1))
    if model.kind == "cosine":  # ClfLayer: l2-normalised x and weights, / tau
        logits = F.normalize(x, dim=1) @ F.normalize(model.classifier.weight, dim=1).t() / model.tau
    else:
        memory = model.memory
        with torch.no_grad():  # class_weights(): normalised per-class sums of the whole memory
            w = F.normalize(torch.zeros(10, x.shape[1]).index_add_(0, memory.labels, memory.features), dim=1)
        logits = F.normalize(x, dim=1) @ w.t() / model.tau
        with torch.no_grad():  # update_model_ema(), then the EMA model on the global crops, then Memory.update
            online = [*model.backbone.parameters(), *model.projector.parameters()]
            ema = [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
            for p, q in zip(online, ema):
                q.data = q.data * model.ema + p.data * (1.0 - model.ema)
            keys = model.momentum_projector.mlp(F.normalize(model.momentum_backbone(crops[0]), dim=1))
            ptr, size = int(memory.ptr), memory.labels.shape[0]
            keys, new = keys[:size - ptr], labels[:size - ptr]
            memory.features[ptr:ptr + len(new)] = keys
            memory.labels[ptr:ptr + len(new)] = new
            memory.ptr.fill_((ptr + len(new)) % size)
    loss = F.cross_entropy(logits, labels.repeat(n_crops))
    loss.backward()
    return loss


@pytest.mark.parametrize("memory_size", [16, 0])  # t-ReX (OCM) and the plain variant (learned cosine classifier)
def test_training_step_equals_the_reference_computation(memory_size):
    model = tiny_model(memory_size=memory_size, projector_layers=3)
    g = torch.Generator().manual_seed(1)
    if memory_size:  # a full memory (as the reference's always is) with the pointer 2 slots before the end
        model.memory.features.copy_(torch.randn(16, 8, generator=g))
        model.memory.labels.copy_(torch.randint(0, 10, (16,), generator=g))
        model.memory.ptr.fill_(14)
        with torch.no_grad():  # a momentum encoder that differs from the online one
            for p in [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    reference = copy.deepcopy(model)
    crops, labels = tiny_batch(batch=6, n_local=3, seed=2)
    loss = model(crops, labels)
    loss.backward()
    expected = reference_step(reference, crops, labels)
    relative = lambda a, b: ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
    assert relative(loss.detach(), expected.detach()) <= 1e-5
    grads = {name: p.grad for name, p in reference.named_parameters()}
    # the bias of a Linear layer followed by BatchNorm (train mode) has a gradient of exactly 0 in exact
    # arithmetic, float noise on both sides: measure it against the gradient of the layer's weight instead
    mlp = model.projector.mlp
    before_bn = {f"projector.mlp.{i}.bias" for i in range(len(mlp) - 1) if isinstance(mlp[i + 1], nn.BatchNorm1d)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = grads[name.replace("bias", "weight")] if name in before_bn else grads[name]
            assert p.grad is not None and (p.grad - grads[name]).norm() <= 1e-5 * scale.norm(), name
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert relative(a.double(), b.double()) <= 1e-5, name  # BN statistics, momentum encoder, memory
    if memory_size:
        assert int(model.memory.ptr) == 0 and model.memory.labels[14:].tolist() == labels[:2].tolist()


# ----------------------------------------------------------------------------------------------
# Two processes (gloo, CPU): identical memories and parameters on both ranks
# ----------------------------------------------------------------------------------------------
def _two_process_worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    g = torch.Generator().manual_seed(0)  # the same global batches on both ranks; each writes its share
    features, labels = torch.randn(3, 4, 4, generator=g), torch.randint(0, 10, (3, 4), generator=g)
    memory = trex.OCMMemory(6, 4)  # 3 writes of 4 into 6 slots: the second one is cut at the end
    for f, y in zip(features, labels):
        memory.write(f.view(world_size, -1, 4)[rank], y.view(world_size, -1)[rank])
    model = tiny_model(memory_size=6, seed=rank)  # different inits: DDP must broadcast rank 0's, momentum included
    ddp_model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.SGD(common.param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    step_labels = []
    for step in range(3):  # 3 steps x 2 ranks x 2 images into 6 slots: step 2 fills 2 slots, step 3 restarts
        crops, y = tiny_batch(batch=2, seed=10 * step + rank)  # different data on each rank
        step_labels.append(common.all_gather_nograd(y))
        loss = ddp_model(crops, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trex.check_replicas_agree(model)  # the script's own end-of-epoch check must pass too
    torch.save({"memory": memory.state_dict(), "params": dict(model.named_parameters()),
                "model_memory": model.memory.state_dict(), "step_labels": torch.cat(step_labels)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    common.destroy_process_group()


def test_two_processes_hold_identical_memories_and_parameters(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_process_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same_state(r0["memory"], r1["memory"])
    assert_same_state(r0["params"], r1["params"])
    assert_same_state(r0["model_memory"], r1["model_memory"])
    single = trex.OCMMemory(6, 4)  # one process writing the concatenated batches
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(3, 4, 4, generator=g), torch.randint(0, 10, (3, 4), generator=g)
    for f, y in zip(features, labels):
        single.write(f, y)
    assert_same_state(single.state_dict(), r0["memory"])
    assert single.labels.tolist() == labels[2].tolist() + labels[1, :2].tolist() and int(single.ptr) == 4
    steps = r0["step_labels"].view(3, 4)  # gathered in rank order; step 2 keeps rank 0's two images only
    assert r0["model_memory"]["labels"].tolist() == steps[2].tolist() + steps[1, :2].tolist()


# ----------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("trex") / "demo"
    result = run_script("trex.py", "--epochs", "1", "--subset", "256", "--workers", "1", "--out", out)
    return out, result


def test_demo_path_runs_and_writes_log_checkpoint_and_backbone(demo_run):
    out, result = demo_run
    assert re.search(r"kNN top-1: [\d.]+% after training vs [\d.]+% at random init", result.stdout)
    assert "crop sizes: global 32 px, local 16 px (images of about 32 px, 64 px or less: CIFAR stem)" in result.stdout
    assert result.stdout.count("recipe: lr 0.2 (0.8 x 64/256") == 1  # the demo's recipe, printed once
    assert re.search(r"epoch 1/1: loss [\d.]+, lr .*classifier top-1 [\d.]+%", result.stdout)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert lines[0]["args"]["recipe"] == "trex" and lines[0]["args"]["global_size"] == 32
    assert lines[0]["args"]["ema"] == 0.99 and lines[0]["recipe"]["ema"] == "0.99 (constant)"
    assert lines[1]["epoch"] == 0 and "knn_top1" in lines[1]
    epoch = lines[2]
    assert epoch["epoch"] == 1 and math.isfinite(epoch["loss"]) and epoch["images_per_s"] > 0
    assert {"lr", "peak_mem_mb", "classifier_top1", "classifier_top5", "knn_top1", "knn_top5"} <= epoch.keys()
    assert 0 <= epoch["classifier_top1"] <= epoch["classifier_top5"] <= 100
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["method"] == "trex" and "memory.labels" in ckpt["model"]
    assert (ckpt["model"]["memory.labels"] >= 0).sum() == 256  # 2 steps x 128 images written
    record = eval_linear.load_backbone(str(out / "backbone.pt"))
    backbone, feat_dim = eval_linear.backbone_from_record(record)
    assert record["method"] == "trex" and feat_dim == 128
    assert not any(k.startswith(("projector", "momentum", "memory")) for k in record["state_dict"])


def test_eval_linear_reads_the_backbone(demo_run):
    out, _ = demo_run
    run_script("eval_linear.py", "--ckpt", out / "backbone.pt", "--data", "synthetic", "--subset", "500",
               "--workers", "1")
    result = json.loads((out / "eval_synthetic.json").read_text())
    assert 0 <= result["knn"]["top1"] <= 100 and 0 <= result["linear"]["top1"] <= 100


def test_two_processes_under_torchrun(tmp_path):
    run_script("trex.py", "--epochs", "1", *TINY_RUN, "--out", tmp_path / "run", nproc=2)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    assert (ckpt["model"]["memory.labels"] >= 0).sum() == 128  # both ranks' images are in the memory


def test_resume_after_a_kill_gives_the_same_weights(tmp_path):
    args = ("--epochs", "2", *TINY_RUN, "--memory-size", "80")  # 8 steps x 32 images: cut at the end, restarts
    run_script("trex.py", *args, "--out", tmp_path / "straight")
    first = run_killed_after_first_checkpoint("trex.py", *args, out=tmp_path / "resumed")
    assert first["epoch"] == 1
    result = run_script("trex.py", *args, "--out", tmp_path / "resumed")
    assert "epoch 2/2" in result.stdout and "epoch 1/2" not in result.stdout
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("straight", "resumed"))
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizer"], b["optimizer"])


# 24 steps of 16 per epoch; a memory of 128 slots wraps every 8 steps, so a stop inside the epoch must keep its pointer
LONG_EPOCH = ("--subset", 384, "--batch-size", 16, "--epochs", 2, "--eval-every", 0, "--workers", 0,
              "--n-local", 2, "--hidden-dim", 32, "--projector-layers", 1, "--memory-size", 128)


def test_sigterm_mid_epoch_saves_and_the_resumed_run_is_bit_equal(tmp_path):
    run_script("trex.py", *LONG_EPOCH, "--out", tmp_path / "straight")
    code, stderr = run_signalled_mid_epoch("trex.py", *LONG_EPOCH, out=tmp_path / "stopped")
    assert code == common.EXIT_STOPPED and "stopped by SIGTERM after step" in stderr and "Traceback" not in stderr
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and 3 <= saved["step"] < 24  # inside the first epoch of 24 steps
    assert len(read_log(tmp_path / "stopped")) == 1  # the header: no epoch has ended
    run_script("trex.py", *LONG_EPOCH, "--out", tmp_path / "stopped")
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", map_location="cpu", weights_only=True)
            for d in ("straight", "stopped"))
    assert a["step"] == b["step"] == 48
    assert_same_state(a["model"], b["model"])  # memory, its pointer and the momentum encoder included
    assert_same_state(a["optimizer"]["state"], b["optimizer"]["state"])
    log_a, log_b = read_log(tmp_path / "straight"), read_log(tmp_path / "stopped")
    assert [r["epoch"] for r in log_b[1:]] == [1, 2]  # one line per epoch
    assert [r["loss"] for r in log_a[1:]] == pytest.approx([r["loss"] for r in log_b[1:]], rel=1e-6)


def test_a_single_class_folder_is_refused(tmp_path):
    folder = tmp_path / "one" / "train" / "only"
    folder.mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (32, 32), (10 * i, 40, 40)).save(folder / f"{i}.png")
    result = run_script("trex.py", "--data", tmp_path / "one", "--epochs", 1, "--batch-size", 4, "--eval-every", 0,
                        "--workers", 0, "--out", tmp_path / "out", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "labels for 1 class(es)" in lines[0]
    assert "at least two classes" in lines[0] and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Crop sizes: from the dataset as a whole, the reference's 224 / 96 unless the images are small
# ----------------------------------------------------------------------------------------------
def test_crop_sizes_are_the_references_unless_the_images_are_small_and_flags_override_them():
    def sizes(native, *flags):
        args = trex.get_args_parser().parse_args(list(flags))
        small, recipe, _ = trex.resolve_recipe(args, native)
        assert f"1 x {args.global_size} px" in recipe["crops"] and f"8 x {args.local_size} px" in recipe["crops"]
        return args.global_size, args.local_size, small
    assert sizes(375) == sizes(180) == sizes(96) == sizes(65) == (224, 96, False)  # whatever the images' size
    # small images: native, and 96/224 of it rounded to a multiple of 8 (common.crop_sizes, every script's policy)
    assert sizes(32) == (32, 16, True) and sizes(64) == (64, 24, True) and sizes(16) == (16, 8, True)
    assert sizes(375, "--global-size", "160") == (160, 96, False)
    assert sizes(375, "--global-size", "128", "--local-size", "48") == (128, 48, False)
    assert sizes(32, "--global-size", "56") == (56, 24, True) and sizes(32, "--local-size", "10") == (32, 10, True)


def image_folder(root, first, others, per_class=4):
    """root/{train,val}/{a,b}/NN.png; the very first training file has size `first`, every other one `others`."""
    for split, n in (("train", per_class), ("val", 2)):
        for c, colour in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
            os.makedirs(root / split / c)
            for i in range(n):
                size = first if (split, c, i) == ("train", "a", 0) else others
                Image.new("RGB", size, colour).save(root / split / c / f"{i:02d}.png")
    return root


def crop_sizes_run(data, out, *flags):
    result = run_script("trex.py", "--data", data, "--epochs", "1", "--batch-size", "4", "--n-local", "2",
                        "--eval-every", "0", "--workers", "0", "--out", out, *flags)
    header = json.loads((out / "log.jsonl").read_text().splitlines()[0])["args"]
    record = torch.load(out / "backbone.pt", weights_only=True)
    return result.stdout, (header["global_size"], header["local_size"]), (record["img_size"], record["small_images"])


def test_a_folder_whose_first_image_is_240x180_trains_at_224_and_96_and_flags_override(tmp_path):
    data = image_folder(tmp_path / "photos", first=(240, 180), others=(300, 400))  # 8 images: median side 300
    stdout, logged, record = crop_sizes_run(data, tmp_path / "default")
    assert "crop sizes: global 224 px, local 96 px (images of about 300 px, above 64 px: ImageNet stem)" in stdout
    assert logged == (224, 96) and record == (224, False)
    stdout, logged, record = crop_sizes_run(data, tmp_path / "flags", "--global-size", "48", "--local-size", "24")
    assert "crop sizes: global 48 px, local 24 px (images of about 300 px" in stdout
    assert logged == (48, 24) and record == (48, False)


def test_a_folder_of_32px_images_trains_at_32_and_16(tmp_path):
    data = image_folder(tmp_path / "tiny", first=(32, 32), others=(32, 32))
    stdout, logged, record = crop_sizes_run(data, tmp_path / "run")
    assert "crop sizes: global 32 px, local 16 px (images of about 32 px, 64 px or less: CIFAR stem)" in stdout
    assert logged == (32, 16) and record == (32, True)


def test_bad_scale_split_exits_with_one_sentence_and_no_output(tmp_path):
    result = run_script("trex.py", "--scale-split", "1.5", "--out", tmp_path / "bad", check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--scale-split" in lines[0]
    assert not (tmp_path / "bad").exists()


def test_bf16_run_is_close_to_fp32(tmp_path):
    assert_bf16_run_close_to_fp32("trex.py", *TINY_RUN, "--epochs", "1", "--workers", "0", out=tmp_path / "bf16")
