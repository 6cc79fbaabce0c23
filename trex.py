"""t-ReX and t-ReX*: supervised training that transfers like self-supervision.

Paper: "No Reason for No Supervision: Improved Generalization in Supervised Models",
Mert Bulent Sariyildiz, Yannis Kalantidis, Karteek Alahari, Diane Larlus. ICLR 2023, arXiv 2206.15369.
Reference code: github.com/naver/trex.

The idea. A network trained with labels is the best on its own classes but transfers worse to new
tasks than a self-supervised one. Three ingredients of self-supervised learning close the gap while
keeping the labels: (a) multi-crop, 1 global and 8 local crops per image, each trained with the
image's label; (b) an expendable MLP projector between the backbone and the classifier, thrown away
after training; (c) a cosine-softmax classifier whose class vectors are not learned but are the
means of the classes in a memory of momentum-encoder features (OCM, "online class means"). The
projector depth and the crop scales set the trade-off between accuracy on the training classes and
transfer: t-ReX (3 hidden layers, scale split 0.25) transfers best, t-ReX* (1 hidden layer, split
0.40) is the most accurate on ImageNet. `--recipe plain` uses a learnable cosine classifier instead
of OCM; `--n-local 0 --projector-layers 0 --memory-size 0` is the paper's supervised baseline.

Implementation details (choices that matter and are easy to miss)
1. The backbone runs once per crop resolution, on all global crops and on all local crops (batch norm
   statistics are per resolution group); the pooled features are concatenated in crop order
   [global, local_1 .. local_n] and go through the projector as one batch.
2. The projector l2-normalises its input; Linear layers start from a truncated normal (std 0.02).
3. Order inside a step (the reference's): prototypes from the memory as it is (so a batch never scores
   against itself), online logits, momentum update and forward of the global crops, memory write, loss.
4. The memory stores raw (not normalised) momentum-projector outputs of the global crop only, gathered
   from every process, so that all ranks hold the same memory. As in the reference, a write that would
   run past the last slot fills it and drops the rest of the batch; the next write starts at slot 0.
   Empty slots carry label -1 and never count: a class not in the memory yet has a zero prototype
   (logit 0), and the first step's loss is exactly ln(C).
5. The momentum encoder (backbone + projector) follows the online one with a constant 0.999, on
   parameters only, and always runs in train mode (batch statistics).
6. Logits and the loss are computed in fp32, averaged over all B x (1 + n_local) crop-samples.
7. SGD (momentum 0.9, not Nesterov), lr 0.1 x batch/256 with a per-iteration linear warmup from 0
   over 10 % of training (10 of the paper's 100 epochs), then cosine to 1e-6; weight decay 1e-4 on
   weights (ndim >= 2) only. No label smoothing, mixup, cutmix or gradient clipping. The CPU demo
   network (resnet_tiny) defaults to lr 0.8 and momentum 0.99 instead: a few hundred steps, not 500k.
8. `--projector-layers 0` removes the projector; without a memory the classifier is then nn.Linear with
   bias on the pooled features (torchvision's ResNet). The reference's 0-layer projector is Projector(d, 0).
9. The own-classifier top-1 on the validation split uses the online encoder in eval mode with the
   prototypes of the current memory (OCM) or the learned classifier, as the reference evaluates.
10. Crop sizes come from the dataset as a whole, never from one image: the reference's 224 / 96 px on
   images above 64 px, whatever their size; native and half (CIFAR: 32 / 16) on smaller ones.
11. The workers decode, crop and flip; the colour operations run batched on the training device (one
   call for the global crops, one for the local ones), each crop with its own parameters drawn in the
   worker (common.ColorAugmentation, torchvision's distributions): a third of a worker's time per image.

Compared with the reference code. On the same weights and inputs, a training step (loss and every
gradient) agrees with naver/trex within 8e-7 relative (an independent audit); the test
`test_training_step_equals_the_reference_computation` recomputes a step the reference's way from this
module's parts and checks it within 1e-5. Deliberate differences: (a) the reference starts from a
memory of random features with random labels, noise in the prototypes for the first K/B steps; here
empty slots never count (detail 4). (b) Logits in fp32 (the reference's are fp16 under autocast).
(c) Small images (the reference trains on ImageNet only): native-size crops, the CIFAR stem, and a blur
sigma scaled by global size / 224 (at 224 px the reference's 0.1 to 2 px on every crop). (d) The CPU
demo's values for resnet_tiny (detail 7, 512-wide hidden layers); warmup is 10 % of --epochs (the
reference: 10 epochs, the same at 100). (e) The validation resize is bicubic (the reference: bilinear).
(f) The colour operations run on float images on the device (detail 11), the reference's on PIL images:
an exact Gaussian blur cut at 3 sigma instead of PIL's box approximation, solarize on the unrounded value.

Commands
    python trex.py                                            # CPU demo on synthetic shapes, ~2 minutes on 2 cores
    python trex.py --data data/cifar10 --arch resnet18 --epochs 100 --batch-size 256 --eval-every 10
    # the paper's recipe (ResNet-50, ImageNet-1K, 100 epochs, global batch 256); --recipe trex_star for t-ReX*:
    torchrun --nproc_per_node=8 trex.py --data /imagenet --arch resnet50 --epochs 100 --batch-size 256 --recipe trex
    # the ordinary supervised baseline:
    python trex.py --n-local 0 --projector-layers 0 --memory-size 0
Evaluate the features with `python eval_linear.py --ckpt runs/trex/backbone.pt --data synthetic`.
"""
import argparse
import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2
from tqdm import tqdm

import common

# Sec. 4 of the paper: the projector depth and the scale split between global and local crops.
RECIPES = {
    "trex": dict(projector_layers=3, scale_split=0.25, memory_size=8192),       # best transfer
    "trex_star": dict(projector_layers=1, scale_split=0.40, memory_size=8192),  # best ImageNet top-1
    "plain": dict(projector_layers=3, scale_split=0.25, memory_size=0),         # learnable cosine classifier
}


def get_args_parser():
    p = argparse.ArgumentParser("trex", description="t-ReX / t-ReX*: supervised training with multi-crop, "
                                "an expendable projector and online class-mean prototypes",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # the CPU demo: 4 epochs of 4,000 synthetic images (248 steps of 64) fit the 3-minute budget on 2 cores
    common.add_common_args(p, "trex", epochs=4, batch_size=64, lr=None, wd=1e-4, warmup_epochs=None,
                           eval_every=4, demo_subset=4000)
    g = p.add_argument_group("t-ReX options (unset ones follow --recipe)")
    g.add_argument("--recipe", default="trex", choices=tuple(RECIPES),
                   help="trex: 3 hidden projector layers, scale split 0.25, OCM (best transfer); trex_star: 1 "
                        "layer, split 0.40, OCM (best accuracy on the training classes); plain: as trex with a "
                        "learnable cosine classifier instead of OCM")
    g.add_argument("--projector-layers", type=int, default=None,
                   help="hidden layers of the projector (more layers: better transfer, lower top-1); "
                        "0 = no projector, the classifier reads the pooled features")
    g.add_argument("--hidden-dim", type=int, default=None,
                   help="width of the projector's hidden layers (paper: 2048; default 512 for resnet_tiny)")
    g.add_argument("--bottleneck-dim", type=int, default=256, help="output dimension of the projector")
    g.add_argument("--memory-size", type=int, default=None,
                   help="entries of the OCM memory (paper: 8192); 0 = a learned classifier instead of prototypes")
    g.add_argument("--tau", type=float, default=0.1, help="temperature of the cosine softmax")
    g.add_argument("--momentum", type=float, default=None,
                   help="momentum of the encoder that fills the memory (constant, no schedule; paper: 0.999)")
    g.add_argument("--n-local", type=int, default=8, help="local crops per image (0 = single-crop training)")
    g.add_argument("--scale-split", type=float, default=None,
                   help="global crops take (s, 1) of the image area, local crops (0.05, s); without local "
                        "crops the default is 0.08, the standard RandomResizedCrop range")
    g.add_argument("--global-size", type=int, default=None,
                   help="global crop side (default: the reference's 224, whatever the images' size; the native "
                        f"size on datasets of images of {common.SMALL_IMAGES} px or less, e.g. 32 on CIFAR)")
    g.add_argument("--local-size", type=int, default=None,
                   help="local crop side (default: the reference's 96; half the global size on datasets of "
                        f"images of {common.SMALL_IMAGES} px or less)")
    g.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine schedule")
    return p


# The paper's lr (0.1 x batch/256) and momentum (0.999) are made for 100 ImageNet epochs; in the demo's 248 steps
# the network would hardly learn: measured kNN top-1 21 % at init, 28 % after the demo with them, 38 % with these.
DEMO_DEFAULTS = dict(lr=0.8, momentum=0.99)  # for --arch resnet_tiny only


def resolve_defaults(args):
    """Fill the options left unset: first from --recipe, then from the paper's ratios."""
    for key, paper in dict(lr=0.1, momentum=0.999).items():
        if getattr(args, key) is None:
            setattr(args, key, DEMO_DEFAULTS[key] if args.arch == "resnet_tiny" else paper)
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value if key != "scale_split" or args.n_local else 0.08)
    if args.hidden_dim is None:  # the CPU demo network has 128-d features: a 2048-wide MLP would dominate a step
        args.hidden_dim = 512 if args.arch == "resnet_tiny" else 2048
    if args.warmup_epochs is None:
        args.warmup_epochs = args.epochs / 10  # the paper warms up for 10 of its 100 epochs
    return args


def resolve_crop_sizes(args, native):
    """Crop sides from `native` = common.native_image_size(train set) (detail 10); returns small_images."""
    small = native <= common.SMALL_IMAGES
    args.global_size = args.global_size or (native if small else 224)
    args.local_size = args.local_size or (args.global_size // 2 if small else 96)
    return small


def check_trex_args(args):
    if args.projector_layers < 0 or args.hidden_dim < 1 or args.bottleneck_dim < 1:
        raise common.UserError("--projector-layers must not be negative and --hidden-dim, --bottleneck-dim positive")
    if args.memory_size < 0 or args.n_local < 0:
        raise common.UserError("--memory-size and --n-local must not be negative")
    if not 0.05 < args.scale_split < 1 and not (args.n_local == 0 and 0 < args.scale_split < 1):
        raise common.UserError(f"--scale-split {args.scale_split} must lie between 0.05 and 1 (local crops take "
                               "(0.05, s) of the image, global crops (s, 1))")
    if args.tau <= 0 or not 0 <= args.momentum < 1 or args.min_lr < 0:
        raise common.UserError("--tau must be positive, --momentum in [0, 1) and --min-lr not negative")
    if min(args.global_size or 8, args.local_size or 8) < 8:
        raise common.UserError("--global-size and --local-size must be at least 8 pixels")


# ----------------------------------------------------------------------------------------------
# Augmentation: 1 global + n local crops, every crop keeps the image's label (Sec. 3.1)
# ----------------------------------------------------------------------------------------------
class MultiCropAugmentation:
    """One image -> ([global crop, local crop 1, .., local crop n], label). Global: RandomResizedCrop(global_size,
    scale (s, 1), bicubic), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, Gaussian blur
    p 0.2, solarize p 0.2. Local: RandomResizedCrop(local_size, scale (0.05, s)), the same but blur p 0.5 and
    no solarize. Blur sigma is 0.1 to 2 px at 224 px global crops (on the 96 px local crops too, as in the
    reference) and scales with the global size."""

    def __init__(self, global_size=224, local_size=96, n_local=8, scale_split=0.25,
                 mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD):
        def crop(size, scale):  # in the worker; the colour operations run on the device (on_device)
            return v2.Compose([v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC),
                               v2.RandomHorizontalFlip()])
        self.global_crop, self.local_crop = crop(global_size, (scale_split, 1.0)), crop(local_size, (0.05, scale_split))
        colour = dict(blur_scale=global_size / 224, mean=mean, std=std)  # the blur sigma follows the global size
        self.global_colour = common.ColorAugmentation(blur_p=0.2, solarize_p=0.2, **colour)
        self.local_colour = common.ColorAugmentation(blur_p=0.5, **colour)
        self.n_local = n_local

    def __call__(self, image, target):
        return ([self.global_colour.view(self.global_crop, image)] +
                [self.local_colour.view(self.local_crop, image) for _ in range(self.n_local)]), target

    def on_device(self, crops, device):
        """The collated crops -> [global, local 1, .., local n] normalised on `device` (one call per kind)."""
        return self.global_colour.on_device(crops[:1], device) + (
            self.local_colour.on_device(crops[1:], device) if self.n_local else [])


# ----------------------------------------------------------------------------------------------
# Model: projector, classifiers, OCM memory, the training step
# ----------------------------------------------------------------------------------------------
class Projector(nn.Module):
    """The expendable projector g (Sec. 3.2): l2-normalise, L x [Linear -> BatchNorm -> GELU], then a
    bias-free Linear bottleneck. Thrown away after training: transfer uses the backbone's features."""

    def __init__(self, in_dim, hidden_layers=3, hidden_dim=2048, out_dim=256):
        super().__init__()
        layers, dim = [], in_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU()]
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=False))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features):
        return self.mlp(F.normalize(features, dim=1))


def cosine_logits(embeddings, class_vectors, tau):
    """Cosine softmax logits (Sec. 3.2): <l2n(class vector), l2n(z)> / tau, computed in fp32."""
    return F.normalize(embeddings.float(), dim=1) @ F.normalize(class_vectors.float(), dim=1).t() / tau


def class_prototypes(memory_features, memory_labels, num_classes):
    """OCM class vectors (Sec. 3.3): the l2-normalised sum of the memory features of each class. Empty slots
    (label -1) add nothing; a class without entries gets the zero vector (logit 0). No host sync on the GPU."""
    valid = (memory_labels >= 0).unsqueeze(1).to(memory_features.dtype)
    sums = memory_features.new_zeros(num_classes, memory_features.shape[1])
    sums.index_add_(0, memory_labels.clamp(min=0), memory_features * valid)
    return F.normalize(sums, dim=1)


def multicrop_cross_entropy(logits, labels):
    """Cross-entropy averaged over all B x n_crops crop-samples; `logits` are in crop-major order
    [all global crops, all local_1 crops, ...] and every crop carries its image's label."""
    n_crops = logits.shape[0] // labels.shape[0]
    return F.cross_entropy(logits.float(), labels.repeat(n_crops))


class OCMMemory(nn.Module):
    """FIFO memory of (feature, label) pairs written with the features of every process, as naver/trex's:
    a write that would run past the last slot fills it and drops the rest of the batch; the next write
    starts at slot 0. Empty slots hold label -1 and never count. Every rank writes the same gathered batch
    (rank order) at the same pointer: identical memories, and N processes x batch B write what 1 x N*B writes.
    """

    def __init__(self, size, dim):
        super().__init__()
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to overwrite

    @torch.no_grad()
    def write(self, features, labels):
        size = self.labels.shape[0]
        features = common.all_gather_nograd(features.float())[:size]
        labels = common.all_gather_nograd(labels)[:size]
        slots = self.ptr + torch.arange(labels.shape[0], device=labels.device)  # on device: no host sync
        fits, slots = slots < size, slots % size  # what does not fit rewrites what its slot holds (no clash)
        self.features.index_copy_(0, slots, torch.where(fits[:, None], features, self.features[slots]))
        self.labels.index_copy_(0, slots, torch.where(fits, labels, self.labels[slots]))
        self.ptr.copy_((self.ptr + labels.shape[0]) * (self.ptr + labels.shape[0] < size))

    def prototypes(self, num_classes):
        return class_prototypes(self.features, self.labels, num_classes)


class TReX(nn.Module):
    """Backbone + projector + classifier; `forward(crops, labels)` is one training step, returns the loss.
    The classifier: "ocm" (prototypes of a memory filled by a momentum encoder), "cosine" (learnable class
    vectors, the plain variant) or "linear" (no projector, no memory: nn.Linear with bias, the baseline)."""

    def __init__(self, backbone, feat_dim, num_classes, projector_layers=3, hidden_dim=2048, bottleneck_dim=256,
                 memory_size=8192, tau=0.1, momentum=0.999):
        super().__init__()
        self.num_classes, self.tau, self.momentum = num_classes, tau, momentum
        self.backbone = backbone
        self.projector = (Projector(feat_dim, projector_layers, hidden_dim, bottleneck_dim) if projector_layers
                          else nn.Identity())
        dim = bottleneck_dim if projector_layers else feat_dim
        if memory_size:
            self.kind = "ocm"
            self.momentum_backbone = copy.deepcopy(backbone).requires_grad_(False)
            self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
            self.memory = OCMMemory(memory_size, dim)
        else:
            self.kind = "cosine" if projector_layers else "linear"
            self.classifier = nn.Linear(dim, num_classes, bias=self.kind == "linear")

    def embed(self, crops):
        """z = g(f(x)) of all crops: one backbone call per resolution, one projector call for all."""
        features = [self.backbone(torch.cat(group)) for group in (crops[:1], crops[1:]) if group]
        return self.projector(torch.cat(features))

    def class_logits(self, z, prototypes=None):
        with torch.autocast(z.device.type, enabled=False):  # logits in fp32
            if self.kind == "ocm":
                return cosine_logits(z, prototypes, self.tau)
            if self.kind == "cosine":
                return cosine_logits(z, self.classifier.weight, self.tau)
            return self.classifier(z.float())

    @torch.no_grad()
    def update_memory(self, global_crops, labels):
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        target = [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]
        common.momentum_update(target, online, self.momentum)  # xi <- m xi + (1 - m) theta
        keys = self.momentum_projector(self.momentum_backbone(global_crops))
        self.memory.write(keys.float(), labels)  # raw outputs, global crop only

    def forward(self, crops, labels):
        # (1) class prototypes from the memory as it is: the batch never scores against itself
        prototypes = self.memory.prototypes(self.num_classes) if self.kind == "ocm" else None
        # (2) online forward of all crops
        logits = self.class_logits(self.embed(crops), prototypes)
        # (3) momentum update, (4) momentum forward of the global crops, gathered into the memory
        if self.kind == "ocm":
            self.update_memory(crops[0], labels)
        # (5) the loss; backward and the optimizer step follow in the training loop
        return multicrop_cross_entropy(logits, labels)

    @torch.no_grad()
    def predict(self, images):
        """Class logits of the model's own classifier (for evaluation, in eval mode)."""
        prototypes = self.memory.prototypes(self.num_classes) if self.kind == "ocm" else None
        return self.class_logits(self.projector(self.backbone(images)), prototypes)


class _TopPredictions(nn.Module):
    """images -> the top-5 predicted classes, as floats, so that common.extract_features can gather them."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        logits = self.model.predict(images)
        return logits.topk(min(5, logits.shape[1]), dim=1).indices.float()


def classifier_accuracy(model, val_set, batch_size, workers, device, autocast):
    """Top-1 / top-5 (%) of the model's own classifier on the validation split (every rank gets them)."""
    top, labels = common.extract_features(_TopPredictions(model), val_set, batch_size, workers, device, autocast)
    hits = top.long() == labels.view(-1, 1)
    return 100.0 * hits[:, 0].float().mean().item(), 100.0 * hits.any(dim=1).float().mean().item()


@torch.no_grad()
def check_replicas_agree(model):
    """Parameters and the memory must be identical on every process (DDP averages the gradients, the
    memory writes are gathered): compare per-tensor checksums with rank 0's."""
    tensors = [*model.parameters(), *(model.memory.buffers() if model.kind == "ocm" else [])]
    sums = torch.stack([t.double().sum() for t in tensors])[None]
    if not torch.equal(common.all_gather_nograd(sums), sums.expand(torch.distributed.get_world_size(), -1)):
        raise RuntimeError("the processes' models or memories diverged; this is a bug, please report it")


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def main():
    args = resolve_defaults(get_args_parser().parse_args())
    ddp = common.init_distributed()
    common.check_common_args(args, ddp.world_size)
    check_trex_args(args)
    common.seed_everything(args.seed + ddp.rank)

    # ------------------------------------------------------------------------------ data
    train_set = common.build_dataset(args.data, "train", args.data_dir, args.download)
    num_classes = common.num_classes_of(train_set)
    if num_classes < 2:  # a single class: the loss would be 0 from the first step
        raise common.UserError(f"--data {args.data} has labels for {num_classes} class(es); t-ReX is a supervised "
                               "method and needs at least two classes (one subfolder per class)")
    native = common.native_image_size(train_set)
    small = resolve_crop_sizes(args, native)  # before the log header, so that the sizes are logged
    if ddp.is_main:
        print(common.describe_sizes(native, small, **{"global": args.global_size, "local": args.local_size}))
    augmentation = MultiCropAugmentation(args.global_size, args.local_size, args.n_local, args.scale_split)
    per_rank_batch = args.batch_size // ddp.world_size
    loader = common.train_loader(train_set, augmentation, per_rank_batch, ddp, args.workers, args.seed, args.subset)
    knn = (common.KNNMonitor(args.data, args.data_dir, args.global_size, small, per_rank_batch, args.workers,
                             ddp.device, args.subset, args.seed, args.download, args.eval_subset)
           if args.eval_every else None)
    val = common.build_dataset(args.data, "val", args.data_dir, args.download) if args.eval_every else None
    val_set = common.Transformed(val, common.eval_transform(args.global_size, small)) if val else None

    # ------------------------------------------------------------------------------ model
    backbone, feat_dim = common.build_backbone(args.arch, small, args.global_size)
    model = TReX(backbone, feat_dim, num_classes, args.projector_layers, args.hidden_dim, args.bottleneck_dim,
                 args.memory_size, args.tau, args.momentum)
    model = common.to_device(model, ddp.device)
    if ddp.distributed and ddp.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    # ------------------------------------------------------------------------------ optimizer, schedules, precision
    optimizer = torch.optim.SGD(common.param_groups(model, args.wd), lr=0.0, momentum=0.9)
    lr_schedule = common.cosine_schedule(args.lr * args.batch_size / 256, args.min_lr, args.epochs, len(loader),
                                         args.warmup_epochs)
    autocast, scaler = common.mixed_precision(args.precision, ddp.device)

    # ------------------------------------------------------------------------------ resume (also inside an epoch)
    ckpt = common.load_checkpoint(args.out, args, keys_that_must_match=(
        "projector_layers", "hidden_dim", "bottleneck_dim", "memory_size", "n_local", "global_size", "local_size"))
    start_epoch, step, done_in_epoch = common.resume_position(ckpt, len(loader))
    knn_init = None
    if ckpt is not None:  # the memory, its pointer and the momentum encoder are in the model's state_dict
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        knn_init = ckpt["knn_init"]
        common.set_rng_states(ckpt["rng"][ddp.rank % len(ckpt["rng"])])

    # ------------------------------------------------------------------------------ compile, DDP (compile first)
    net = model  # the plain module: its backbone, memory and state_dict
    model = torch.compile(net) if args.compile else net
    if ddp.distributed:  # the memory stays identical by construction: no need to broadcast buffers every step
        model = DistributedDataParallel(model, device_ids=[ddp.local_rank] if ddp.device.type == "cuda" else None,
                                        broadcast_buffers=False)

    # ------------------------------------------------------------------------------ output folder
    log_path = os.path.join(args.out, "log.jsonl")
    if ddp.is_main:
        os.makedirs(args.out, exist_ok=True)
        if ckpt is None:
            common.write_json_line(log_path, common.run_header(args))
    if ckpt is None and knn is not None:
        knn_init = knn(net.backbone, autocast)
        if ddp.is_main and knn_init:
            common.write_json_line(log_path, {"epoch": 0, **knn_init})
            print(f"random-init backbone: kNN top-1 {knn_init['knn_top1']:.1f}%")

    def save(epochs_done, totals):
        """backbone.pt and checkpoint.pt (atomic): at an epoch's end, or inside one (then with the epoch's
        running loss sum over all processes, so that its log line stays exact after the resume)."""
        totals = {k: common.all_reduce_sum(v.clone()) for k, v in totals.items()}  # collectives: every rank
        rng = common.gather_rng_states()
        if ddp.is_main:
            fields = dict(method="trex", arch=args.arch, small_images=small, img_size=args.global_size,
                          feat_dim=feat_dim, args=args, epoch=epochs_done)
            common.save_backbone(os.path.join(args.out, "backbone.pt"), net.backbone, **fields)
            common.atomic_save({"method": "trex", "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                "scaler": scaler.state_dict(), "epoch": epochs_done, "step": step, "totals": totals,
                                "args": common.plain_args(args), "rng": rng, "knn_init": knn_init,
                                "backbone": common.backbone_record(net.backbone, **fields)},
                               os.path.join(args.out, "checkpoint.pt"))

    # ------------------------------------------------------------------------------ training
    preemption = common.Preemption(ddp, args.save_every, sync_every=args.log_every)  # SIGTERM, SIGUSR1
    knn_last = None
    for epoch in range(start_epoch, args.epochs):
        skip = done_in_epoch if epoch == start_epoch else 0  # batches done before a stop inside this epoch
        loader.sampler.set_epoch(epoch, skip=skip * per_rank_batch)
        model.train()
        totals = ({k: v.to(ddp.device) if ddp.is_main else torch.zeros_like(v, device=ddp.device)
                   for k, v in ckpt["totals"].items()} if skip else {"loss": torch.zeros((), device=ddp.device)})
        recent, epoch_timer, bar_timer = [], common.StepTimer(ddp.device), common.StepTimer(ddp.device)
        bar = tqdm(epoch_timer.wrap(loader), total=len(loader), initial=skip, disable=not ddp.is_main,
                   desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for crops, labels in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule[step]
            crops = augmentation.on_device(crops, ddp.device)  # the colour operations, batched (detail 11)
            labels = labels.to(ddp.device, non_blocking=True)
            with autocast():
                loss = model(crops, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            totals["loss"] += loss.detach()
            recent.append(loss.detach())
            epoch_timer.add(args.batch_size)
            bar_timer.add(args.batch_size)
            step += 1
            if step % args.log_every == 0:
                common.check_finite(torch.stack(recent), step)
                bar.set_postfix(loss=f"{recent[-1].item():.3f}", img_s=f"{bar_timer.rate():.0f}")
                recent = []
            action = preemption.poll(step)  # the same answer on every process
            if action:
                save(epoch, totals)
                if action == "stop":
                    preemption.stop(step, args.out)
        if recent:
            common.check_finite(torch.stack(recent), step)
        images_per_s = epoch_timer.rate()

        # ---------------------------------------------------------------------- end of epoch: evaluate, log, save
        mean_loss = common.all_reduce_sum(totals["loss"]).item() / (len(loader) * ddp.world_size)  # steps, ranks
        stats = {"epoch": epoch + 1, "loss": mean_loss, "lr": float(lr_schedule[step - 1]),
                 "images_per_s": images_per_s, "data_wait": epoch_timer.data_wait,
                 "peak_mem_mb": common.peak_memory_mb(ddp.device)}
        if val_set is not None:
            stats["classifier_top1"], stats["classifier_top5"] = classifier_accuracy(
                net, val_set, per_rank_batch, args.workers, ddp.device, autocast)
        if knn is not None and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            knn_last = knn(net.backbone, autocast)
            stats.update(knn_last or {})
        if ddp.distributed:
            check_replicas_agree(net)
        if ddp.is_main:
            common.write_json_line(log_path, stats)
            print(f"epoch {epoch + 1}/{args.epochs}  loss {stats['loss']:.3f}  lr {stats['lr']:.4f}  "
                  f"{images_per_s:.0f} img/s, data wait {stats['data_wait']:.0%}" +
                  "".join(f"  {k} {stats[k]:.1f}%" for k in ("classifier_top1", "knn_top1") if k in stats))
        save(epoch + 1, {})

    if ddp.is_main and knn_init and knn_last:
        print(f"kNN top-1 on the validation split: random-init backbone {knn_init['knn_top1']:.1f}% -> "
              f"trained {knn_last['knn_top1']:.1f}%  (backbone saved to {args.out}/backbone.pt)")
    elif ddp.is_main:
        print(f"{args.out} already holds a model trained for {args.epochs} epochs" if start_epoch >= args.epochs
              else f"done: backbone saved to {args.out}/backbone.pt")


if __name__ == "__main__":
    common.run_main(main)
