"""What a machine without a GPU can show of the GPU path: every method's step with the model and the batch on the
`meta` device (a tensor made on the wrong device fails, as it would on CUDA), the views copied to the device before
they are concatenated, each process's own GPU's random stream saved and restored (fewer GPUs visible at the resume),
the refusals (more processes than GPUs, --compile on several GPUs) and the non-finite check decided by all processes.
tests/test_cuda.py runs the same paths on a GPU."""
import contextlib
import os
import random

import pytest
import torch
import torch.multiprocessing as mp

import common
import opera
import rotssl
import trex
import univip
from conftest import colour_aug
from test_common import _train, _training_run

META = torch.device("meta")


def _collated(augmentation, dataset, n=4, collate=torch.utils.data.default_collate):
    """A batch as the loader gives it (uint8 views and their colour parameters, on the CPU)."""
    torch.manual_seed(0)
    return collate([augmentation(*dataset[i]) for i in range(n)])


def _on_meta(model):
    """The model on the meta device, and its trained parameters."""
    model = model.to(META)
    return model, [p for p in model.parameters() if p.requires_grad]


def _opera_step():
    backbone, feat_dim = common.build_backbone("resnet_tiny", True, 32)
    model, trained = _on_meta(opera.OPERA(backbone, feat_dim, 10, dim=16, mlp_dim=32, sup_weight=0.5))
    augmentation = opera.TwoViewAugmentation(32, 0.08, small=True)
    view1, view2, labels = _collated(augmentation, common.Synthetic("train", size=8))
    optimizer = common.LARS(common.param_groups(model, 1e-6), lr=0.1)
    view1, view2 = augmentation.on_device(view1, view2, META)
    common.momentum_update(*model.momentum_pairs(), 0.99)
    losses = model(view1, view2, labels.to(META, non_blocking=True))
    losses["loss"].backward()
    optimizer.step()
    return losses


def _trex_step():
    backbone, feat_dim = common.build_backbone("resnet_tiny", True, 32)
    model, trained = _on_meta(trex.TReX(backbone, feat_dim, 10, 3, 32, 16, memory_size=8))
    augmentation = trex.MultiCropAugmentation(32, 16, n_local=2, small=True)
    crops, labels = _collated(augmentation, common.Synthetic("train", size=8))
    optimizer = torch.optim.SGD(common.param_groups(model, 1e-4), lr=0.1, momentum=0.9)
    loss = model(augmentation.on_device(crops, META), labels.to(META, non_blocking=True))
    loss.backward()
    optimizer.step()
    return {"loss": loss}


def _univip_step():
    backbone, feat_dim = common.build_backbone("resnet_tiny", True, 64)
    model, trained = _on_meta(univip.UniVIP(backbone, feat_dim, num_instances=2, hidden_dim=32, proj_dim=16))
    augmentation = univip.SceneInstanceAugmentation(64, 32, 2, 8.0, (0.08, 1.0), small=True)
    *crops, fell_back = _collated(augmentation, common.build_scene_dataset("synthetic"),
                                  collate=univip.collate_scene_pairs)
    optimizer = torch.optim.SGD(trained, lr=0.1, momentum=0.9, weight_decay=1e-4)
    losses = model(*augmentation.on_device(*crops, META))
    losses["loss"].backward()
    optimizer.step()
    common.momentum_update(*model.momentum_pairs(), 0.99)
    losses["fallback_rate"] = fell_back.to(META, non_blocking=True).float().mean()
    return losses


def _rotssl_step(base):
    backbone, feat_dim = common.build_backbone("resnet_tiny", True, 32)
    model, trained = _on_meta(rotssl.RotSSL(backbone, feat_dim, base, 0.1, n_prototypes=10,
                                            queue_length=8 if base == "swav" else 0))
    augmentation = rotssl.Augmentation(base, 32, 16, 2, rotate=True, small=True)
    batch = augmentation.on_device(_collated(augmentation, common.Synthetic("train", size=8)), META)
    optimizer = common.LARS(common.param_groups(model, 1e-6), lr=0.1, clip=base == "byol")
    if base == "swav":
        model.normalize_prototypes()
    losses = model(batch, fill_queue=True, use_queue=base == "swav")  # the queue in use: its slices too
    losses["loss"].backward()
    optimizer.step()
    if base == "byol":
        common.momentum_update(*model.momentum_pairs(), 0.99)
    return losses


def _knn_features():
    backbone, _ = common.build_backbone("resnet_tiny", True, 32)
    dataset = common.Transformed(common.Synthetic("val"), common.eval_transform(32, True), range(5))
    features, labels = common.extract_features(backbone.to(META), dataset, 2, 0, META)
    return {"features": features, "labels": labels}


@pytest.fixture
def meta_autocast(monkeypatch):
    """The meta device has no autocast: the code's `torch.autocast(device, enabled=False)` blocks become no-ops."""
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, *a, **k: (
        contextlib.nullcontext() if device_type == "meta" else real(device_type, *a, **k)))


@pytest.mark.parametrize("step", [_opera_step, _trex_step, _univip_step, lambda: _rotssl_step("swav"),
                                  lambda: _rotssl_step("byol"), _knn_features],
                         ids=["opera", "trex", "univip", "swav_rot", "byol_rot", "knn_features"])
def test_every_step_runs_with_model_and_batch_on_the_meta_device(step, meta_autocast):
    """The views made on the CPU by the workers, then the method's step from on_device to the optimizer (and the
    momentum update): a tensor created without `device=` lands on the CPU and meets the meta ones in an op, which
    raises, as a CPU tensor would on a GPU (a host sync such as .item() raises too)."""
    out = step()
    assert out and all(v.device == META for v in out.values())


def test_views_reach_the_device_before_they_are_concatenated(monkeypatch, meta_autocast):
    """on_device copies each (pinned) view to the device, then concatenates there: no CPU concatenation into
    pageable memory, no synchronous copy."""
    colour = colour_aug(blur_p=0.5)
    views = [(torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8), torch.stack([colour.sample() for _ in "ab"]))
             for _ in range(3)]
    real_cat, devices = torch.cat, []
    def cat(tensors, *args, **kwargs):
        devices.append({t.device.type for t in tensors})
        return real_cat(tensors, *args, **kwargs)
    monkeypatch.setattr(torch, "cat", cat)
    out = colour.on_device(views, META)
    assert devices == [{"meta"}, {"meta"}]  # the images, then the parameters: every piece already on the device
    assert len(out) == 3 and all(v.shape == (2, 3, 8, 8) and v.device == META for v in out)
    assert colour.mean.device == META  # normalisation constants kept on the device, copied once


def test_rng_states_are_each_process_own_gpus_and_restore_with_fewer_gpus_visible(monkeypatch):
    """Saved where 8 GPUs were visible (the process of LOCAL_RANK 5), resumed where 2 are (LOCAL_RANK 1): only the
    process's own GPU stream is read and restored. torch.cuda is faked: the restore of a GPU not visible raises, as
    torch does (set_rng_state_all of 8 states on 2 GPUs: an IndexError)."""
    visible, read, restored = [8], [], []
    def get_rng_state(device):
        read.append(device)
        return torch.tensor([device.index], dtype=torch.uint8)
    def set_rng_state(state, device):
        if device.index >= visible[0]:
            raise IndexError(f"no GPU {device.index}")
        restored.append((int(state[0]), device))
    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    torch.manual_seed(3)
    random.seed(3)
    state = common.rng_state(torch.device("cuda", 5))
    expected = torch.rand(4), random.random()
    assert read == [torch.device("cuda", 5)] and state["cuda"].tolist() == [5]
    visible[0] = 2
    torch.manual_seed(4)
    common.set_rng_state(state, torch.device("cuda", 1))
    assert restored == [(5, torch.device("cuda", 1))]  # rank 5's stream on this process's own GPU
    assert torch.equal(torch.rand(4), expected[0]) and random.random() == expected[1]
    cpu = common.rng_state(torch.device("cpu"))  # a CPU run records no GPU stream and restores none
    common.set_rng_state(cpu, torch.device("cpu"))
    assert cpu["cuda"] is None and len(read) == 1 and len(restored) == 1
    common.set_rng_state(cpu, torch.device("cuda", 0))  # a CPU checkpoint resumed on a GPU: the GPU's seed stays
    assert len(restored) == 1


def _fake_gpus(monkeypatch, count, **env):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device before the refusal"))
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize("local_rank", [0, 1])
def test_more_processes_per_node_than_gpus_is_refused_in_one_sentence_by_every_process(monkeypatch, local_rank):
    """torchrun --nproc_per_node=2 on a machine with one GPU: both processes say it (not only the one without a GPU,
    whose `invalid device ordinal` was a traceback), before any GPU or process group is touched."""
    _fake_gpus(monkeypatch, 1, LOCAL_WORLD_SIZE=2, LOCAL_RANK=local_rank, RANK=local_rank, WORLD_SIZE=2)
    with pytest.raises(common.UserError) as e:
        common.init_distributed()
    assert str(e.value) == ("2 processes per node need a GPU each, and the number of GPUs visible here is 1: set "
                            "torchrun's --nproc_per_node to at most 1")


def test_compile_on_several_gpu_processes_is_refused_in_one_sentence(monkeypatch):
    import argparse
    parser = argparse.ArgumentParser()
    common.add_common_args(parser, "m", epochs=1, batch_size=8, lr=0.1, wd=0.0, warmup_epochs=0)
    common.check_common_args(parser.parse_args(["--compile"]), world_size=2)  # CPU processes (gloo): allowed
    _fake_gpus(monkeypatch, 2)
    with pytest.raises(common.UserError, match=r"^--compile with several GPU processes has not been run yet"):
        common.check_common_args(parser.parse_args(["--compile"]), world_size=2)
    common.check_common_args(parser.parse_args([]), world_size=2)  # without --compile: fine
    monkeypatch.setattr(common, "compile_unsupported", lambda: None)
    common.check_common_args(parser.parse_args(["--compile"]), world_size=1)  # one GPU: fine


def _non_finite_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:  # 2 epochs of 6 steps, checked every 3: rank 1's NaN at step 7 (epoch 2) is seen at the check after step 9
        _train(_training_run(out, epochs=2), nan_at=7 if rank == 1 else None)
        message = "finished"
    except common.UserError as e:
        message = str(e)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(message)
    common.destroy_process_group()


def test_a_non_finite_loss_on_one_process_stops_every_process_with_the_sentence(tmp_path):
    """Two gloo processes, only rank 1 sees a NaN: both stop at the same check with the same sentence (before, rank 0
    went on into the next collective and torchrun killed it), and checkpoint.pt is still the last good one."""
    (tmp_path / "run").mkdir()
    mp.spawn(_non_finite_worker, args=(2, 29500 + (os.getpid() + 7) % 1000, str(tmp_path / "run")), nprocs=2)
    sentence = "the loss is not finite at or before step 9; run the same command with a lower --lr to resume from the last save"
    assert [(tmp_path / "run" / f"rank{r}.txt").read_text() for r in (0, 1)] == [sentence] * 2
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == (1, 6)  # epoch 1's: nothing saved after the NaN
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "backbone.pt", "checkpoint.pt", "log.jsonl", "rank0.txt", "rank1.txt"]  # no temporaries
