"""Rotation prediction as an auxiliary task for self-supervised learning, on SwAV or on BYOL.

Paper: "Towards Efficient and Effective Self-Supervised Learning of Visual Representations",
Sravanti Addepalli, Kaushal Bhogale, Priyam Dey, R. Venkatesh Babu, ECCV 2022, arXiv 2210.09866.
Reference code: val-iisc/EffSSL (SwAV + rotation, ResNet-50, ImageNet-1K).

The idea. Instance-similarity methods (SwAV, BYOL, ...) pull two random augmentations of one image together.
Aggressive crops often land on different objects, so that target is noisy and training needs many iterations.
Predicting which of four rotations (0, 90, 180, 270 degrees) was applied is well posed for any crop (the label is
exact) and needs semantic features, so as an auxiliary loss it makes the base method learn faster, most visibly at
low epoch counts: L = L_base + rot_weight * (CE(head(f(rot(x1))), k1) + CE(head(f(rot(x2))), k2)), with x1, x2 the
two global views, f the shared backbone, the rotation head on its pooled features. `--rot-weight 0`: the base alone.

Implementation details (choices the papers leave out):
 1. Rotations: k uniform in {0, 1, 2, 3} per image and per view, applied after all augmentation and normalisation
    (the reference's), drawn in the augmentation, seeded like it: identical after a resume and for any process count.
 2. Each network sees the batches the reference gives it (batch norm normalises over them): SwAV calls the backbone
    once per crop resolution and the projector once on all crops (EffSSL); BYOL calls each network once per view
    (DeepMind's BYOL, solo-learn); each rotated view is one more backbone call, never in the base loss or the target.
 3. The two cross-entropy terms are summed, not averaged (the reference's `loss_rot1 + loss_rot2`).
 4. SwAV: prototypes l2-normalised before every step, frozen for `--freeze-prototypes-iters`; codes from the two
    global crops by Sinkhorn-Knopp (eps 0.05, 3 iterations) with all-reduced sums: N processes x batch B give the
    codes of one process with batch N*B. swav's queue (off by default, as in EffSSL at batch 1024) takes each step's
    global-crop z after its codes from epoch --epoch-queue-starts on; once full, the codes come from Sinkhorn over
    [queue scored by the current prototypes; batch], batch rows kept. Each process uses its own L / N rows (swav's)
    but holds them all in a buffer: rank 0's checkpoint.pt resumes every process exactly.
 5. Recipes: the table RECIPES, filled in by resolve_recipe() (set flags win), printed as the `recipe:` line.
    SwAV: lr not batch-scaled, swav's schedule step for step (warmup 0.3 -> 1.2 = `--lr` on its last step, cosine
    to 0.0012 after the last step), LARS eta 0.001. BYOL: `--lr` x batch / 256, cosine to 0, tau `--ema` -> 1 on a
    per-iteration cosine; above 64 px DeepMind's ImageNet recipe (LARS eta 0.001, warmup from 0, blur p 1.0 / 0.1)
    with lr, wd and tau from its preset for the shortest run at or above --epochs (BYOL_PRESETS: 40, 100, 300 or
    1000 epochs; 1000 beyond); at 64 px or less solo-learn's CIFAR recipe in full (eta 0.02, each layer's rate
    clipped at the global one, lr 1.0, wd 1e-5, tau 0.99, no blur, CIFAR-10's mean and std, the stem padded by 2,
    warmup from 3e-5 so that the clip holds from step 0).
 6. Crop sizes follow the median shorter side of a sample of the training images: above 64 px the reference's 224
    and 96 px; at 64 px or less (CIFAR stem) the native size, local crops x 96/224 to a multiple of 8 (32 -> 16 px);
    the flags override. Blur sigma (0.1 to 2 px at 224) scales with the global size, for all crops; no blur at 64 px
    or less. RandomResizedCrop is bilinear for SwAV (EffSSL), bicubic for BYOL (solo-learn).
 7. Rotation prediction needs upright images: on the synthetic shapes, half of which look the same after a quarter
    turn, the demo's rotation accuracy stays near 25 %. LARS (trust 0.001) moves each weight by about lr x 0.001 of
    its norm per step: the recipes are made for tens of thousands of iterations, not the demo's 312.
 8. The workers decode, crop, flip and draw the rotations; the colour operations (common.ColorAugmentation) and the
    rotations of the finished global views run batched on the device.

Compared with the reference code. The SwAV + rotation step equals EffSSL's and the BYOL step solo-learn's:
tests/test_rotssl.py recomputes a step of each base (and of SwAV with swav's queue) from the model's modules, called
as the reference calls them, and checks the loss and every gradient (fp32, 1e-5 relative). Deliberate differences:
the small-image recipes (EffSSL is ImageNet only); BYOL at 64 px or less takes CIFAR-10's mean and std and stem on
every such dataset (solo-learn: CIFAR-10 and CIFAR-100 only, CIFAR-100 with its own statistics, std up to 8 %
larger); BYOL above 64 px takes torchvision's colour operations, where DeepMind's adds brightness (+-0.4, not x 0.6
to 1.4), contrasts per channel, blurs with 23 zero-padded taps (darker outermost pixels) and solarizes at 0.5;
rotations drawn by torch's seeded generator in the augmentation, not Python's `random` (exact resume); LARS's trust
ratio eta ||w|| / ||g + wd w|| (DeepMind's), where EffSSL's (solo-learn's) divides by ||g|| + wd ||w||: up to
2r / (1 - r) apart, r = wd ||w|| / ||g||; normalisation std 0.229 for red (SwAV's: 0.228). Colour operations, blur
and precision as in every script here (common.ColorAugmentation says how they differ).

Commands:
    python rotssl.py                   # CPU demo: SwAV + rotation on synthetic shapes (--base byol: BYOL + rotation)
    python rotssl.py --data cifar10 --download --arch resnet18 --epochs 200 --batch-size 256   # one GPU
    python rotssl.py --data /path/to/imagenet --arch resnet50 --epochs 200 --batch-size 256 --lr 0.6 \\
        --final-lr 0.0006 --warmup-epochs 0 --freeze-prototypes-iters 5005 --queue-length 3840 \\
        --epoch-queue-starts 15                        # one GPU: swav's batch-256 recipe, with its queue
    # the reference recipe (ImageNet-1K, ResNet-50, 50 epochs, batch 1024), then a linear probe:
    torchrun --nproc_per_node=8 rotssl.py --data /path/to/imagenet --arch resnet50 --epochs 50 \\
        --batch-size 1024 --workers 10 --eval-every 5 --out runs/swav_rot
    torchrun --nproc_per_node=8 eval_linear.py --ckpt runs/swav_rot/backbone.pt --data /path/to/imagenet --mode full
"""
import argparse
import copy

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import common

# The recipe, in one place (detail 5): the base's row; BYOL on images of SMALL_IMAGES px or less: solo-learn's CIFAR
# row. Set flags win. LARS's eta and clip, normalisation and stem are no flags: each recipe was tuned with its own.
IMAGENET = dict(mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD, stem_padding=1)
RECIPES = {
    "swav": dict(lr=1.2, wd=1e-6, warmup_epochs=10.0, warmup_start_lr=0.3, final_lr=0.0012, lars_eta=0.001,
                 lars_clip=False, **IMAGENET),  # EffSSL's SwAV; warmup 10 epochs in both papers
    # DeepMind's ImageNet BYOL: lr x batch / 256, warmup from 0, cosine to 0; lr, wd, tau from BYOL_PRESETS
    "byol": dict(warmup_epochs=10.0, warmup_start_lr=0.0, final_lr=0.0, lars_eta=0.001, lars_clip=False, **IMAGENET),
    # solo-learn's CIFAR BYOL: its stem's 3x3 convolution pads by 2 (34 x 34 feature maps from 32 px)
    "byol_small": dict(lr=1.0, wd=1e-5, warmup_epochs=10.0, warmup_start_lr=3e-5, final_lr=0.0, lars_eta=0.02,
                       lars_clip=True, ema=0.99, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                       stem_padding=2),
}
# DeepMind's byol/configs/byol.py: (lr, wd, tau) per run length; a run takes the shortest at or above its --epochs
BYOL_PRESETS = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99), 1000: (0.2, 1.5e-6, 0.996)}


# ---- Options ---------------------------------------------------------------------------------------------------------
def get_args_parser():
    small = f"images of {common.SMALL_IMAGES} px or less"
    p = argparse.ArgumentParser("rotssl", description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter,
                                epilog="--lr, --wd, --warmup-epochs, --warmup-start-lr, --final-lr, --ema default to "
                                f"the recipe of --base (byol_small: BYOL on {small}): {RECIPES}; byol's lr, wd, tau: "
                                f"the preset at or above --epochs, {BYOL_PRESETS}")
    # lr, wd, warmup, ema: None = the recipe's (resolve_recipe); the demo: 1 epoch of 10,000 images, 312 steps of 32
    common.add_common_args(p, "rotssl", epochs=1, batch_size=32, lr="by --base and image size, below",
                           wd="by --base and image size, below", warmup_epochs="10, at most --epochs / 5")
    g = p.add_argument_group("rotation task")
    g.add_argument("--base", default="swav", choices=("swav", "byol"),
                   help="the self-supervised method the rotation task is added to (swav = the reference code)")
    g.add_argument("--rot-weight", type=float, default=0.1,
                   help="lambda, the weight of the summed rotation cross-entropies; 0 = the plain base method")
    g.add_argument("--global-size", type=int, default=None,
                   help=f"global crop side (default: the reference's 224; the native size on {small}, e.g. CIFAR)")
    g.add_argument("--local-size", type=int, default=None,
                   help=f"SwAV's local crop side (default: the reference's 96; global size x 96/224 on {small})")
    g.add_argument("--warmup-start-lr", type=float, default=None,
                   help=f"lr at the start of the warmup (default: SwAV 0.3; BYOL 0, or solo-learn's 3e-5 on {small})")
    g.add_argument("--final-lr", type=float, default=None, help="lr at the cosine's end (default: SwAV 0.0012, BYOL 0)")
    g = p.add_argument_group("SwAV base")
    g.add_argument("--n-prototypes", type=int, default=None,
                   help="number of prototypes; default 3000 (the paper) for images above 64 px, min(300, batch size + "
                        "queue length) for small images, whose batches cannot fill 3000 clusters without SwAV's queue")
    g.add_argument("--temperature", type=float, default=0.1, help="softmax temperature of the swapped prediction")
    g.add_argument("--epsilon", type=float, default=0.05,
                   help="entropic regularisation of Sinkhorn-Knopp; lower = sharper codes, but may overflow")
    g.add_argument("--sinkhorn-iters", type=int, default=3, help="Sinkhorn-Knopp iterations")
    g.add_argument("--freeze-prototypes-iters", type=int, default=313, help="first iterations, prototypes frozen")
    g.add_argument("--n-local", type=int, default=6, help="number of small local crops (multi-crop)")
    g.add_argument("--queue-length", type=int, default=0, help="SwAV's queue of past projections for the codes, "
                   "all processes together (each uses length / processes), a multiple of --batch-size; 0 = off "
                   "(EffSSL at batch 1024); swav: 3840 at batch 256")
    g.add_argument("--epoch-queue-starts", type=int, default=15, help="epoch from which the queue fills (used "
                   "once full); if the loss then rises and stays up, start it later or shorten it (swav)")
    g = p.add_argument_group("BYOL base")
    g.add_argument("--ema", type=float, default=None, help="initial momentum of the target network, to 1 on a cosine "
                   f"(default: DeepMind's preset for --epochs, 0.97 to 0.996; solo-learn's 0.99 on {small})")
    return p


def resolve_recipe(args, native):
    """Fill the options left unset: the crop sizes from the images' shorter side `native` (detail 6), then the row
    of RECIPES (detail 5), args.lars_eta and args.lars_clip too; in args before the log header is written, so that
    they are logged. Returns (small_images, the recipe as printed and logged, the peak lr)."""
    small, args.global_size, args.local_size = common.crop_sizes(native, args.global_size, args.local_size)
    swav, row = args.base == "swav", "byol_small" if args.base == "byol" and small else args.base
    defaults = dict(RECIPES[row])
    if row == "byol":  # DeepMind's preset for the run's length (BYOL_PRESETS)
        preset = min((e for e in BYOL_PRESETS if e >= args.epochs), default=1000)
        defaults.update(zip(("lr", "wd", "ema"), BYOL_PRESETS[preset]))
        row = "byol (DeepMind's {}-epoch preset: lr {:g}, wd {:g}, tau {:g})".format(preset, *BYOL_PRESETS[preset])
    defaults["warmup_epochs"] = min(defaults["warmup_epochs"], args.epochs / 5)
    for name, value in defaults.items():
        if getattr(args, name, None) is None:  # lars_eta, lars_clip, mean, std, stem_padding: always the row's
            setattr(args, name, value)
    if args.n_prototypes is None:  # 3000 needs batch 1024 or the queue, else near-uniform codes, loss stuck at ln K
        args.n_prototypes = min(300, args.batch_size + args.queue_length) if small else 3000
    how, lr = ("not batch-scaled", args.lr) if swav else (f"{args.lr} x {args.batch_size}/256",
                                                          args.lr * args.batch_size / 256)
    clip = ", each layer's rate clipped at the global one" if args.lars_clip else ""
    recipe = dict(defaults=row, lr=f"{lr:.4g} ({how}, cosine to {args.final_lr:g})",
                  wd=f"{args.wd:g} (not on biases and norms)", optimizer=f"LARS (eta {args.lars_eta:g}{clip})",
                  warmup=f"{args.warmup_epochs:g} epochs from {args.warmup_start_lr:g}")
    if swav:
        recipe.update(prototypes=f"{args.n_prototypes} (frozen for {args.freeze_prototypes_iters} iterations)",
                      crops=f"2 x {args.global_size} px + {args.n_local} x {args.local_size} px")
        if args.queue_length:
            recipe.update(queue=f"{args.queue_length} from epoch {args.epoch_queue_starts}")
    else:
        recipe.update(ema=f"{args.ema} -> 1 (cosine)", crops=f"2 x {args.global_size} px")
    if row == "byol_small":
        recipe.update(normalisation="CIFAR-10's mean and std", stem="3x3 conv, padding 2")
    return small, recipe, lr


def check_args(args):
    """Bad rotssl options: one sentence, before any data is read (unset ones are resolved later)."""
    if args.rot_weight < 0:
        raise common.UserError(f"--rot-weight must not be negative (got {args.rot_weight}); 0 turns rotation off")
    if args.temperature <= 0 or args.epsilon <= 0 or args.sinkhorn_iters < 1 or (args.n_prototypes or 2) < 2:
        raise common.UserError("--temperature and --epsilon must be positive, --sinkhorn-iters at least 1 and "
                               "--n-prototypes at least 2")
    if (args.n_local < 0 or args.freeze_prototypes_iters < 0 or (args.warmup_start_lr or 0) < 0
            or (args.final_lr or 0) < 0 or args.epoch_queue_starts < 0):
        raise common.UserError("--n-local, --freeze-prototypes-iters, --warmup-start-lr, --final-lr and "
                               "--epoch-queue-starts must not be negative")
    if args.queue_length < 0 or args.queue_length % args.batch_size or (args.queue_length and args.base != "swav"):
        raise common.UserError(f"--queue-length must be 0 (no queue) or a positive multiple of --batch-size "
                               f"{args.batch_size}, with --base swav")
    if min(args.global_size or 8, args.local_size or 8) < 8:
        raise common.UserError("--global-size and --local-size must be at least 8 pixels")
    if args.ema is not None and not 0 <= args.ema < 1:
        raise common.UserError(f"--ema must be in [0, 1) (got {args.ema})")


# ---- Augmentation: the base method's views, plus rotated copies of the two global views ------------------------------
def rotate_views(x, k):
    """Rotate image i of a batch (n, c, h, w) by k[i] * 90 degrees counter-clockwise (as torch.rot90), so that
    `torch.rot90(rotated[i], -k[i], (1, 2))` gives back x[i] exactly. Any device, no host sync; square images."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotate_views needs square images, got {tuple(x.shape[-2:])}")
    rotated = x
    for r in (1, 2, 3):
        rotated = torch.where((k == r).view(-1, 1, 1, 1), torch.rot90(x, r, dims=(-2, -1)), rotated)
    return rotated.contiguous(memory_format=torch.channels_last) if x.is_cuda else rotated  # as the views (cuDNN)


class Augmentation:
    """One image -> {"global": [2 views], "local": [n views], "rotation": k (2,)} in the worker, a view a cropped and
    flipped uint8 image with its colour parameters; `on_device` finishes a batch on the device: the colour operations,
    then the rotated copies of the global views. swav: multi-crop, one pipeline for all crops: RandomResizedCrop
    bilinear (scale (0.14, 1) global, (0.05, 0.14) local), flip, ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8, grayscale 0.2,
    blur p 0.5. byol: two views, RandomResizedCrop bicubic (0.08, 1), ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, blur
    1.0 / 0.1, solarize 0.0 / 0.2; blur sigma scales with global_size, none if `small` (detail 6). `norm`: mean, std."""

    def __init__(self, base, global_size, local_size, n_local, rotate, small=False, **norm):
        swav = base == "swav"
        interpolation = v2.InterpolationMode.BILINEAR if swav else v2.InterpolationMode.BICUBIC

        def crop(size, scale):
            return v2.Compose([v2.RandomResizedCrop(size, scale=scale, interpolation=interpolation),
                               v2.RandomHorizontalFlip(0.5)])

        def colour(jitter, blur_p, solarize_p):  # jitter p 0.8, grayscale p 0.2, sigma 0.1 to 2 px at 224 px
            return common.ColorAugmentation(jitter=jitter, jitter_p=0.8, gray_p=0.2, blur_p=blur_p, sigma=(0.1, 2.0),
                                            solarize_p=solarize_p, blur_scale=global_size / 224, **norm)
        if swav:
            self.global_crop, self.local_crop = crop(global_size, (0.14, 1.0)), crop(local_size, (0.05, 0.14))
            self.local_colour = colour((0.8, 0.8, 0.8, 0.2), blur_p=0.0 if small else 0.5, solarize_p=0.0)
            self.global_colours = (self.local_colour,) * 2
        else:
            blur = (0.0, 0.0) if small else (1.0, 0.1)
            self.global_crop, self.local_colour, n_local = crop(global_size, (0.08, 1.0)), None, 0
            self.global_colours = tuple(colour((0.4, 0.4, 0.2, 0.1), blur_p=b, solarize_p=s)
                                        for b, s in zip(blur, (0.0, 0.2)))
        self.n_local, self.rotate = n_local, rotate

    def __call__(self, image, target=None):
        sample = {"global": [c.view(self.global_crop, image) for c in self.global_colours],
                  "local": [self.local_colour.view(self.local_crop, image) for _ in range(self.n_local)]}
        if self.rotate:  # drawn here, seeded like the crops (detail 1)
            sample["rotation"] = torch.randint(0, 4, (2,))
        return sample

    def torchvision(self):
        """The views as the reference composes them, torchvision transforms of a PIL image in the worker (slower on few
        cores): [global view 1's, global view 2's(, a local view's)], image -> normalised float tensor; no rotations."""
        views = [colour.torchvision(self.global_crop) for colour in self.global_colours]
        return views + [self.local_colour.torchvision(self.local_crop)] if self.n_local else views

    def on_device(self, batch, device):
        """A collated batch -> {"global", "local", and with rotations "rotated" and "rotation" (B, 2)}."""
        one, two = self.global_colours
        views = (one.on_device(batch["global"], device) if one is two else  # SwAV: one pipeline, one call
                 [c.on_device([v], device)[0] for c, v in zip(self.global_colours, batch["global"])])
        out = {"global": views, "local": self.local_colour.on_device(batch["local"], device) if self.n_local else []}
        if self.rotate:  # rotated copies of the finished global views (detail 1)
            out["rotation"] = k = batch["rotation"].to(device, non_blocking=True)
            out["rotated"] = [rotate_views(v, k[:, i]) for i, v in enumerate(views)]
        return out


# ---- Heads and losses ------------------------------------------------------------------------------------------------
# Copy kit: mlp, rotation_head, sinkhorn_codes, swav_loss, byol_loss, RotSSL; rotate_views, Augmentation (the views);
# from common: LARS, param_groups, cosine_schedule, momentum_update (BYOL), all_gather_nograd, all_reduce_sum (no-ops in
# one process). SwAV: the loop calls model.normalize_prototypes() before each forward, drops the prototypes' gradient
# for --freeze-prototypes-iters steps; forward writes the queue only if fill_queue, reads it only if use_queue. BYOL:
# the loop calls common.momentum_update(*model.momentum_pairs(), tau) after each optimizer step (forgotten: the target
# stays at its random init, no error). No labels. Several GPUs: SyncBatchNorm (run.distribute()), Sinkhorn all-reduces.
def mlp(in_dim, hidden_dim, out_dim):
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


def rotation_head(feat_dim, hidden_dim=2048):
    """Pooled backbone features -> logits of the 4 rotations: Linear(D, 2048) -> BN -> ReLU -> Linear(2048, 4)."""
    return mlp(feat_dim, hidden_dim, 4)


@torch.no_grad()
def sinkhorn_codes(scores, eps=0.05, iters=3):
    """SwAV's codes (Caron et al. 2020, eq. 3 and appendix A.1): soft assignments of the samples to the prototypes,
    rows summing to 1, each prototype used by about B / K samples. scores: (b, K) of this process's samples (with the
    queue: its queue's, then its batch's); sums all-reduced: the codes of one process holding all B = b x N samples."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    Q = torch.exp(scores.float() / eps).t()  # (K, b): cosine scores / 0.05 stay below e^20, fine in fp32
    K, B = Q.shape[0], Q.shape[1] * world
    Q /= common.all_reduce_sum(Q.sum())
    for _ in range(iters):
        Q /= common.all_reduce_sum(Q.sum(dim=1, keepdim=True))  # each prototype: total mass 1/K
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)  # each sample: total mass 1/B
        Q /= B
    return (Q * B).t()


def swav_loss(scores, codes, temperature=0.1):
    """Swapped prediction (SwAV eq. 1): predict the code of global crop s from every other crop v. scores:
    (V, b, K) prototype scores of all V crops (crops 0 and 1 are the global ones); codes: list of the codes of the
    global crops. Returns 1/|codes| * sum_s 1/(V-1) * sum_{v != s} mean_b[-sum_k q_s log softmax(scores_v / T)]."""
    log_p = F.log_softmax(scores.float() / temperature, dim=-1)
    n_crops, loss = scores.shape[0], 0.0
    for s, q in enumerate(codes):
        cross_entropy = -(q.unsqueeze(0) * log_p).sum(-1).mean(-1)  # (V,): one value per predicting crop
        loss = loss + (cross_entropy.sum() - cross_entropy[s]) / (n_crops - 1)
    return loss / len(codes)


def byol_loss(p1, p2, z1, z2):
    """BYOL (Grill et al. 2020, eq. 2, symmetrised): (2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1)), batch means."""
    def pair(p, z):
        return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()
    return pair(p1, z2) + pair(p2, z1)


class RotSSL(nn.Module):
    """The online networks, the base method's heads, the rotation head, (BYOL) the momentum target and (SwAV) the
    queue. `forward` is the training step: a batch of the Augmentation's samples -> the losses."""

    def __init__(self, backbone, feat_dim, base="swav", rot_weight=0.1, n_prototypes=3000,
                 temperature=0.1, epsilon=0.05, sinkhorn_iters=3, queue_length=0):
        super().__init__()
        self.base, self.rot_weight = base, rot_weight
        self.temperature, self.epsilon, self.sinkhorn_iters = temperature, epsilon, sinkhorn_iters
        self.backbone = backbone
        if base == "swav":
            self.projector = mlp(feat_dim, 2048, 128)
            self.prototypes = nn.Linear(128, n_prototypes, bias=False)
            # SwAV's queue of the global crops' past z (detail 4): a buffer, so that checkpoint.pt holds it
            self.register_buffer("queue", torch.zeros(2, queue_length, 128) if queue_length else None)
        else:
            self.projector = mlp(feat_dim, 4096, 256)
            self.predictor = mlp(256, 4096, 256)
            self.momentum_backbone = copy.deepcopy(backbone).requires_grad_(False)  # trained by momentum only
            self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.rotation_head = rotation_head(feat_dim) if rot_weight > 0 else None

    def forward(self, batch, fill_queue=False, use_queue=False):
        x1, x2 = batch["global"]
        swav = self.base == "swav"
        loss_base = (self.swav_step(torch.cat([x1, x2]), batch["local"], fill_queue, use_queue) if swav else
                     self.byol_step(x1, x2))
        out = {"loss_base": loss_base}
        if self.rotation_head is None:  # the plain base method: no rotated forward at all
            out["loss"] = loss_base
            return out
        loss_rot, correct = 0.0, 0.0
        for rotated, k in zip(batch["rotated"], batch["rotation"].t()):
            logits = self.rotation_head(self.backbone(rotated)).float()  # one backbone call per rotated view
            loss_rot = loss_rot + F.cross_entropy(logits, k)  # summed over the two views (detail 3)
            correct = correct + (logits.argmax(1) == k).float().mean() / 2
        out["loss"] = loss_base + self.rot_weight * loss_rot  # items set one by one: torch 2.1's compiler splits
        out["loss_rot"], out["rot_acc"] = loss_rot, 100 * correct  # the graph at a dict.update
        return out

    def swav_step(self, global_views, local_views, fill_queue=False, use_queue=False):
        b = global_views.shape[0] // 2
        features = [self.backbone(global_views)]  # one backbone call per crop resolution
        if local_views:
            features.append(self.backbone(torch.cat(local_views)))
        z = F.normalize(self.projector(torch.cat(features)), dim=1)
        scores = self.prototypes(z).float().view(-1, b, self.prototypes.out_features)  # (V, b, K)
        # the queue (2, L, 128) as one slice (2, L / N, 128) per process: each uses its own, all hold all (detail 4)
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        slices, codes = None if self.queue is None else self.queue.view(2, world, -1, z.shape[1]), []
        for s in (0, 1):  # the codes of global crop s; with the queue: over [queue_s; batch], the batch's rows kept
            with torch.no_grad():  # the queue scored by the current prototypes (swav)
                out = torch.cat([self.prototypes(slices[s, rank]).float(), scores[s]]) if use_queue else scores[s]
            codes.append(sinkhorn_codes(out.detach(), self.epsilon, self.sinkhorn_iters)[-b:])
        if fill_queue:  # after the codes, swav's `queue[i, bs:] = queue[i, :-bs]; queue[i, :bs] = z of crop i` on
            slices[:, :, b:] = slices[:, :, :-b].clone()  # every slice, z all-gathered: all hold the same queue
            slices[:, :, :b] = common.all_gather_nograd(z[:2 * b].detach().view(1, 2, b, -1)).transpose(0, 1)
        return swav_loss(scores, codes, self.temperature)

    def byol_step(self, x1, x2):
        p1, p2 = [self.predictor(self.projector(self.backbone(x))) for x in (x1, x2)]  # one call per view (detail 2)
        with torch.no_grad():  # the target sees the two unrotated views only
            z1, z2 = [self.momentum_projector(self.momentum_backbone(x)) for x in (x1, x2)]
        return byol_loss(p1, p2, z1, z2)

    @torch.no_grad()
    def normalize_prototypes(self):
        """SwAV: every prototype is a unit vector before each step (the reference does it in place)."""
        w = self.prototypes.weight
        w.copy_(F.normalize(w, dim=1))

    def momentum_pairs(self):
        """BYOL: (target parameters, matching online parameters), for common.momentum_update."""
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        target = [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]
        return target, online


# ---- Training --------------------------------------------------------------------------------------------------------
def main():
    # ---------------------------------------------------------------- plumbing: processes, flags, seeds
    args = get_args_parser().parse_args()
    ddp = common.init_run(args, check_args)
    swav = args.base == "swav"

    # ---------------------------------------------------------------- data, recipe
    train_set = common.build_dataset(args.data, "train", args.data_dir, args.download, with_unlabeled=True)
    native = common.native_image_size(train_set)
    small, recipe, lr = resolve_recipe(args, native)  # before the log header, so that it is logged
    if ddp.is_main:
        sizes = {"global": args.global_size, **({"local": args.local_size} if swav and args.n_local else {})}
        print(common.describe_sizes(native, small, **sizes))
    norm = dict(mean=args.mean, std=args.std)  # ImageNet's; CIFAR-10's in solo-learn's BYOL recipe (detail 5)
    knn = (common.KNNMonitor(args.data, args.data_dir, args.global_size, small, args.workers, ddp.device,
                             args.subset, args.seed, args.download, args.eval_subset, train=train_set, **norm)
           if args.eval_every else None)
    augmentation = Augmentation(args.base, args.global_size, args.local_size, args.n_local, args.rot_weight > 0, small,
                                **norm)
    loader = common.train_loader(train_set, augmentation, args.batch_size // ddp.world_size, ddp, args.workers,
                                 args.seed, args.subset)

    # ---------------------------------------------------------------- model (SwAV or BYOL, + rotation head)
    backbone, feat_dim = common.build_backbone(args.arch, small, args.global_size, stem_padding=args.stem_padding)
    model = common.to_device(RotSSL(backbone, feat_dim, args.base, args.rot_weight, args.n_prototypes, args.temperature,
                                    args.epsilon, args.sinkhorn_iters, args.queue_length), ddp.device)
    momentum_params, online_params = ([], []) if swav else model.momentum_pairs()

    # ---------------------------------------------------------------- optimizer, schedules, precision
    optimizer = common.LARS(common.param_groups(model, args.wd), momentum=0.9, trust_coefficient=args.lars_eta,
                            clip=args.lars_clip)
    lr_schedule = common.cosine_schedule(lr, args.final_lr, args.epochs, len(loader), args.warmup_epochs,
                                         args.warmup_start_lr, endpoint=not swav)  # SwAV: swav's, step for step
    ema_schedule = None if swav else common.cosine_schedule(args.ema, 1.0, args.epochs, len(loader))  # BYOL's tau
    queue_from = args.epoch_queue_starts * len(loader) if args.queue_length else float("inf")  # as swav (detail 4)
    queue_full = queue_from + args.queue_length // args.batch_size
    autocast, scaler = common.mixed_precision(args.precision, ddp.device)

    # ---------------------------------------------------------------- plumbing: resume, compile + DDP, output
    run = common.TrainingRun(args, ddp, model, optimizer, scaler, autocast, backbone=model.backbone, recipe=recipe,
                             record=dict(method=f"rotssl-{args.base}", small_images=small, img_size=args.global_size,
                                         feat_dim=feat_dim, stem_padding=args.stem_padding, **norm))
    start_epoch = run.resume()  # from --out's checkpoint.pt, if any: weights, optimizer, scaler, RNG, position
    train_model = run.distribute()  # SyncBatchNorm on several GPUs, torch.compile, DDP under torchrun
    run.start(knn)  # log.jsonl's header, the recipe line, the kNN monitor at random init

    # ---------------------------------------------------------------- the epochs, each of training steps
    for epoch in range(start_epoch, args.epochs):
        for step, batch in run.steps(loader, epoch):
            batch = augmentation.on_device(batch, ddp.device)  # colour ops and rotations, batched (detail 8)
            common.set_lr(optimizer, lr_schedule[step])
            if swav:  # every prototype a unit vector before the step, in place (detail 4)
                model.normalize_prototypes()
            with autocast():
                losses = train_model(batch, fill_queue=step >= queue_from, use_queue=step >= queue_full)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            if swav and step < args.freeze_prototypes_iters:  # prototypes frozen at the start (detail 4)
                model.prototypes.weight.grad = None
            scaler.step(optimizer)
            scaler.update()
            if swav:
                run.log(losses, lr=lr_schedule[step])
            else:  # BYOL: the target follows the online networks after the optimizer step
                common.momentum_update(momentum_params, online_params, ema_schedule[step])
                run.log(losses, lr=lr_schedule[step], ema=ema_schedule[step])
        run.end_epoch(epoch)  # mean losses, kNN every --eval-every epochs, log, checkpoint.pt (+ queue), backbone.pt
    run.finish(note=common.SELF_SUPERVISED_DEMO if args.data == "synthetic" else None)


if __name__ == "__main__":
    common.run_main(main)
