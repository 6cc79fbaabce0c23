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

Implementation details (choices that matter)
1. The backbone runs once per crop resolution, on all global crops and on all local crops (batch norm
   statistics are per resolution group; one call if both sizes are equal); the pooled features are in crop order
   [global, local_1 .. local_n] and go through the projector as one batch.
2. The projector l2-normalises its input; Linear layers start from a truncated normal (std 0.02).
3. Order inside a step (the reference's): prototypes from the memory as it is (so a batch never scores
   against itself), online logits, momentum update and forward of the global crops, memory write, loss.
4. The memory stores raw (not normalised) momentum-projector outputs of the global crop only, gathered
   from every process, so that all ranks hold the same memory. As in the reference, a write that would
   run past the last slot fills it and drops the rest of the batch; the next write starts at slot 0.
   Empty slots carry label -1 and never count: a class not in the memory yet has a zero prototype
   (logit 0), and the first step's loss is exactly ln(C).
5. The momentum encoder (backbone + projector) follows the online one with a constant EMA of 0.999
   (`--ema`), on parameters only, and always runs in train mode (batch statistics).
6. Logits and the loss are computed in fp32, averaged over all B x (1 + n_local) crop-samples.
7. SGD (momentum 0.9, not Nesterov), lr 0.1 x batch/256, naver/trex's schedule step for step: a per-iteration
   linear warmup from 0 over 10 % of training (10 of the paper's 100 epochs) whose last step is at the peak, then
   a cosine that reaches 1e-6 after the last step; weight decay 1e-4 on weights (ndim >= 2) only. No label
   smoothing, mixup, cutmix or gradient clipping. resnet_tiny (the CPU demo) defaults to lr 0.8 and EMA 0.99.
8. `--projector-layers 0` removes the projector; without a memory the classifier is then nn.Linear with
   bias on the pooled features (torchvision's ResNet). The reference's 0-layer projector is Projector(d, 0).
9. Each epoch (both off with --eval-every 0) the own classifier's top-1 and top-5 on the validation
   split, from the online encoder in eval mode with the prototypes of the current memory (OCM) or the
   learned classifier, as the reference evaluates; under torchrun, a check that every process holds
   the same parameters and memory.
10. Crop sizes come from the dataset as a whole, never from one image (common.crop_sizes): the
   reference's 224 / 96 px on images above 64 px, whatever their size; on smaller ones see (c) below.
11. The workers decode, crop and flip; the colour operations run batched on the training device (one
   call for the global crops, one for the local ones), each crop with its own parameters drawn in the
   worker (common.ColorAugmentation, torchvision's distributions).

Compared with the reference code. On the same weights and inputs,
`test_training_step_equals_the_reference_computation` recomputes a training step the reference's way from this
module's parts and checks the loss and every gradient within 1e-5. Deliberate differences: (a) the reference starts
from a memory of random features with random labels, noise in the prototypes for the first K/B steps; here empty
slots never count (detail 4). (b) Logits in fp32 (the reference: fp16 under autocast). (c) Small images (the
reference trains on ImageNet only): native-size crops, the CIFAR stem, no blur, local crops at the references' 96/224
of the global size to a multiple of 8, every script's policy (24 px at 64 and 56 px, 16 at 40 and 32; half the global
size would give 32 at 64 px); a --global-size other than 224 scales the blur sigma by global size / 224. (d) The CPU
demo's values for resnet_tiny (detail 7, 512-wide hidden layers); warmup is 10 % of --epochs (the reference: 10
epochs, the same at 100). (e) The validation resize is bicubic (the reference: bilinear). (f) As many classes as the
dataset has (prototypes, classifier), where the reference has 1,000 whatever the data: the same on ImageNet-1K;
elsewhere its softmax also spans 1,000 - C classes without images. (g) Colour operations, blur and precision as in
every script here (common.ColorAugmentation says how they differ). (h) Under torchrun, DDP does not broadcast buffers
(the memory is identical on every rank by construction), and the class prototypes are l2-normalised twice (in
class_prototypes, then in cosine_logits: the second changes them only by rounding).

Commands
    python trex.py                                            # CPU demo on synthetic shapes, ~2 minutes on 2 cores
    python trex.py --data data/cifar10 --arch resnet18 --epochs 100 --batch-size 256 --eval-every 10
    # the paper's recipe (ResNet-50, ImageNet-1K, 100 epochs, global batch 256); --recipe trex_star for t-ReX*:
    torchrun --nproc_per_node=8 trex.py --data /imagenet --arch resnet50 --epochs 100 --batch-size 256 --recipe trex
    # the ordinary supervised baseline:
    python trex.py --n-local 0 --projector-layers 0 --memory-size 0
Then `python eval_linear.py --ckpt runs/trex/backbone.pt --data synthetic` evaluates the features.
"""
import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import common

# The recipe, in one place: the paper's values (for 100 ImageNet epochs, warmup 10 % of them), the three
# variants of --recipe (Sec. 4: the projector depth and the scale split between global and local crops), then
# the CPU demo's changes for resnet_tiny; each value can be overridden by its flag.
PAPER_DEFAULTS = dict(lr=0.1, ema=0.999, hidden_dim=2048)
RECIPES = {
    "trex": dict(projector_layers=3, scale_split=0.25, memory_size=8192),       # best transfer
    "trex_star": dict(projector_layers=1, scale_split=0.40, memory_size=8192),  # best ImageNet top-1
    "plain": dict(projector_layers=3, scale_split=0.25, memory_size=0),         # learnable cosine classifier
}
# The paper's lr and EMA are made for 100 ImageNet epochs: in the demo's 248 steps the network hardly learns with
# them (numbers: README); the demo network has 128-d features, so a 2048-wide MLP would dominate a step.
DEMO_DEFAULTS = dict(lr=0.8, ema=0.99, hidden_dim=512)  # for --arch resnet_tiny only


# ---- Options ---------------------------------------------------------------------------------------------------------
def get_args_parser():
    p = argparse.ArgumentParser("trex", formatter_class=common.HelpFormatter, description="t-ReX / t-ReX*: supervised "
                                "training with multi-crop, an expendable projector and online class-mean prototypes")
    # the CPU demo: 4 epochs of 4,000 synthetic images (248 steps of 64) fit the 3-minute budget on 2 cores
    common.add_common_args(p, "trex", epochs=4, batch_size=64, wd=1e-4, warmup_epochs="a tenth of --epochs",
                           lr=f"the paper's {PAPER_DEFAULTS['lr']}, resnet_tiny {DEMO_DEFAULTS['lr']}",
                           eval_every=4, demo_subset=4000)
    by_recipe = lambda name: ", ".join(f"{r} {v[name]}" for r, v in RECIPES.items())
    g = p.add_argument_group("t-ReX options (unset ones follow --recipe)")
    g.add_argument("--recipe", default="trex", choices=tuple(RECIPES), help="trex: 3 hidden projector layers, "
                   "scale split 0.25, OCM (best transfer); trex_star: 1 layer, split 0.40, OCM (best accuracy on the "
                   "training classes); plain: as trex with a learnable cosine classifier instead of OCM")
    g.add_argument("--projector-layers", type=int, default=None, help="hidden layers of the projector (more "
                   "layers: better transfer, lower top-1); 0 = no projector, the classifier reads the pooled features "
                   f"(default: by --recipe: {by_recipe('projector_layers')})")
    g.add_argument("--hidden-dim", type=int, default=None, help="width of the projector's hidden layers (default: "
                   f"the paper's {PAPER_DEFAULTS['hidden_dim']}, resnet_tiny {DEMO_DEFAULTS['hidden_dim']})")
    g.add_argument("--bottleneck-dim", type=int, default=256, help="output dimension of the projector")
    g.add_argument("--memory-size", type=int, default=None, help="entries of the OCM memory; 0 = a learned "
                   f"classifier instead of prototypes (default: by --recipe: {by_recipe('memory_size')})")
    g.add_argument("--tau", type=float, default=0.1, help="temperature of the cosine softmax")
    g.add_argument("--ema", "--momentum", dest="ema", type=float, default=None,
                   help="momentum of the encoder that fills the memory (constant, no schedule; default: the paper's "
                        f"{PAPER_DEFAULTS['ema']}, resnet_tiny {DEMO_DEFAULTS['ema']})")
    g.add_argument("--n-local", type=int, default=8, help="local crops per image (0 = single-crop training)")
    g.add_argument("--scale-split", type=float, default=None,
                   help="global crops take (s, 1) of the image area, local crops (0.05, s) (default: by --recipe: "
                        f"{by_recipe('scale_split')}; without local crops 0.08, RandomResizedCrop's own)")
    g.add_argument("--global-size", type=int, default=None,
                   help="global crop side (default: the reference's 224, whatever the images' size; the native "
                        f"size on datasets of images of {common.SMALL_IMAGES} px or less, e.g. 32 on CIFAR)")
    g.add_argument("--local-size", type=int, default=None,
                   help="local crop side (default: the reference's 96; on datasets of images of "
                        f"{common.SMALL_IMAGES} px or less 96/224 of the global size, a multiple of 8: 16 at 32 px)")
    g.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine schedule")
    return p


def resolve_recipe(args, native):
    """Fill the options left unset (the tables above; crops from the images' shorter side `native`, detail 10)
    and return (small_images, the recipe as printed and logged, the peak lr: --lr x batch / 256)."""
    defaults = dict(PAPER_DEFAULTS, **RECIPES[args.recipe], warmup_epochs=args.epochs / 10)
    if args.arch == "resnet_tiny":
        defaults.update(DEMO_DEFAULTS)
    if not args.n_local:  # single-crop training: the standard RandomResizedCrop range
        defaults["scale_split"] = 0.08
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    small, args.global_size, args.local_size = common.crop_sizes(native, args.global_size, args.local_size)
    lr = args.lr * args.batch_size / 256
    projector = (f"{args.projector_layers} x {args.hidden_dim} -> {args.bottleneck_dim}" if args.projector_layers
                 else "none")
    classifier = (f"OCM ({args.memory_size} entries)" if args.memory_size else
                  "learned cosine" if args.projector_layers else "learned linear")
    crops = f"1 x {args.global_size} px (scale {args.scale_split} to 1)" + (
        f" + {args.n_local} x {args.local_size} px (0.05 to {args.scale_split})" if args.n_local else "")
    return small, dict(lr=f"{lr:.4g} ({args.lr} x {args.batch_size}/256, cosine to {args.min_lr:g})",
                       wd=f"{args.wd:g} (weights only)", optimizer="SGD (momentum 0.9)",
                       warmup=f"{args.warmup_epochs:g} epochs",
                       ema=f"{args.ema} (constant)" if args.memory_size else "none (no memory)",
                       projector=projector, classifier=classifier, tau=args.tau, crops=crops), lr


def check_args(args):
    """Bad t-ReX options: one sentence, before any data is read (unset ones are resolved later)."""
    unset_or = lambda value, ok: value is None or ok(value)  # unset: resolve_recipe fills it in from the tables
    if not (unset_or(args.projector_layers, lambda v: v >= 0) and unset_or(args.hidden_dim, lambda v: v >= 1)
            and args.bottleneck_dim >= 1):
        raise common.UserError("--projector-layers must not be negative and --hidden-dim, --bottleneck-dim positive")
    if not unset_or(args.memory_size, lambda v: v >= 0) or args.n_local < 0:
        raise common.UserError("--memory-size and --n-local must not be negative")
    if not unset_or(args.scale_split, lambda s: 0.05 < s < 1 or (args.n_local == 0 and 0 < s < 1)):
        raise common.UserError(f"--scale-split {args.scale_split} must lie between 0.05 and 1 (local crops take "
                               "(0.05, s) of the image, global crops (s, 1))")
    if args.tau <= 0 or not unset_or(args.ema, lambda v: 0 <= v < 1) or args.min_lr < 0:
        raise common.UserError("--tau must be positive, --ema in [0, 1) and --min-lr not negative")
    if min(args.global_size or 8, args.local_size or 8) < 8:
        raise common.UserError("--global-size and --local-size must be at least 8 pixels")


# ---- Augmentation: 1 global + n local crops, every crop keeps the image's label (Sec. 3.1) ---------------------------
class MultiCropAugmentation:
    """One image -> ([global crop, local crop 1, .., local crop n], label). Global: RandomResizedCrop(global_size,
    scale (s, 1), bicubic), flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, Gaussian blur
    p 0.2, solarize p 0.2. Local: RandomResizedCrop(local_size, scale (0.05, s)), the same but blur p 0.5 and
    no solarize. Blur sigma is 0.1 to 2 px at 224 px global crops (on the 96 px local crops too, as in the
    reference) and scales with the global size; `small` images (64 px or less) are not blurred."""

    def __init__(self, global_size=224, local_size=96, n_local=8, scale_split=0.25, small=False,
                 mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD):
        def crop(size, scale):  # in the worker; the colour operations run on the device (on_device)
            return v2.Compose([v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC),
                               v2.RandomHorizontalFlip()])
        self.global_crop, self.local_crop = crop(global_size, (scale_split, 1.0)), crop(local_size, (0.05, scale_split))
        colour = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, sigma=(0.1, 2.0),
                      blur_scale=global_size / 224, mean=mean, std=std)  # the blur sigma follows the global size
        blur = 0.0 if small else 1.0
        self.global_colour = common.ColorAugmentation(blur_p=0.2 * blur, solarize_p=0.2, **colour)
        self.local_colour = common.ColorAugmentation(blur_p=0.5 * blur, solarize_p=0.0, **colour)
        self.n_local = n_local

    def __call__(self, image, target):
        return ([self.global_colour.view(self.global_crop, image)] +
                [self.local_colour.view(self.local_crop, image) for _ in range(self.n_local)]), target

    def torchvision(self):
        """The crops as the reference composes them, torchvision transforms of a PIL image in the worker (no
        on_device; slower with few CPU cores): [the global crop's, a local crop's], image -> normalised float tensor."""
        return [self.global_colour.torchvision(self.global_crop), self.local_colour.torchvision(self.local_crop)]

    def on_device(self, crops, device):
        """The collated crops -> [global, local 1, .., local n] normalised on `device` (one call per kind)."""
        return self.global_colour.on_device(crops[:1], device) + (
            self.local_colour.on_device(crops[1:], device) if self.n_local else [])


# ---- Model: projector, classifiers, OCM memory, the training step ----------------------------------------------------
# Copy kit: Projector, cosine_logits, class_prototypes, multicrop_cross_entropy, OCMMemory, TReX, MultiCropAugmentation
# for the crops; from common: momentum_update, all_gather_nograd (no-op in one process), cosine_schedule (the lr).
# TReX.forward(crops, labels) changes state: after the online logits it moves the momentum encoder by the constant
# `ema` and writes the global crops' keys to the memory (update_memory, detail 3). Call it once per training step;
# evaluate with `predict` (no state change): another forward, even in eval mode, advances the EMA and the memory.
# Labels are class indices >= 0 (-1: the memory's empty slots). Several GPUs: nn.SyncBatchNorm (run.distribute()
# converts when several CUDA processes run), DDP with broadcast_buffers=False (the memories agree by construction).
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
    """naver/trex's FIFO memory of (feature, label) pairs (detail 4: a write past the last slot drops the rest, empty
    slots hold -1). Every rank writes the same gathered batch (rank order) at the same pointer: identical memories,
    and N processes x batch B write what 1 x N*B writes."""

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
                 memory_size=8192, tau=0.1, ema=0.999):
        super().__init__()
        self.num_classes, self.tau, self.ema = num_classes, tau, ema
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

    def train(self, mode=True):
        """model.train() / model.eval(), but the momentum encoder stays in train mode (detail 5: batch statistics)."""
        super().train(mode)
        if self.kind == "ocm":
            self.momentum_backbone.train()
            self.momentum_projector.train()
        return self

    def embed(self, crops):
        """z = g(f(x)) of all crops: one backbone call per resolution (one in all if the local crops have the global
        size, as the reference's MultiCropWrapper), one projector call for all."""
        one = all(c.shape[-2:] == crops[0].shape[-2:] for c in crops)
        features = [self.backbone(torch.cat(group)) for group in ([crops] if one else (crops[:1], crops[1:]))]
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
        online_params = [*self.backbone.parameters(), *self.projector.parameters()]
        momentum_params = [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]
        common.momentum_update(momentum_params, online_params, self.ema)  # xi <- m xi + (1 - m) theta
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


def classifier_accuracy(model, val_set, workers, device, autocast):
    """Top-1 / top-5 (%) of the model's own classifier on the validation split (every rank gets them)."""
    top, labels = common.extract_features(_TopPredictions(model), val_set, 256, workers, device, autocast)
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


# ---- Training --------------------------------------------------------------------------------------------------------
def main():
    # ---------------------------------------------------------------- plumbing: processes, flags, seeds
    args = get_args_parser().parse_args()
    ddp = common.init_run(args, check_args)

    # ---------------------------------------------------------------- data, recipe
    train_set = common.build_dataset(args.data, "train", args.data_dir, args.download)
    num_classes = common.num_classes_of(train_set)
    if num_classes < 2:  # a single class: the loss would be 0 from the first step
        raise common.UserError(f"--data {args.data} has labels for {num_classes} class(es); t-ReX is a supervised "
                               "method and needs at least two classes (one subfolder per class)")
    native = common.native_image_size(train_set)
    small, recipe, lr = resolve_recipe(args, native)  # before the log header, so that it is logged
    if ddp.is_main:
        print(common.describe_sizes(native, small, **{"global": args.global_size, "local": args.local_size}))
    knn = (common.KNNMonitor(args.data, args.data_dir, args.global_size, small, args.workers, ddp.device, args.subset,
                             args.seed, args.download, args.eval_subset, train=train_set) if args.eval_every else None)
    # the own classifier's top-1 / top-5 on the validation split, every epoch (off with --eval-every 0)
    val_set = knn.val if knn is not None and knn.enabled else None
    augmentation = MultiCropAugmentation(args.global_size, args.local_size, args.n_local, args.scale_split, small)
    loader = common.train_loader(train_set, augmentation, args.batch_size // ddp.world_size, ddp, args.workers,
                                 args.seed, args.subset)

    # ---------------------------------------------------------------- model (t-ReX: projector + OCM classifier)
    backbone, feat_dim = common.build_backbone(args.arch, small, args.global_size)
    model = common.to_device(TReX(backbone, feat_dim, num_classes, args.projector_layers, args.hidden_dim,
                                  args.bottleneck_dim, args.memory_size, args.tau, args.ema), ddp.device)

    # ---------------------------------------------------------------- optimizer, schedules, precision
    optimizer = torch.optim.SGD(common.param_groups(model, args.wd), lr=0.0, momentum=0.9)
    lr_schedule = common.cosine_schedule(lr, args.min_lr, args.epochs, len(loader), args.warmup_epochs,
                                         endpoint=False)  # naver/trex's, step for step
    autocast, scaler = common.mixed_precision(args.precision, ddp.device)  # the EMA is constant: no schedule

    def evaluate():  # detail 9: the model's own classifier; under torchrun, identical replicas
        stats = {}
        if val_set is not None:
            stats["classifier_top1"], stats["classifier_top5"] = classifier_accuracy(
                model, val_set, args.workers, ddp.device, autocast)
        if ddp.distributed:
            check_replicas_agree(model)
        return stats

    # ---------------------------------------------------------------- plumbing: resume, compile + DDP, output
    run = common.TrainingRun(args, ddp, model, optimizer, scaler, autocast, backbone=model.backbone, recipe=recipe,
                             record=dict(method="trex", small_images=small, img_size=args.global_size,
                                         feat_dim=feat_dim))
    start_epoch = run.resume()  # from --out's checkpoint.pt, if any: weights, optimizer, scaler, RNG, position
    # SyncBatchNorm on several GPUs, torch.compile, DDP under torchrun; no buffer broadcast: memories agree (detail 4)
    train_model = run.distribute(broadcast_buffers=False)
    run.start(knn)  # log.jsonl's header, the recipe line, the kNN monitor at random init

    # ---------------------------------------------------------------- the epochs, each of training steps (t-ReX)
    for epoch in range(start_epoch, args.epochs):
        for step, (crops, labels) in run.steps(loader, epoch):
            crops = augmentation.on_device(crops, ddp.device)  # the colour operations, batched (detail 11)
            labels = labels.to(ddp.device, non_blocking=True)
            common.set_lr(optimizer, lr_schedule[step])
            with autocast():  # a training forward also moves the EMA and writes the memory (detail 3)
                loss = train_model(crops, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            run.log({"loss": loss}, lr=lr_schedule[step])
        run.end_epoch(epoch, evaluate())  # mean loss, detail 9, kNN (--eval-every), log, checkpoint.pt, backbone.pt
    run.finish()


if __name__ == "__main__":
    common.run_main(main)
