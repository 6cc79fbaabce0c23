"""Evaluate frozen features of any checkpoint: weighted kNN and a linear probe.

Reads the `backbone.pt` record that every method writes (also a `checkpoint.pt`), the papers' own
checkpoints (MoCo v3, OPERA, SwAV, DINO, BYOL, t-ReX, torchvision: see PREFIXES; it prints how many
tensors it loaded and refuses one that does not fill the backbone), or builds a randomly initialised
backbone with `--ckpt random --arch X`: the baseline every results table needs.

Protocols
1. kNN (DINO's): l2-normalised features of train and test images (Resize + CenterCrop, no
   augmentation), cosine similarity, k = 20 neighbours, votes weighted by exp(sim / 0.07).
2. Linear probe, `--mode fast` (default): features are extracted once, standardised with the
   training split's mean and std, and a linear layer is trained on them (SGD momentum 0.9, cosine
   schedule). lr and weight decay are chosen by a small sweep on a held-out 10 % of the training
   split, then the chosen setting is refit on the whole training split. Minutes, not hours.
3. Linear probe, `--mode full` (MoCo v3 / DINO): the backbone stays frozen in eval mode; a linear
   layer initialised N(0, 0.01) with bias 0 is trained on augmented images (RandomResizedCrop + flip;
   on small images RandomCrop with 4 px padding + flip, the usual CIFAR choice), SGD momentum 0.9,
   weight decay 0, lr 0.1 x batch/256, cosine over 90 epochs, no warmup.
At the end the script checks that the backbone is bit for bit what it loaded (MoCo v3's check).
Every number is the final-epoch value (never the best epoch). Results: a printed table and
`OUT/eval_<data>.json` (OUT = the checkpoint's folder unless `--out` is given).

Commands
    python eval_linear.py --ckpt random --arch resnet_tiny --data synthetic      # CPU, ~25 s
    python eval_linear.py --ckpt runs/trex/backbone.pt --data cifar10 --download
    python eval_linear.py --ckpt runs/trex/backbone.pt --data data/cifar10       # an ImageFolder
    python eval_linear.py --ckpt r-50-1000ep.pth.tar --data /imagenet               # MoCo v3's released weights
    torchrun --nproc_per_node=8 eval_linear.py --ckpt runs/opera/backbone.pt --data /imagenet --mode full
"""
import argparse
import json
import os
import random
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2
from tqdm import tqdm

import common

FAST_LRS = (0.01, 0.1, 1.0)
FAST_WDS = (0.0, 1e-4, 1e-3)


def get_args_parser():
    p = argparse.ArgumentParser("eval_linear", description=__doc__.split("\n")[0],
                                formatter_class=common.HelpFormatter)
    p.add_argument("--check-data", metavar="DIR", default=None,
                   help="only decode every image under DIR (with --workers processes) and list the unreadable "
                        "ones; exit status 1 if there are any. Run it once on a new dataset before training "
                        "(default: off)")
    p.add_argument("--ckpt", default=None,
                   help="backbone.pt or checkpoint.pt of any method, a checkpoint of MoCo v3, OPERA, SwAV, DINO, BYOL "
                        "or t-ReX, a torchvision state dict, or 'random' for a randomly initialised backbone; no "
                        "default: required")
    p.add_argument("--arch", default=None, choices=common.ARCHS,
                   help="backbone architecture (default: the checkpoint's; required for 'random' and "
                        "checkpoints that do not name it)")
    p.add_argument("--prefix", default="auto", help="start of the backbone's keys in another code base's checkpoint, "
                   "nested keys joined by dots, no 'module.' (e.g. student.backbone.); auto: eval_linear.PREFIXES")
    p.add_argument("--unsafe-load", action="store_true", help="read a checkpoint that pickles Python objects (DINO's, "
                   "t-ReX's full ones) with weights_only=False, which can run its code: only for files you trust")
    p.add_argument("--mean", type=float, nargs=3, default=list(common.IMAGENET_MEAN), metavar=("R", "G", "B"),
                   help="normalisation for other code bases' checkpoints and 'random' (a backbone.pt has its own)")
    p.add_argument("--std", type=float, nargs=3, default=list(common.IMAGENET_STD), metavar=("R", "G", "B"),
                   help="likewise")
    p.add_argument("--stem-padding", type=int, default=1, choices=(1, 2),
                   help="padding of a 3x3 CIFAR stem in other code bases' checkpoints and 'random' (2: solo-learn's)")
    p.add_argument("--data", default="synthetic",
                   help="synthetic, cifar10, cifar100, stl10, or an ImageFolder root with train/ and val/ or test/")
    p.add_argument("--data-dir", default="data", help="root of the torchvision datasets")
    p.add_argument("--download", action="store_true", help="download the torchvision dataset into --data-dir")
    p.add_argument("--subset", type=int, default=0, help="a fixed random subset of this many training images (0 = all)")
    p.add_argument("--img-size", type=int, default=0,
                   help="evaluation resolution (0 = the backbone.pt's training size; for other checkpoints 224, or "
                        "with a CIFAR stem the data's own size if at most 64 px; for 'random' the latter rule)")
    p.add_argument("--mode", default="fast", choices=("fast", "full"),
                   help="fast: a linear layer on cached features, lr/wd sweep; full: MoCo v3's protocol on images")
    p.add_argument("--epochs", type=int, default=0, help="linear-probe epochs (default: 100 in fast mode, 90 in full)")
    p.add_argument("--lr", type=float, default=0.0,
                   help="fast: a fixed lr instead of the sweep; full: the base lr, scaled by batch/256 (default: fast "
                        f"mode sweeps {', '.join(f'{v:g}' for v in FAST_LRS)}; full mode 0.1)")
    p.add_argument("--wd", type=float, default=-1.0, help="fast: a fixed weight decay instead of the sweep (default: "
                   f"fast mode sweeps {', '.join(f'{v:g}' for v in FAST_WDS)}; full mode 0)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch of the linear probe and of the features")
    p.add_argument("--knn-k", type=int, default=20, help="number of neighbours of the kNN classifier")
    p.add_argument("--knn-t", type=float, default=0.07, help="temperature of the kNN votes")
    workers = min(8, os.cpu_count() or 1)
    p.add_argument("--workers", type=int, default=workers,
                   help=f"data loader processes per GPU (default: the CPU count up to 8, here {workers})")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="feature extraction precision (auto = bf16 on GPUs that support it, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed (held-out split, subset, linear init)")
    p.add_argument("--out", default=None,
                   help="folder of eval_<data>.json (default: the checkpoint's; runs/eval_random_ARCH for 'random')")
    return p


def check_args(args, world_size):
    if args.ckpt is None:
        raise common.UserError("--ckpt is required: a backbone.pt, checkpoint.pt, state dict or 'random'")
    if args.ckpt == "random" and args.arch is None:
        raise common.UserError("--ckpt random needs --arch (e.g. --arch resnet_tiny)")
    if args.batch_size < world_size or args.batch_size % world_size:
        raise common.UserError(f"--batch-size {args.batch_size} must be a positive multiple of the number of processes")
    if args.epochs < 0 or args.subset < 0 or args.img_size < 0 or args.knn_k < 1 or args.knn_t <= 0:
        raise common.UserError("--epochs, --subset and --img-size must not be negative; --knn-k and --knn-t must be "
                               "positive")
    if args.out is not None:
        common.check_out_folder(args.out)


# ---- Reading a checkpoint: backbone.pt, checkpoint.pt or another code base's checkpoint ------------------------------
# Where the backbone sits in the papers' own checkpoints (nested keys joined by dots, no DDP `module.` or torch.compile
# `_orig_mod.`); the first that fills the backbone wins. No momentum encoder, student or EMA model is among them.
PREFIXES = ("",                          # a bare state dict: torchvision's, SwAV's, DINO's and t-ReX's model zoos
            "state_dict.",               # SwAV's training checkpoints
            "state_dict.base_encoder.",  # MoCo v3 and OPERA: the base encoder
            "teacher.backbone.",         # DINO and its followers: the teacher
            "state_dict.backbone.", "backbone.", "online_encoder.net.",  # BYOL: solo-learn, lightly, byol-pytorch
            "model.model.encoder.")      # t-ReX's full checkpoints: the trained model


def read_checkpoint(path, unsafe=False):
    if not os.path.isfile(path):
        raise common.UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False) if unsafe else common.load_weights_only(path)
    except Exception as e:
        if re.search("Unsupported (global|class)", str(e)):  # a pickled object: DINO's, t-ReX's argparse arguments
            raise common.UserError(f"{path} holds pickled Python objects besides tensors, which a weights-only load "
                                   "refuses; if you trust the file, pass --unsafe-load") from None
        raise common.UserError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None


def flat_tensors(obj, prefix=""):
    """The tensors of nested dicts, keyed by their path joined by dots, without `module.` and `_orig_mod.`."""
    out = {}
    for k, v in obj.items():
        key = ".".join(part for part in f"{prefix}{k}".split(".") if part not in ("module", "_orig_mod"))
        out.update({key: v} if torch.is_tensor(v) else flat_tensors(v, key + ".") if isinstance(v, dict) else {})
    return out


def foreign_record(path, obj, arch, prefix, img_size, stem_padding):
    """The backbone of another code base's checkpoint: the tensors under the first of PREFIXES (or `prefix`) that fill
    every tensor of `arch` (a missing num_batches_tracked excepted); the stem is read off conv1's kernel."""
    tensors = flat_tensors(obj)
    if not tensors:
        raise common.UserError(f"{path} holds no tensors: not the checkpoint of a network")
    if arch not in common.ARCHS:
        raise common.UserError(f"{path} does not name its network; pass --arch" if arch is None else
                               f"{path} holds a {arch}, which this project does not build ({', '.join(common.ARCHS)})")
    models, best = {}, (-1, "", [])
    for p in PREFIXES if prefix == "auto" else (prefix,):
        under = {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
        small = tuple(under["conv1.weight"].shape[-2:]) == (3, 3) if "conv1.weight" in under else False
        if small not in models:
            models[small] = common.build_backbone(arch, small, img_size, stem_padding=stem_padding)[0].state_dict()
        expected = models[small]
        fits = [k for k, v in expected.items() if k in under and under[k].shape == v.shape]
        best = max(best, (len(fits), p, [k for k in expected if k not in fits]), key=lambda b: b[0])
        if all(k.endswith("num_batches_tracked") for k in expected if k not in fits):
            epoch = obj["epoch"] if isinstance(obj.get("epoch"), int) else None
            return {"method": "foreign", "arch": arch, "small_images": small, "img_size": None, "mean": None,
                    "prefix": p, "stem_padding": stem_padding, "epoch": epoch, "loaded": len(fits),
                    "state_dict": {k: under[k] if k in fits else v for k, v in expected.items()}}
    (n, p, missing), expected = best, next(iter(models.values()))
    first = next(iter(expected))  # conv1.weight or class_token: the shortest keys ending so show where backbones sit
    examples = sorted((k for k in tensors if k == first or k.endswith("." + first)), key=len)[:3] or list(tensors)[:3]
    raise common.UserError(f"{path} does not fill a {arch}: at best {n} of its {len(expected)} tensors (under "
                           f"'{p}', missing {missing[0]}, ...); its keys look like "
                           f"{', '.join(k[:60] for k in examples)}; name the backbone's prefix with --prefix")


def load_backbone(path, arch=None, prefix="auto", img_size=224, stem_padding=1, unsafe=False):
    """Read a `backbone.pt` record, a full `checkpoint.pt` (its record), or another code base's checkpoint (see
    PREFIXES; `arch` from --arch or the file, `img_size` and `stem_padding` the flags'). If `arch` is given, it must
    match the record's. Returns the record as a dict; a foreign one also has `prefix` and `loaded` (tensors)."""
    obj = read_checkpoint(path, unsafe)
    if isinstance(obj, dict) and isinstance(obj.get("backbone"), dict) and "state_dict_prefix" in obj["backbone"]:
        prefix = obj["backbone"]["state_dict_prefix"]  # a training checkpoint.pt: the record, its weights in "model"
        weights = {k[len(prefix):]: v for k, v in obj["model"].items() if k.startswith(prefix)}
        obj = {k: v for k, v in obj["backbone"].items() if k != "state_dict_prefix"}
        obj["state_dict"] = common.clean_state_dict(weights)
    elif isinstance(obj, dict) and isinstance(obj.get("backbone"), dict) and "state_dict" in obj["backbone"]:
        obj = obj["backbone"]  # a checkpoint.pt of an earlier version, which carried the whole record
    if not isinstance(obj, dict):
        raise common.UserError(f"{path} holds a {type(obj).__name__}, not a checkpoint's dict of tensors")
    named = obj.get("arch") if isinstance(obj.get("arch"), str) else getattr(obj.get("args"), "arch", None)  # DINO's
    if arch is not None and named is not None and arch != named:
        raise common.UserError(f"{path} holds a {named} backbone but --arch is {arch}; "
                               f"pass --arch {named} or another checkpoint")
    is_ours = "state_dict" in obj and "small_images" in obj  # MoCo v3's has state_dict and arch too
    return obj if is_ours else foreign_record(path, obj, named or arch, prefix, img_size, stem_padding)


def backbone_from_record(record, img_size=None):
    """Build the backbone described by a record and load its weights (strict)."""
    img_size = record.get("img_size") or img_size or 224
    model, feat_dim = common.build_backbone(record["arch"], record["small_images"], img_size,
                                            stem_padding=record.get("stem_padding", 1))  # 2: solo-learn's CIFAR BYOL
    try:
        model.load_state_dict(record["state_dict"], strict=True)
    except RuntimeError as e:
        raise common.UserError(f"the checkpoint's weights do not fit {record['arch']} "
                        f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e})") from None
    return model, feat_dim


# ---- --check-data: decode every image of a folder once, before a long run meets a broken file ------------------------
class DecodeCheck(torch.utils.data.Dataset):
    """Item i: "" if image i decodes completely, else its path and the error."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as image:
                image.convert("RGB").load()  # the whole file, not only its header: truncated files fail here
            return ""
        except Exception as e:
            return f"{self.paths[i]} ({type(e).__name__}: {e})"


def check_data(root, workers):
    if not os.path.isdir(root):
        raise common.UserError(f"--check-data {root} is not a folder")
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files if common.is_image_file(f))
    if not paths:
        raise common.UserError(f"no image files under {root}")
    start, bad = time.time(), []
    loader = torch.utils.data.DataLoader(DecodeCheck(paths), batch_size=64, num_workers=workers, collate_fn=list)
    for batch in tqdm(loader, desc="decoding", leave=False):
        bad += [line for line in batch if line]
    seconds = time.time() - start
    for line in bad:
        print(f"unreadable: {line}")
    print(f"{len(paths)} images under {root}: {len(bad)} unreadable; {seconds:.1f} s "
          f"({len(paths) / max(seconds, 1e-9):.0f} images/s with {workers} workers)")
    sys.exit(1 if bad else 0)


# ---- Linear probe on cached features (--mode fast) -------------------------------------------------------------------
def train_linear(features, labels, num_classes, lr, wd, epochs, batch_size, seed):
    """SGD (momentum 0.9) with a per-iteration cosine schedule on fixed features; returns the layer."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    layer = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():  # nn.init.normal_ takes a generator only from torch 2.2 on; Tensor.normal_ always has
        layer.weight.normal_(0.0, 0.01, generator=g)  # drawn on the CPU, where g is, then moved
        layer.bias.zero_()
    layer = layer.to(features.device)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps_per_epoch = max(1, len(features) // batch_size)
    schedule = common.cosine_schedule(lr, 0.0, epochs, steps_per_epoch)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(features), generator=g).to(features.device)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            opt.param_groups[0]["lr"] = schedule[step]
            loss = F.cross_entropy(layer(features[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return layer


@torch.no_grad()
def accuracy(logits, labels):
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 = round((top[:, 0] == labels).float().mean().item() * 100, 2)
    top5 = round((top == labels[:, None]).any(1).float().mean().item() * 100, 2)
    return top1, top5


def fast_linear_probe(ftrain, ytrain, ftest, ytest, num_classes, args):
    """Standardise, sweep lr x wd on a held-out 10 % of the training split, refit on all of it."""
    mean, std = ftrain.mean(0), ftrain.std(0) + 1e-6
    ftrain, ftest = (ftrain - mean) / std, (ftest - mean) / std
    epochs = args.epochs or 100
    lrs = (args.lr,) if args.lr > 0 else FAST_LRS
    wds = (args.wd,) if args.wd >= 0 else FAST_WDS
    perm = torch.randperm(len(ftrain), generator=torch.Generator().manual_seed(args.seed)).to(ftrain.device)
    n_val = max(1, len(ftrain) // 10)
    held, fit = perm[:n_val], perm[n_val:]
    grid = [(lr, wd) for lr in lrs for wd in wds]
    sweep = {}
    for lr, wd in grid if len(grid) > 1 else []:
        layer = train_linear(ftrain[fit], ytrain[fit], num_classes, lr, wd, epochs, args.batch_size, args.seed)
        sweep[(lr, wd)] = accuracy(layer(ftrain[held]), ytrain[held])[0]
    lr, wd = max(sweep, key=sweep.get) if sweep else grid[0]
    layer = train_linear(ftrain, ytrain, num_classes, lr, wd, epochs, args.batch_size, args.seed)
    top1, top5 = accuracy(layer(ftest), ytest)
    return {"top1": top1, "top5": top5, "mode": "fast", "lr": lr, "weight_decay": wd, "epochs": epochs,
            "batch_size": args.batch_size, "optimizer": "SGD momentum 0.9, cosine, no warmup",
            "features": "standardised with the training split's mean and std",
            "sweep_heldout_top1": {f"lr={k[0]},wd={k[1]}": v for k, v in sweep.items()}}


# ---- Linear probe on augmented images with the frozen backbone (--mode full) -----------------------------------------
class ProbeAugmentation:
    """RandomResizedCrop + flip (ImageNet-sized images) or pad-4 RandomCrop + flip (small images)."""

    def __init__(self, img_size, small_images, mean, std):
        crop = (v2.Compose([v2.Resize(img_size), v2.RandomCrop(img_size, padding=4, padding_mode="reflect")])
                if small_images else v2.RandomResizedCrop(img_size, interpolation=v2.InterpolationMode.BICUBIC))
        self.transform = v2.Compose([crop, v2.RandomHorizontalFlip(), *common.to_normalized_tensor(mean, std)])

    def __call__(self, image, label):
        return self.transform(image), label


class FrozenProbe(nn.Module):
    """A frozen backbone (eval mode, no gradient) followed by a trainable linear layer."""

    def __init__(self, backbone, feat_dim, num_classes):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.linear = nn.Linear(feat_dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def train(self, mode=True):  # the backbone stays in eval mode: batch-norm statistics are frozen
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images):
        with torch.no_grad():
            features = self.backbone(images)
        return self.linear(features.float())


def full_linear_probe(backbone, feat_dim, train_set, test_set, num_classes, info, ddp, args, autocast):
    epochs = args.epochs or 90
    lr = (args.lr or 0.1) * args.batch_size / 256
    wd = max(args.wd, 0.0)
    probe = common.to_device(FrozenProbe(backbone, feat_dim, num_classes), ddp.device)
    augmentation = ProbeAugmentation(info["img_size"], info["small_images"], info["mean"], info["std"])
    loader = common.train_loader(train_set, augmentation, args.batch_size // ddp.world_size, ddp, args.workers,
                                 args.seed, args.subset)
    linear = DistributedDataParallel(probe.linear) if ddp.distributed else probe.linear
    opt = torch.optim.SGD(probe.linear.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    schedule = common.cosine_schedule(lr, 0.0, epochs, len(loader))
    step = 0
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        probe.train()
        for images, labels in tqdm(loader, desc=f"linear epoch {epoch + 1}/{epochs}", disable=not ddp.is_main,
                                   leave=False):
            images = images.to(ddp.device, non_blocking=True)
            if ddp.device.type == "cuda":  # the layout of the backbone's weights (common.to_device)
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(ddp.device, non_blocking=True)
            opt.param_groups[0]["lr"] = schedule[step]
            with torch.no_grad(), autocast():
                features = probe.backbone(images)
            loss = F.cross_entropy(linear(features.float()), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    logits, labels = common.extract_features(probe, test_set, args.batch_size, args.workers, ddp.device,
                                             autocast)
    top1, top5 = accuracy(logits, labels)
    return {"top1": top1, "top5": top5, "mode": "full", "lr": lr, "base_lr": args.lr or 0.1, "weight_decay": wd,
            "epochs": epochs, "batch_size": args.batch_size,
            "optimizer": "SGD momentum 0.9, cosine, no warmup",
            "augmentation": "RandomCrop(pad 4) + flip" if info["small_images"] else "RandomResizedCrop + flip"}


def check_unchanged(backbone, loaded):
    """MoCo v3's sanity check: a frozen-feature evaluation leaves every tensor bit for bit as it was loaded."""
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v.cpu(), loaded[k].to(v.dtype))]
    if changed:
        raise RuntimeError(f"the backbone changed during the evaluation ({len(changed)} tensors, e.g. {changed[0]}): "
                           "a bug in this script; no result written")


# ---- The evaluation: the record, its features, kNN, the linear probe -------------------------------------------------
def main():
    args = get_args_parser().parse_args()
    if args.check_data is not None:
        return check_data(args.check_data, args.workers)
    ddp = common.init_distributed()
    check_args(args, ddp.world_size)
    random.seed(args.seed)
    np.random.seed(args.seed % 2**32)
    torch.manual_seed(args.seed)
    t0 = time.time()

    # -------------------------------------------------------------------- checkpoint and data
    record = None if args.ckpt == "random" else load_backbone(args.ckpt, args.arch, args.prefix, args.img_size or 224,
                                                              args.stem_padding, args.unsafe_load)
    train_raw = common.build_dataset(args.data, "train", args.data_dir, args.download)
    test_raw = common.build_dataset(args.data, "val", args.data_dir, args.download)
    num_classes = common.num_classes_of(train_raw)
    if num_classes == 0 or test_raw is None:
        raise common.UserError(f"--data {args.data} needs labelled train/ and val/ (or test/) splits for evaluation")
    # the record's sizes; for a random network the training scripts' crop-size policy; other code bases' checkpoints
    # have no record of their images: the stem read off conv1, the flags' mean and std, 224 px for the ImageNet stem
    small, policy_size, _ = common.crop_sizes(common.native_image_size(train_raw))
    small = record["small_images"] if record else small
    img_size = args.img_size or (record and record.get("img_size")) or (policy_size if small else 224)
    mean, std = (record["mean"], record["std"]) if record and record["mean"] else (args.mean, args.std)
    info = {"img_size": img_size, "small_images": small, "mean": mean, "std": std}

    # -------------------------------------------------------------------- backbone
    if record is None:
        torch.manual_seed(args.seed)
        backbone, feat_dim = common.build_backbone(args.arch, small, img_size, stem_padding=args.stem_padding)
    else:
        backbone, feat_dim = backbone_from_record(record, img_size)
        foreign = (f" under '{record['prefix']}'; no record of its images: the {'CIFAR' if small else 'ImageNet'} "
                   f"stem (read off conv1), {img_size} px, mean {mean}, std {std} (--img-size, --stem-padding, --mean,"
                   " --std)") if "prefix" in record else ""
        if ddp.is_main:  # weights silently not loaded are the usual cause of "far below the paper"
            print(f"{args.ckpt}: loaded {record.get('loaded', len(record['state_dict']))} of the "
                  f"{len(record['state_dict'])} tensors of its {record['arch']}{foreign}")
    loaded = record["state_dict"] if record else {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone = common.to_device(backbone, ddp.device).requires_grad_(False).eval()
    autocast, _ = common.mixed_precision(args.precision, ddp.device)

    # -------------------------------------------------------------------- features, kNN, linear probe
    tf = common.eval_transform(img_size, small, mean, std)
    train_indices = common.EpochSampler(len(train_raw), seed=args.seed, subset=args.subset).indices
    train_eval = common.Transformed(train_raw, tf, train_indices)
    test_eval = common.Transformed(test_raw, tf)
    ftrain, ytrain = common.extract_features(backbone, train_eval, args.batch_size, args.workers, ddp.device, autocast)
    ftest, ytest = common.extract_features(backbone, test_eval, args.batch_size, args.workers, ddp.device, autocast)
    if (ytrain < 0).all():
        raise common.UserError(f"the training split of {args.data} has no labels")
    knn1, knn5 = common.knn_classify(ftrain, ytrain, ftest, ytest, num_classes, args.knn_k, args.knn_t)
    results = {"knn": {"top1": knn1, "top5": knn5, "k": args.knn_k, "temperature": args.knn_t}}
    if args.mode == "fast":
        labelled = ytrain >= 0
        if ddp.is_main:
            results["linear"] = fast_linear_probe(ftrain[labelled], ytrain[labelled], ftest, ytest, num_classes, args)
    else:
        train_probe = train_raw if args.subset == 0 else torch.utils.data.Subset(train_raw, train_indices)
        results["linear"] = full_linear_probe(backbone, feat_dim, train_probe, test_eval, num_classes, info, ddp,
                                              args, autocast)
    check_unchanged(backbone, loaded)

    # -------------------------------------------------------------------- report (rank 0, written atomically)
    if not ddp.is_main:
        return
    results["linear"]["backbone_unchanged"] = True
    data_name = os.path.basename(os.path.normpath(args.data))
    results.update({
        "ckpt": args.ckpt, "method": record["method"] if record else "random",
        "arch": record["arch"] if record else args.arch, "trained_epochs": record.get("epoch") if record else 0,
        "data": args.data, "num_classes": num_classes, "train_images": len(train_eval), "test_images": len(test_eval),
        "img_size": img_size, "small_images": small, "feat_dim": feat_dim, "processes": ddp.world_size,
        "prefix": record.get("prefix") if record else None, "mean": list(mean), "std": list(std),
        "seconds": round(time.time() - t0, 1)})
    out = args.out or (os.path.dirname(os.path.abspath(args.ckpt)) if record else f"runs/eval_random_{args.arch}")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"eval_{data_name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)
    print(f"\n{results['method']} {results['arch']} on {data_name} "
          f"({len(train_eval)} train / {len(test_eval)} test images)")
    print(f"{'protocol':<24}{'top-1':>8}{'top-5':>8}")
    print(f"{'kNN (k=%d, T=%g)' % (args.knn_k, args.knn_t):<24}{knn1:>8.2f}{knn5:>8.2f}")
    lin = results["linear"]
    print(f"{'linear (' + lin['mode'] + ')':<24}{lin['top1']:>8.2f}{lin['top5']:>8.2f}")
    print(f"wrote {path} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    common.run_main(main)
