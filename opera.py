"""OPERA: omni-supervised representation learning with a class head on top of MoCo v3.

Paper: "OPERA: Omni-Supervised Representation Learning with Hierarchical Supervisions",
Chengkun Wang, Wenzhao Zheng, Zheng Zhu, Jie Zhou, Jiwen Lu, ICCV 2023, arXiv 2210.05557.
Reference code: github.com/wangck20/OPERA, a small change to MoCo v3 (Chen, Xie, He, arXiv 2104.02057).

The idea. Contrastive self-supervision and supervised classification are both similarity objectives
that differ only in what a positive pair is: two views of one image, or two images of one class.
Imposed on the same embedding they fight: the instance term pushes apart the images of a class that
the class term pulls together. OPERA computes a hierarchy of proxy representations from the backbone
features Y, Y_self = g(Y) and Y_full = h(Y_self), and puts the self-supervised loss on the lower one
and the supervised loss on the higher one (eqs. 8-9); the objective is their sum (eq. 13). Here g is
MoCo v3's projector + predictor (its output q is the contrastive query) and h a small MLP class head
on q. Labelled and unlabelled images train together ("omni-supervised"): an image without a label
gets only the self-supervised term (`--labeled-fraction`, the setting of the paper's Table 8).
With `--sup-weight 0` the class head is not built and this file is plain MoCo v3: the baseline of
all of the paper's comparisons.

Implementation details (choices the paper leaves to its code)
1. The loss is the reference code's, not eq. 13 verbatim:
   L = 0.5 (ctr(q1, k2) + ctr(q2, k1)) + w (CE(z1, y) + CE(z2, y)), w = --sup-weight = 0.5,
   where ctr is MoCo v3's InfoNCE times 2T: InfoNCE and class terms weigh 1 : 0.5 for ResNets (T = 1) and
   0.2 : 0.5 for ViTs (T = 0.2), where eq. 13 weighs them equally.
2. Negatives are the other keys of the global batch, gathered from every process without gradient
   (no queue); the positive of query i on process r is key i + r * B_local. DDP's gradient averaging then
   gives exactly the gradient of one process holding the whole batch (tests/test_opera.py checks this).
3. The momentum encoder (backbone + projector, no predictor, no class head) is updated before the
   keys are computed, from the online weights of the current step, with m rising from 0.99 to 1 on a
   per-iteration cosine: m(t) = 1 - (1 - 0.99)(1 + cos(pi t / T_total)) / 2.
4. The class cross-entropy is computed in fp32 over labelled views only (label -1 = none) and divided
   by the number of labelled views in the global batch, so that a partly labelled batch split over
   processes trains exactly like one process, and a batch without labels gives 0 (not NaN). With
   every image labelled this is the plain mean of the reference code.
5. Every Linear of the MLPs has no bias; the projector ends with BN(affine=False) (SimCLR's last BN
   without gamma), the predictor does too for ViTs only. The class head Linear-BN-ReLU-Linear reads the
   unnormalised q, and its gradient flows through the predictor, projector and backbone.
6. ResNets: the last BN of each residual block starts at zero (not the tiny demo network, which then
   learns slower). ViTs are MoCo v3's (common.ViT: ViT-S with 12 heads, a fixed 2-D sin-cos position
   embedding, MoCo v3's initialisation), the patch embedding random and frozen (MoCo v3, Sec. 5).
7. Each view goes through each network in a call of its own, as in the reference: BatchNorm (SyncBatchNorm
   on several GPUs) normalises over the B images of one view. One call on both views (2B images) would
   be faster, but it mixes the views' statistics and changes the gradient.
8. lr = base x batch / 256, linear warmup per iteration then cosine to 0. LARS (ResNets) excludes
   biases and BN from weight decay and adaptation; AdamW (ViTs) decays every parameter, as MoCo v3.
9. `--labeled-fraction F` keeps the label of round(F n) of the n training images in use, chosen by a
   permutation seeded by --seed: the same images on every process, whatever the data order.
10. Reported each epoch: both loss terms, lr, the momentum (`ema`), images/s, the class head's top-1 on the
   validation split (online network in eval mode), and every --eval-every epochs the kNN monitor (0: neither).
11. The workers decode, crop and flip; the colour operations run batched on the training device, each
   image with its own parameters drawn in the worker (common.ColorAugmentation, torchvision's distributions).

Compared with the reference code (wangck20/OPERA on facebookresearch/moco-v3)
Equal: the augmentation (bilinear RandomResizedCrop at 224 px, BYOL's asymmetric colour ops), the
networks and their initialisation, the calls (one per view and network), the loss and its weighting,
the momentum update before the keys, the schedules. tests/test_opera.py computes a step the
reference's way, by hand from this file's modules, and checks the loss and every gradient (fp32, 1e-5).
Deliberate differences: the class loss over partly labelled batches (detail 4); on images of 64 px or less
(no such recipe in the reference) crops at the native size, the CIFAR stem and no blur
(common.ColorAugmentation); the cosine lr lands on 0 at the last step (the reference's per-iteration formula
reaches 0 one step after the end); the class head has one output per class of the dataset (the reference:
1,000 whatever the data); the validation resize is bicubic (the reference's is bilinear); the monitors run
every epoch under autocast and report no recall@1. Colour operations, blur and precision as in every script
here (common.ColorAugmentation says how they differ).

Commands
    python opera.py                                                   # CPU demo, synthetic shapes, ~2 min
    python opera.py --data cifar10 --download --arch resnet18 --epochs 200 --batch-size 512   # one GPU
    torchrun --nproc_per_node=8 opera.py --data /imagenet --arch resnet50 --epochs 150 --batch-size 1024
    # paper recipes (ImageNet-1K, 8 GPUs per node; multi-node: torchrun with --rdzv-endpoint):
    torchrun --nproc_per_node=8 opera.py --data /imagenet --arch resnet50 --epochs 300 --batch-size 1024
    torchrun --nproc_per_node=8 opera.py --data /imagenet --arch vit_small --epochs 300 --batch-size 1024
    # the MoCo v3 baseline: add --sup-weight 0; the omni-supervised setting: --labeled-fraction 0.1
"""
import argparse
import copy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import common

# The recipe, in one place: the paper's two columns (MoCo v3's), chosen from --arch, then the CPU demo's
# changes for resnet_tiny; each value can be overridden by its flag.
PAPER_DEFAULTS = {
    "resnet": dict(optimizer="lars", lr=0.3, wd=1e-6, temperature=1.0, warmup_epochs=10, crop_min=0.2),
    "vit": dict(optimizer="adamw", lr=1.5e-4, wd=0.1, temperature=0.2, warmup_epochs=40, crop_min=0.08),
}
# The CPU demo (resnet_tiny, 400 steps on 32 px shapes) learns nothing in that time with LARS at base lr
# 0.3 and 10 warmup epochs, values made for 100+ epochs of ImageNet; crops of 0.2 of a 32 px image often
# miss the shape. Measured on an earlier version of the synthetic data (600 steps of 64): kNN top-1 11 %
# with the paper's values, 28 % with these, 10 % at init (today's demo: README).
DEMO_DEFAULTS = dict(lr=2.4, warmup_epochs=1, crop_min=0.5)


# ---- Options ---------------------------------------------------------------------------------------------------------
def get_args_parser():
    parser = argparse.ArgumentParser(description="OPERA (MoCo v3 + a class head): omni-supervised pretraining",
                                     formatter_class=common.HelpFormatter)
    by_arch = lambda name: (f"by --arch: ResNet {PAPER_DEFAULTS['resnet'][name]}, ViT {PAPER_DEFAULTS['vit'][name]}"
                            + (f", resnet_tiny {DEMO_DEFAULTS[name]}" if name in DEMO_DEFAULTS else ""))
    common.add_common_args(parser, "opera", epochs=8, batch_size=64, lr=by_arch("lr"), wd=by_arch("wd"),
                           warmup_epochs=by_arch("warmup_epochs"), eval_every=4, demo_subset=3200)
    g = parser.add_argument_group("OPERA options")
    g.add_argument("--sup-weight", type=float, default=0.5,
                   help="weight w of the class terms w (CE(z1, y) + CE(z2, y)); 0 = plain MoCo v3 (no class head)")
    g.add_argument("--labeled-fraction", type=float, default=1.0,
                   help="fraction of the training images that keep their label (seeded); the others get only "
                        "the self-supervised term (the omni-supervised setting, paper's Table 8)")
    g.add_argument("--temperature", type=float, default=None,
                   help=f"InfoNCE temperature T (default: {by_arch('temperature')})")
    g.add_argument("--optimizer", choices=("lars", "adamw"), default=None,
                   help=f"optimizer (default: {by_arch('optimizer')})")
    g.add_argument("--crop-min", type=float, default=None,
                   help=f"smallest RandomResizedCrop scale (default: {by_arch('crop_min')})")
    g.add_argument("--crop-size", type=int, default=None,
                   help="side of both views (default: 224, or the native size of images of 64 px or less)")
    g.add_argument("--ema", "--base-momentum", dest="ema", type=float, default=0.99,
                   help="momentum encoder: m rises from this value to 1 on a per-iteration cosine")
    g.add_argument("--dim", type=int, default=256, help="output size of the projector and predictor (q, k)")
    g.add_argument("--mlp-dim", type=int, default=4096, help="hidden size of the projector and predictor MLPs")
    return parser


def resolve_recipe(args, native):
    """Fill the options left unset (the tables above; crops from the images' shorter side `native`) and
    return (small_images, the recipe as printed and logged, the peak lr: --lr x batch / 256)."""
    defaults = dict(PAPER_DEFAULTS["vit" if args.arch.startswith("vit") else "resnet"])
    if args.arch == "resnet_tiny":
        defaults.update(DEMO_DEFAULTS)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    small, args.crop_size, _ = common.crop_sizes(native, args.crop_size)  # 224, or native on small images
    optimizer, lr = "LARS (eta 0.001)" if args.optimizer == "lars" else "AdamW", args.lr * args.batch_size / 256
    return small, dict(lr=f"{lr:.4g} ({args.lr} x {args.batch_size}/256, cosine to 0)", wd=args.wd,
                       optimizer=optimizer, warmup=f"{args.warmup_epochs} epochs", ema=f"{args.ema} -> 1 (cosine)",
                       temperature=args.temperature, crop=f"{args.crop_size} px"), lr


def check_args(args):
    """Bad OPERA options: one sentence, before any data is read (unset ones are resolved later)."""
    if args.sup_weight < 0:
        raise common.UserError(f"--sup-weight {args.sup_weight} must not be negative (0 = plain MoCo v3)")
    if not 0 <= args.labeled_fraction <= 1:
        raise common.UserError(f"--labeled-fraction {args.labeled_fraction} must be between 0 and 1")
    if args.temperature is not None and args.temperature <= 0:
        raise common.UserError(f"--temperature {args.temperature} must be positive")
    if args.crop_min is not None and not 0 < args.crop_min <= 1:
        raise common.UserError(f"--crop-min {args.crop_min} must be in (0, 1]")
    if args.crop_size is not None and args.crop_size < 8:
        raise common.UserError(f"--crop-size {args.crop_size} must be at least 8 pixels")
    if not 0 <= args.ema <= 1:
        raise common.UserError(f"--ema {args.ema} must be between 0 and 1")
    if args.dim < 1 or args.mlp_dim < 1:
        raise common.UserError("--dim and --mlp-dim must be positive")


# ---- Data: two asymmetric views (BYOL / MoCo v3) and the seeded labelled fraction ------------------------------------
class TwoViewAugmentation:
    """(image, label) -> (view1, view2, label). Both views: RandomResizedCrop(scale=(crop_min, 1)), flip,
    colour jitter p 0.8, grayscale p 0.2; view 1 always blurred, view 2 blurred with p 0.1 and solarized
    with p 0.2 (BYOL's asymmetric pair); `small` images (64 px or less) are not blurred. The worker crops
    and flips (a view is a uint8 image and its colour parameters); `on_device` applies the colour
    operations to the batch on the training device; `torchvision()`: the same in one pipeline per view."""

    def __init__(self, crop_size, crop_min, small=False, mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD):
        self.geometric = v2.Compose([v2.RandomResizedCrop(crop_size, scale=(crop_min, 1.0)), v2.RandomHorizontalFlip()])
        colour = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, sigma=(0.1, 2.0),
                      blur_scale=crop_size / 224, mean=mean, std=std)  # sigma in px at 224 px crops
        blur = 0.0 if small else 1.0  # the blur probability of view 1; view 2's is a tenth of it
        self.colour1 = common.ColorAugmentation(blur_p=blur, solarize_p=0.0, **colour)
        self.colour2 = common.ColorAugmentation(blur_p=0.1 * blur, solarize_p=0.2, **colour)

    def __call__(self, image, label):
        return self.colour1.view(self.geometric, image), self.colour2.view(self.geometric, image), label

    def torchvision(self):
        """The two views as the reference composes them, torchvision transforms of a PIL image in the worker (no
        on_device; slower with few CPU cores): [view 1's, view 2's], each image -> normalised float tensor."""
        return [self.colour1.torchvision(self.geometric), self.colour2.torchvision(self.geometric)]

    def on_device(self, view1, view2, device):
        return self.colour1.on_device([view1], device)[0], self.colour2.on_device([view2], device)[0]


def labeled_indices(indices, fraction, seed):
    """The round(fraction * n) of these image indices that keep their label: a permutation seeded by
    `seed` alone, so every process (and every resumed run) picks the same images."""
    indices = np.sort(np.asarray(indices))  # independent of the order in which they are given
    order = np.random.default_rng([seed, 2210_05557]).permutation(len(indices))
    return np.sort(indices[order[: round(fraction * len(indices))]])


class PartiallyLabeled(torch.utils.data.Dataset):
    """A dataset whose images outside `keep` (indices) lose their label (-1): the omni-supervised setting."""

    def __init__(self, dataset, keep):
        self.dataset, self.classes = dataset, getattr(dataset, "classes", None)
        self.labeled = np.zeros(len(dataset), dtype=bool)  # a mask, compact even for ImageNet
        self.labeled[keep] = True

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return image, label if self.labeled[index] else -1


# ---- Model: MoCo v3's online and momentum networks plus OPERA's class head; the loss ---------------------------------
# Copy kit: mlp, contrastive_loss, class_loss, OPERA (build_model: zero-init residuals), TwoViewAugmentation for the
# views; from common: all_gather_nograd and all_reduce_sum (no-ops in one process), momentum_update, cosine_schedule.
# OPERA does not move its momentum encoder: the loop calls common.momentum_update(*model.momentum_pairs(), m) before
# each forward (MoCo v3's order), m on a per-step cosine; forgotten, the keys come from the random init, no error.
# forward changes no other state than BatchNorm's running statistics. Label -1 = no label (PartiallyLabeled): that
# image gets the contrastive term only. Several GPUs: DDP after nn.SyncBatchNorm.convert_sync_batchnorm (done by
# run.distribute() in main when several CUDA processes run); the losses assume DDP's gradient averaging (details 2, 4).
def mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn):
    """Linear (no bias) -> BN -> ReLU blocks, then a last Linear (no bias), optionally BN(affine=False)."""
    layers = []
    for i in range(num_layers):
        d_in, d_out = in_dim if i == 0 else hidden_dim, out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def contrastive_loss(q, k, temperature):
    """MoCo v3's InfoNCE times 2T. Keys are gathered from every process without gradient; the
    positive of local query i is global key i + rank * B_local; all other keys are negatives."""
    with torch.autocast(q.device.type, enabled=False):  # logits in fp32
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        keys = common.all_gather_nograd(k)
        logits = q @ keys.t() / temperature
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        positives = torch.arange(len(q), device=q.device) + rank * len(q)
        return 2 * temperature * F.cross_entropy(logits, positives)


def class_loss(logits, labels):
    """Cross-entropy over the labelled samples (label -1 = none) of the global batch, in fp32, divided by their
    global count times the number of processes: after DDP's gradient averaging, one process holding the whole batch
    (detail 4)."""
    with torch.autocast(logits.device.type, enabled=False):
        total = F.cross_entropy(logits.float(), labels, ignore_index=-1, reduction="sum")
    count = common.all_reduce_sum((labels >= 0).sum().float())  # no gradient needed through the count
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return total * world / count.clamp(min=1)


class OPERA(nn.Module):
    """Online network (backbone -> projector -> predictor -> q = Y_self), class head (q -> z = Y_full)
    and momentum encoder (backbone + projector -> keys k). `forward` is the training step."""

    def __init__(self, backbone, feat_dim, num_classes, vit=False, dim=256, mlp_dim=4096, temperature=1.0,
                 sup_weight=0.5):
        super().__init__()
        self.temperature, self.sup_weight = temperature, sup_weight
        if vit:  # MoCo v3: a random, frozen patch embedding stabilises ViT training
            backbone.conv_proj.requires_grad_(False)
        self.backbone = backbone
        self.projector = mlp(3 if vit else 2, feat_dim, mlp_dim, dim, last_bn=True)
        self.predictor = mlp(2, dim, mlp_dim, dim, last_bn=vit)
        # h: Y_self -> Y_full (eq. 9); the reference's `fully_projector`
        self.class_head = mlp(2, dim, dim, num_classes, last_bn=False) if num_classes else None
        self.momentum_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def momentum_pairs(self):
        """(momentum encoder parameters, matching online parameters), for common.momentum_update."""
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        target = [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]
        return target, online

    def forward(self, view1, view2, labels):
        # One call per view and network, as MoCo v3 and OPERA's code make them (detail 7): every BatchNorm
        # normalises over the B images of one view, and the two views never share batch statistics.
        q1, q2 = [self.predictor(self.projector(self.backbone(v))) for v in (view1, view2)]  # Y_self (a list, not
        with torch.no_grad():  # a generator: torch 2.1's compiler splits the graph at a generator's unpacking)
            k1, k2 = [self.momentum_projector(self.momentum_backbone(v)) for v in (view1, view2)]
        loss_self = 0.5 * (contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature))
        if self.class_head is None:  # --sup-weight 0: plain MoCo v3
            return {"loss": loss_self, "loss_self": loss_self, "loss_class": torch.zeros_like(loss_self)}
        z1, z2 = self.class_head(q1), self.class_head(q2)  # Y_full = h(Y_self): class logits, per view
        loss_class = class_loss(z1, labels) + class_loss(z2, labels)
        # The reference code's weighting (detail 1); eq. 13 of the paper writes J_self + J_full.
        return {"loss": loss_self + self.sup_weight * loss_class, "loss_self": loss_self, "loss_class": loss_class}


def build_model(args, num_classes, small_images, img_size):
    """OPERA around a fresh backbone. ResNets start with zero-init residual branches (MoCo v3's choice),
    except the 4-block demo network, which then needs several times more steps to start learning."""
    backbone, feat_dim = common.build_backbone(args.arch, small_images, img_size,
                                               zero_init_residual=args.arch != "resnet_tiny")
    model = OPERA(backbone, feat_dim, num_classes, args.arch.startswith("vit"), args.dim, args.mlp_dim,
                  args.temperature, args.sup_weight)
    return model, feat_dim


@torch.no_grad()
def class_head_top1(model, val_set, workers, device, autocast):
    """Top-1 (%) of the class head on the validation split: online network in eval mode."""
    network = nn.Sequential(model.backbone, model.projector, model.predictor, model.class_head)
    logits, labels = common.extract_features(network, val_set, 256, workers, device, autocast)
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


# ---- Training --------------------------------------------------------------------------------------------------------
def main():
    # ---------------------------------------------------------------- plumbing: processes, flags, seeds
    args = get_args_parser().parse_args()
    ddp = common.init_run(args, check_args)

    # ---------------------------------------------------------------- data, recipe
    train_set = common.build_dataset(args.data, "train", args.data_dir, args.download, with_unlabeled=True)
    num_classes = common.num_classes_of(train_set) if args.sup_weight > 0 else 0
    if args.sup_weight > 0 and num_classes < 2:  # one class: the class loss is 0 from the first step
        raise common.UserError(f"--data {args.data} has labels for {num_classes} class(es); OPERA's class head needs "
                               "at least two: add labelled classes or pass --sup-weight 0 to train plain MoCo v3")
    native = common.native_image_size(train_set)
    small, recipe, lr = resolve_recipe(args, native)  # before the log header, so that it is logged
    if ddp.is_main:
        print(common.describe_sizes(native, small, crop=args.crop_size))
    knn = (common.KNNMonitor(args.data, args.data_dir, args.crop_size, small, args.workers, ddp.device, args.subset,
                             args.seed, args.download, args.eval_subset, train=train_set) if args.eval_every else None)
    # the class head's top-1 on the validation split, every epoch (off with --eval-every 0)
    val_set = knn.val if num_classes and knn is not None and knn.enabled else None
    if args.labeled_fraction < 1:  # the omni-supervised setting: a seeded part of the images keeps its label
        in_use = common.EpochSampler(len(train_set), subset=args.subset, seed=args.seed).indices
        train_set = PartiallyLabeled(train_set, labeled_indices(in_use, args.labeled_fraction, args.seed))
    augmentation = TwoViewAugmentation(args.crop_size, args.crop_min, small)
    loader = common.train_loader(train_set, augmentation, args.batch_size // ddp.world_size, ddp, args.workers,
                                 args.seed, args.subset)

    # ---------------------------------------------------------------- model (OPERA: MoCo v3 + class head)
    model, feat_dim = build_model(args, num_classes, small, args.crop_size)
    model = common.to_device(model, ddp.device)
    momentum_params, online_params = model.momentum_pairs()

    # ---------------------------------------------------------------- optimizer, schedules, precision
    if args.optimizer == "lars":
        optimizer = common.LARS(common.param_groups(model, args.wd), momentum=0.9, trust_coefficient=0.001)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], weight_decay=args.wd,
                                      fused=ddp.device.type == "cuda")
    lr_schedule = common.cosine_schedule(lr, 0.0, args.epochs, len(loader), args.warmup_epochs)
    # m(t) = 1 - (1 - m0)(1 + cos(pi t / T)) / 2 per iteration, MoCo v3's (detail 3)
    ema_schedule = common.cosine_schedule(args.ema, 1.0, args.epochs, len(loader), endpoint=False)
    autocast, scaler = common.mixed_precision(args.precision, ddp.device)

    def evaluate():  # detail 10: the class head on the validation split
        return {"head_top1": class_head_top1(model, val_set, args.workers, ddp.device, autocast)} if val_set else {}

    # ---------------------------------------------------------------- plumbing: resume, compile + DDP, output
    run = common.TrainingRun(args, ddp, model, optimizer, scaler, autocast, backbone=model.backbone, recipe=recipe,
                             record=dict(method="opera" if num_classes else "mocov3", small_images=small,
                                         img_size=args.crop_size, feat_dim=feat_dim))
    start_epoch = run.resume()  # from --out's checkpoint.pt, if any: weights, optimizer, scaler, RNG, position
    train_model = run.distribute()  # SyncBatchNorm on several GPUs, torch.compile, DDP under torchrun
    run.start(knn)  # log.jsonl's header, the recipe line, the kNN monitor at random init

    # ---------------------------------------------------------------- the epochs, each of training steps (OPERA)
    for epoch in range(start_epoch, args.epochs):
        for step, (view1, view2, labels) in run.steps(loader, epoch):
            view1, view2 = augmentation.on_device(view1, view2, ddp.device)  # colour ops, batched (detail 11)
            labels = labels.to(ddp.device, non_blocking=True)
            common.set_lr(optimizer, lr_schedule[step])
            # MoCo v3's and OPERA's order: the momentum encoder moves before the keys, to this step's weights (detail 3)
            common.momentum_update(momentum_params, online_params, ema_schedule[step])
            with autocast():
                losses = train_model(view1, view2, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            run.log(losses, lr=lr_schedule[step], ema=ema_schedule[step])
        # the epoch's end: mean losses, the class head's top-1 (detail 10), the kNN monitor every --eval-every epochs,
        # the log line, checkpoint.pt (to resume) and backbone.pt
        run.end_epoch(epoch, evaluate())
    run.finish(note=common.SELF_SUPERVISED_DEMO if not num_classes and args.data == "synthetic" else None)


if __name__ == "__main__":
    common.run_main(main)
