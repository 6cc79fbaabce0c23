"""UniVIP: scene-scene, scene-instance and instance-instance self-supervision with optimal transport.

Paper: "UniVIP: A Unified Framework for Self-Supervised Visual Pre-training", Zhaowen Li, Yousong Zhu, Fan Yang, Wei Li,
Chaoyang Zhao, Yingying Chen, Zhiyang Chen, Jiahao Xie, Liwei Wu, Rui Zhao, Ming Tang and Jinqiao Wang, CVPR 2022, arXiv
2203.06965. No official code; ORL (Jiahao000/ORL, BYOL-based, same group) is nearest: UniVIP reuses its COCO protocol.

The idea. BYOL assumes that two random crops of an image show the same object, which fails on scene images such as COCO.
UniVIP samples two scene views sure to contain the same K object instances (boxes from selective search, annotations,
...) and trains one BYOL network pair at three levels: (1) scene-scene, the two views agree (BYOL); (2) scene-instance,
an aggregate of the K instances agrees with each scene view; (3) instance-instance, the K online instance embeddings are
matched to the K target ones by optimal transport (Sinkhorn), so the network learns which instances match without
hand-made pairs. `--losses ss` is BYOL on the same data: the paper's baseline.

Implementation details (choices the paper leaves open, and how they are made here)
 1. Instances are cut from the original image before any flip (a flip never breaks the box correspondence): each box at
    whole pixels, then resized to a square, bilinear (crop_resize: ORL's, for the scene windows too).
 2. The box filter (min side, aspect <= 3, drop IoU > 0.5 with a kept box) keeps source order: best first in --boxes.
 3. Fallback when 20 window pairs never hold K boxes (Sec. 3.1): the pair whose intersection holds the most real boxes
    (ties: the larger one; it must fit a box of --min-box), filled up with random boxes of the filter's size and aspect
    (IoU <= 0.5, 10 tries per box); if none fits a box, both windows are the whole image. The fallback rate is logged.
 4. d(a, b) = 2 - 2 cos(a, b) (BYOL's normalised MSE) where the paper writes -cos: the same minimiser, gradients
    times 2, and the learning rates of the BYOL / ORL code.
 5. The transport plan, its marginals and its cost are computed without gradient, in fp32, by log-domain Sinkhorn (no
    under/overflow at eps = 0.1); the loss gets its gradient through d only.
 6. Calls as BYOL's code makes them: each scene view through the online networks (backbone, projector, predictor) and
    the target networks in a call of its own (every BatchNorm sees the B images of one view); the instances are two more
    views, as ORL's patch views: the B*K online crops in one online call, the target ones in one target call.
 7. Online instances get view 1's augmentations (blur 1.0, no solarize), target instances view 2's; L_ii is one-way, as
    in the paper. One predictor for all three terms: the paper has one online network f, and Eq. 4 weighs the instances
    with f's scene outputs (ORL: one per term). Projector, predictor: ORL's (last Linear without bias, kaiming init).
 8. SGD decays every parameter (ORL's 1e-4), LARS all but biases and norms (BYOL's); the lr is ORL's (orl_lr_schedule).
    The target network (momentum_backbone, momentum_projector) keeps its own batch-norm statistics (train mode) and
    follows the online one after each step, tau from --ema 0.99 to 1 on a per-iteration cosine.
 9. Crop sizes: the paper's 224 (scenes) and 96 (instances) whatever the images' size, except on small scenes (median
    shorter side of sampled images <= 128 px, e.g. the 96 px synthetic ones): scenes 64, instances 32, --min-box 8
    (UniVIP's own policy, not common.crop_sizes); flags override each. Instances <= 64 px get the CIFAR stem. The kNN
    monitor uses single-object images (32 px synthetic shapes, or --eval-data labelled, with val/; else off).
10. resnet_tiny (the CPU demo) defaults to lr 3.2 per 512 images, not the paper's 0.4: 128 steps, not 800 COCO epochs.
11. The workers decode, pick the windows and boxes, crop and flip; the colour operations run batched on the device, one
    call per view, each crop with its own parameters drawn in the worker (common.ColorAugmentation). Blur sigma
    0.1 to 2 px on every crop, the 96 px instances too (ORL's, BYOL's); none on instances of 64 px or less.

Compared with the reference code (none is public: the paper's equations, and ORL for the calls and the recipe)
Equal: the three loss terms (Eq. 1 - 5) and the calls of detail 6; where the paper is silent, ORL's recipe (crops,
init, lr, colour: details 1, 7, 8, 11) and torchvision's RandomResizedCrop windows. tests/test_univip.py checks each
term on hand-computed values, a whole step against one written out from this file's modules the BYOL way (loss and
every gradient, fp32, 1e-5), and each ORL part against ORL's formula. Deliberate differences: the transport marginals
(at their computation in univip_loss); one predictor for the three terms (detail 7); details 4, 9, 10; colour
operations, blur and precision as in every script here (common.ColorAugmentation says how they differ).

Commands
  python univip.py                    # CPU demo: synthetic scenes, about 2 minutes on 2 cores
  python univip.py --data coco --data-dir /datasets/coco --arch resnet50 --batch-size 256 --epochs 800 \\
      --eval-data stl10 --eval-data-dir /datasets --eval-every 50                                    # one GPU, COCO
  torchrun --nproc_per_node=8 univip.py --data coco --data-dir /datasets/coco --arch resnet50 --batch-size 512 \\
      --epochs 800 --workers 10 --eval-data stl10 --eval-data-dir /datasets   # the paper's COCO recipe, 8 GPUs
  python eval_linear.py --ckpt runs/univip/backbone.pt --data /datasets/imagenet --mode full    # a linear probe
  the paper's ImageNet recipe, selective-search boxes: torchrun --nnodes=8 --nproc_per_node=8 ... univip.py \\
      --data /datasets/imagenet/train --boxes imagenet_ss.json --arch resnet50 --batch-size 4096 --epochs 200 \\
      --optimizer lars --lr 0.6 --wd 1e-6 --warmup-epochs 10
"""
import argparse
import copy
import math
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms import v2

import common

LOSSES = ("ss", "si", "ii")
# The recipe (flags win; printed as the `recipe:` line): the paper's COCO one (Sec. 4.1: SGD, wd 1e-4), details 9, 10.
PAPER_DEFAULTS, DEMO_DEFAULTS = dict(lr=0.4, warmup_epochs=4.0), dict(lr=3.2)
SMALL_SCENES = 128  # px: scenes whose median shorter side is this or less get the small sizes (True)
SCENE_SIZES = {False: dict(scene_size=224, instance_size=96, min_box=64.0),
               True: dict(scene_size=64, instance_size=32, min_box=8.0)}
DEMO_NOTE = ("what it shows: UniVIP's three losses on scenes whose two views share K = 4 whole shapes in all but a few "
             "per cent of pairs (the fallback rate above); the kNN on single shapes moves a few points in 2 minutes, "
             "as BYOL's demo's; UniVIP against BYOL on CIFAR scenes: bash tests/results_cifar.sh (README, Results)")


# ---- Options ---------------------------------------------------------------------------------------------------------
def get_args_parser():
    p = argparse.ArgumentParser("UniVIP", description=__doc__.split("\n\n")[0], formatter_class=common.HelpFormatter)
    common.add_common_args(p, "univip", epochs=4, batch_size=32, wd=1e-4, eval_every=10, demo_subset=1024,
                           lr=f"the paper's {PAPER_DEFAULTS['lr']} per 512 images, resnet_tiny {DEMO_DEFAULTS['lr']}",
                           warmup_epochs=f"the paper's {PAPER_DEFAULTS['warmup_epochs']:g}, at most --epochs / 5")
    g = p.add_argument_group("UniVIP")
    g.add_argument("--boxes", default=None, help="JSON file: image path relative to a --data folder -> list of [x, "
                   "y, w, h] boxes (e.g. selective search); --data coco and synthetic bring their own (default: none)")
    g.add_argument("--losses", default="ss,si,ii", help="comma-separated terms among ss (scene-scene), si (scene-"
                   "instance), ii (instance-instance, optimal transport); 'ss' alone is BYOL, the paper's baseline")
    g.add_argument("--num-instances", type=int, default=4, help="K, instances shared by the two scene views")
    small = "on scenes of 128 px or less (median shorter side)"
    g.add_argument("--scene-size", type=int, default=None, help=f"scene view side (default 224; 64 {small})")
    g.add_argument("--instance-size", type=int, default=None, help=f"instance crop side (default 96; 32 {small})")
    g.add_argument("--min-box", type=float, default=None, help=f"shortest usable box side, px (default 64; 8 {small})")
    g.add_argument("--scene-scale", type=float, nargs=2, default=(0.08, 1.0), help="area range of the scene windows")
    g.add_argument("--optimizer", default="sgd", choices=("sgd", "lars"),
                   help="sgd (momentum 0.9, the COCO recipe) or lars (the ImageNet recipe, with --lr 0.6 --wd 1e-6)")
    g.add_argument("--ema", "--momentum-teacher", dest="ema", type=float, default=0.99,
                   help="target network's momentum tau, raised to 1 on a per-iteration cosine")
    g.add_argument("--hidden-dim", type=int, default=4096, help="hidden width of projector and predictor")
    g.add_argument("--proj-dim", type=int, default=256, help="output width of projector and predictor")
    g.add_argument("--sinkhorn-eps", type=float, default=0.1, help="entropic regularisation of the transport plan")
    g.add_argument("--sinkhorn-iters", type=int, default=50, help="Sinkhorn iterations")
    g.add_argument("--eval-data", default="synthetic", help="single-object dataset of the kNN monitor: synthetic "
                   "(32 px shapes), cifar10, stl10 or a labelled ImageFolder path with train/ and val/")
    g.add_argument("--eval-data-dir", default=None, help="root of --eval-data's dataset (default: --data-dir)")
    return p


def resolve_recipe(args, native):
    """Fill the unset options (the tables above; sizes from the scenes' shorter side `native`); return (small_images,
    the recipe printed and logged, the peak lr: --lr x batch / 512 as the paper, SGD 0.4 at 512, LARS 4.8 at 4096)."""
    defaults = dict(PAPER_DEFAULTS, **(DEMO_DEFAULTS if args.arch == "resnet_tiny" else {}),
                    **SCENE_SIZES[native <= SMALL_SCENES])
    defaults["warmup_epochs"] = min(defaults["warmup_epochs"], args.epochs / 5)
    vars(args).update({name: value for name, value in defaults.items() if getattr(args, name) is None})
    patch = common.vit_patch_size(args.scene_size)
    if args.arch.startswith("vit") and (args.scene_size % patch or args.instance_size % patch):
        raise common.UserError(f"with {args.arch}, --scene-size and --instance-size must be multiples of the "
                               f"patch size {patch}")
    optimizer = "SGD (momentum 0.9)" if args.optimizer == "sgd" else "LARS (eta 0.001, momentum 0.9)"
    lr = args.lr * args.batch_size / 512
    return args.instance_size <= common.SMALL_IMAGES, dict(
        lr=f"{lr:.4g} ({args.lr} x {args.batch_size}/512, cosine to 0 by epoch)", wd=args.wd,
        optimizer=optimizer, warmup=f"{args.warmup_epochs:g} epochs from 1e-4 x", ema=f"{args.ema} -> 1 (cosine)",
        crops=f"scene {args.scene_size} px, instance {args.instance_size} px, boxes from {args.min_box:g} px"), lr


def check_args(args):
    """Bad UniVIP options: one sentence, before any data is read (unset ones are resolved later)."""
    terms = args.losses.split(",")
    if any(t not in LOSSES for t in terms) or len(set(terms)) != len(terms):
        raise common.UserError(f"--losses {args.losses} must be a comma-separated subset of ss,si,ii, e.g. ss,si,ii")
    if min(args.num_instances, args.hidden_dim, args.proj_dim) < 1 or (args.min_box is not None and args.min_box <= 0):
        raise common.UserError("--num-instances, --hidden-dim and --proj-dim must be at least 1, --min-box positive")
    if any(size is not None and size < 16 for size in (args.scene_size, args.instance_size)):
        raise common.UserError("--scene-size and --instance-size must be at least 16 pixels")
    if not 0 < args.scene_scale[0] <= args.scene_scale[1] <= 1:
        raise common.UserError("--scene-scale {} {} must satisfy 0 < low <= high <= 1".format(*args.scene_scale))
    if not 0 <= args.ema <= 1 or args.sinkhorn_eps <= 0 or args.sinkhorn_iters < 1:
        raise common.UserError("--ema must be in [0, 1], --sinkhorn-eps positive, --sinkhorn-iters >= 1")
    if args.boxes is not None and args.data in ("synthetic", "coco"):
        raise common.UserError(f"--boxes is for a folder of images; --data {args.data} brings its own boxes")


# ---- Data: two scene views that share K instances (Sec. 3.1) ---------------------------------------------------------
def filter_boxes(boxes, width, height, min_box, max_ratio=3.0, iou_threshold=0.5):
    """Clip (x, y, w, h) boxes to the image, keep those with shortest side >= min_box and aspect ratio
    <= max_ratio, then drop every box whose IoU with an earlier kept box exceeds iou_threshold."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    x0, y0 = boxes[:, 0].clip(0, width), boxes[:, 1].clip(0, height)
    x1, y1 = (boxes[:, 0] + boxes[:, 2]).clip(0, width), (boxes[:, 1] + boxes[:, 3]).clip(0, height)
    w, h = x1 - x0, y1 - y0
    keep = (np.minimum(w, h) >= min_box) & (np.maximum(w, h) <= max_ratio * np.minimum(w, h))
    xyxy = torch.from_numpy(np.stack([x0, y0, x1, y1], 1)[keep])
    order = torchvision.ops.nms(xyxy, -torch.arange(len(xyxy), dtype=torch.float32), iou_threshold)  # greedy, in order
    out = xyxy[order.sort().values]
    return torch.cat([out[:, :2], out[:, 2:] - out[:, :2]], 1).numpy()


def random_window(width, height, scale, ratio=(3 / 4, 4 / 3)):
    """A RandomResizedCrop window (x, y, w, h): area fraction in `scale`, log-uniform aspect ratio; after 10 tries,
    torchvision's fallback: the centre crop of the image clamped to the ratio bounds."""
    for _ in range(10):
        area = width * height * random.uniform(*scale)
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, width - w), random.randint(0, height - h), w, h
    w, h = min(width, round(height * ratio[1])), min(height, round(width / ratio[0]))
    return (width - w) // 2, (height - h) // 2, w, h


def random_boxes(region, count, min_side, taken, max_ratio=3.0, iou_threshold=0.5):
    """`count` random boxes inside region (x0, y0, x1, y1): shortest side >= min_side, aspect <= max_ratio,
    IoU <= iou_threshold with `taken` and with each other when 10 tries allow it."""
    (x0, y0, x1, y1), out = region, []
    for _ in range(count):
        for _attempt in range(10):
            w = random.uniform(min_side, min(x1 - x0, max_ratio * (y1 - y0)))
            h = random.uniform(max(min_side, w / max_ratio), min(y1 - y0, max_ratio * w))
            x, y = random.uniform(x0, x1 - w), random.uniform(y0, y1 - h)
            box = (x, y, min(w, x1 - x), min(h, y1 - y))
            if all(common.box_iou(box, b) <= iou_threshold for b in list(taken) + out):
                break
        out.append(box)
    return out


def sample_scene_pair(width, height, boxes, num_instances=4, min_box=64.0, scale=(0.08, 1.0), tries=20):
    """Two independent scene windows whose intersection holds K = `num_instances` of the image's filtered (n, 4) x, y,
    w, h `boxes` (Sec. 3.1): up to `tries` RandomResizedCrop pairs until at least K lie fully inside both, K of them at
    random; else detail 3's fallback. Returns integer (x, y, w, h) window1, window2, (K, 4) float32 boxes, fell_back."""
    min_side = min(min_box, width, height)  # an image smaller than --min-box still gets K boxes
    best, best_key = None, None
    for _ in range(tries):
        w1, w2 = random_window(width, height, scale), random_window(width, height, scale)
        ix0, iy0 = max(w1[0], w2[0]), max(w1[1], w2[1])
        ix1, iy1 = min(w1[0] + w1[2], w2[0] + w2[2]), min(w1[1] + w1[3], w2[1] + w2[3])
        inside = [b for b in boxes if b[0] >= ix0 and b[1] >= iy0 and b[0] + b[2] <= ix1 and b[1] + b[3] <= iy1]
        if len(inside) >= num_instances:
            return w1, w2, np.array(random.sample(inside, num_instances), np.float32).reshape(-1, 4), False
        key = (len(inside), (ix1 - ix0) * (iy1 - iy0))
        if ix1 - ix0 >= min_side and iy1 - iy0 >= min_side and (best_key is None or key > best_key):
            best, best_key = (w1, w2, (ix0, iy0, ix1, iy1), inside), key
    if best is None:  # no intersection could hold a box: both views become the whole image
        best = ((0, 0, width, height),) * 3 + (list(boxes),)  # windows (x, y, w, h), region (x0, y0, x1, y1)
    w1, w2, region, inside = best
    inside = random.sample(inside, min(len(inside), num_instances))
    chosen = [tuple(b) for b in inside] + random_boxes(region, num_instances - len(inside), min_side, inside)
    return w1, w2, np.array(chosen, np.float32).reshape(-1, 4), True


def crop_resize(image, box, size):
    """ORL's crops (torchvision's resized_crop): the (x, y, w, h) box rounded to whole pixels (at least one), cut out,
    then resized bilinear to size x size, so that no pixel outside the box enters the edge taps."""
    x0, y0 = min(round(box[0]), image.width - 1), min(round(box[1]), image.height - 1)
    x1, y1 = max(round(box[0] + box[2]), x0 + 1), max(round(box[1] + box[3]), y0 + 1)
    return image.crop((x0, y0, x1, y1)).resize((size, size), Image.BILINEAR)


class SceneInstanceAugmentation:
    """(scene image, boxes) -> (scene view 1, scene view 2, online instances (K), target instances (K), fell_back) in
    the worker, each view a flipped uint8 crop with its colour parameters; `on_device`: detail 11. `colours`, BYOL's
    asymmetric lists (Sec. 4.1, detail 7): blur p 1.0, no solarize; blur p 0.1, solarize p 0.2; no blur if `small`."""

    def __init__(self, scene_size, instance_size, num_instances, min_box, scale, with_instances=True, small=False):
        self.scene_size, self.instance_size, self.scale = scene_size, instance_size, scale
        self.num_instances, self.min_box, self.with_instances = num_instances, min_box, with_instances
        self.flip = v2.RandomHorizontalFlip(0.5)  # after cropping: boxes are already cut out
        colour = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, sigma=(0.1, 2.0))  # sigma in px
        blur = 0.0 if small else 1.0
        self.colours = (common.ColorAugmentation(blur_p=blur, solarize_p=0.0, **colour),
                        common.ColorAugmentation(blur_p=0.1 * blur, solarize_p=0.2, **colour))

    def __call__(self, image, boxes):
        width, height = image.size
        if not self.with_instances:  # BYOL: two independent windows, nothing else
            w1, w2 = random_window(width, height, self.scale), random_window(width, height, self.scale)
            return self._scene(image, w1, 0), self._scene(image, w2, 1), None, None, False
        boxes = filter_boxes(boxes, width, height, self.min_box)
        w1, w2, chosen, fell_back = sample_scene_pair(*image.size, boxes, self.num_instances, self.min_box, self.scale)
        crops = [crop_resize(image, box, self.instance_size) for box in chosen]
        online, target = ([colour.view(self.flip, c) for c in crops] for colour in self.colours)
        stack = lambda views: tuple(torch.stack(t) for t in zip(*views))  # (K, 3, s, s) uint8, (K, P)
        return self._scene(image, w1, 0), self._scene(image, w2, 1), stack(online), stack(target), fell_back

    def _scene(self, image, window, v):
        return self.colours[v].view(self.flip, crop_resize(image, window, self.scene_size))

    def torchvision(self):
        """The colour operations as the reference composes them: torchvision transforms, PIL crop -> flipped, normalised
        tensor in the worker (slower on few cores): [view 1's and online instances', view 2's and target instances']."""
        return [colour.torchvision(self.flip) for colour in self.colours]

    def on_device(self, scene1, scene2, online, target, device):
        """Collated views -> normalised float scene views (B, 3, S, S) and instances (B*K, 3, s, s) on `device`."""
        finish = lambda colour, view: None if view is None else colour.on_device([view], device)[0]
        one, two = self.colours
        return finish(one, scene1), finish(two, scene2), finish(one, online), finish(two, target)


def collate_scene_pairs(samples):
    """-> scene views 1 and 2 (B images each), online and target instances (B*K each; None without instances), each
    as (uint8 images, colour parameters), and fell_back (B,) bool: one batch per network call (detail 6)."""
    s1, s2, online, target, fell_back = zip(*samples)
    stack = lambda views: tuple(torch.stack(t) for t in zip(*views))
    cat = lambda views: tuple(torch.cat(t) for t in zip(*views))
    instances = (None, None) if online[0] is None else (cat(online), cat(target))
    return stack(s1), stack(s2), *instances, torch.tensor(fell_back)


# ---- Model: BYOL networks shared by scenes and instances, the instance aggregator, the loss (Sec. 3) -----------------
# Copy kit: mlp, distance, sinkhorn_plan, transport_marginal, univip_loss, UniVIP; SceneInstanceAugmentation,
# collate_scene_pairs, the box helpers (data); from common: momentum_update, cosine_schedule (tau), LARS, param_groups.
# After each optimizer step the loop calls common.momentum_update(*model.momentum_pairs(), tau) (forgotten: no error,
# a random target); forward changes only BN stats. No labels. Several GPUs: SyncBatchNorm, DDP, no other collective.
def mlp(in_dim, hidden_dim, out_dim):
    """Projector / predictor: Linear -> BN -> ReLU -> Linear without bias (ORL's, where BYOL's last layer has one),
    initialised as ORL's init_weights(init_linear='kaiming'): weights kaiming normal (fan_in, ReLU gain), biases 0."""
    head = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim, bias=False))
    for layer in (head[0], head[3]):
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(head[0].bias)
    return head


def distance(a, b):
    """d(a, b) = 2 - 2 cos(a, b) along the last dim (the paper's -cos plus 2, times 2; detail 4)."""
    return 2 - 2 * F.cosine_similarity(a, b, dim=-1)


@torch.no_grad()
def sinkhorn_plan(cost, row_marginal, col_marginal, eps=0.1, iters=50):
    """Entropic optimal transport in the log domain: the plan Y (.., M, N) minimising <Y, cost> - eps H(Y)
    with row sums `row_marginal` (.., M) and column sums `col_marginal` (.., N). Batched over leading dims."""
    log_kernel = -cost.float() / eps
    log_r, log_c = row_marginal.float().log(), col_marginal.float().log()  # a zero mass gives -inf: an empty row
    f, g = torch.zeros_like(log_r), torch.zeros_like(log_c)
    for _ in range(iters):
        f = log_r - torch.logsumexp(log_kernel + g.unsqueeze(-2), dim=-1)
        g = log_c - torch.logsumexp(log_kernel + f.unsqueeze(-1), dim=-2)
    return torch.exp(f.unsqueeze(-1) + log_kernel + g.unsqueeze(-2))


def transport_marginal(instances, scene):
    """relu(cos(instance, scene)) normalised to sum 1 over the instances; uniform if all are zero (Sec. 3.3)."""
    w = F.relu(F.cosine_similarity(instances, scene.unsqueeze(1), dim=-1))  # (B, K)
    total = w.sum(1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-12), torch.full_like(w, 1 / w.shape[1]))


def univip_loss(online_scenes, target_scenes, online_instances=None, target_instances=None, aggregate=None,
                losses=LOSSES, eps=0.1, iters=50):
    """The UniVIP objective, per image and averaged over the batch, in fp32. Inputs: online_scenes = (f(s1), f(s2)) and
    target_scenes = (g(s1), g(s2)), each (B, D); online_instances o and target_instances t, each (B, K, D); aggregate
    I (B, D) = aggregator(concat(o_1 .. o_K)). Returns {"loss", "loss_ss", "loss_si", "loss_ii"} (only `losses`)."""
    p1, p2 = [x.float() for x in online_scenes]  # lists, not generators: torch 2.1's compiler splits the graph there
    z1, z2 = [x.float().detach() for x in target_scenes]
    out = {}
    if "ss" in losses:  # scene-scene (BYOL, Eq. 1): each online view predicts the other target view
        out["loss_ss"] = (distance(p1, z2) + distance(p2, z1)).mean()
    if "si" in losses:  # scene-instance (Eq. 2): the aggregate of the K instances predicts both scenes
        agg = aggregate.float()
        out["loss_si"] = (distance(agg, z1) + distance(agg, z2)).mean()
    if "ii" in losses:  # instance-instance with optimal transport (Eq. 3 - 5)
        o, t = online_instances.float(), target_instances.float().detach()
        with torch.no_grad():
            similarity = F.cosine_similarity(o.unsqueeze(2), t.unsqueeze(1), dim=-1)  # S_mn = cos(o_m, t_n)
            # Masses (Eq. 4): relu(cos) summing to 1, where the paper writes max(o_m . (f_t1 + f_t2) / 2, 0): the raw
            # totals differ (no plan has both as marginals); cosines measure agreement, not norms (as the cost 1 - cos)
            b = transport_marginal(o, z1 + z2)  # mass of each online instance: its agreement with g's scene
            a = transport_marginal(t, (p1 + p2).detach())  # mass of each target instance: with f's scene
            plan = sinkhorn_plan(1 - similarity, b, a, eps, iters)
        pairwise = distance(o.unsqueeze(2), t.unsqueeze(1))  # d(o_m, t_n), (B, K, K): the gradient flows here
        out["loss_ii"] = (plan * pairwise).sum((1, 2)).mean()
    out["loss"] = sum(out[f"loss_{k}"] for k in LOSSES if f"loss_{k}" in out)
    return out


class UniVIP(nn.Module):
    """Online f = predictor(projector(backbone)), target g = momentum_projector(momentum_backbone), aggregator I =
    Linear(K * D, D). forward, the training step: views 1, 2 (B, 3, S, S), instances (B*K, 3, s, s) x 2 or None."""

    def __init__(self, backbone, feat_dim, num_instances=4, hidden_dim=4096, proj_dim=256, losses=LOSSES,
                 eps=0.1, iters=50):
        super().__init__()
        self.losses, self.num_instances, self.eps, self.iters = tuple(losses), num_instances, eps, iters
        self.backbone, self.projector = backbone, mlp(feat_dim, hidden_dim, proj_dim)
        self.predictor = mlp(proj_dim, hidden_dim, proj_dim)
        # built only when used, so that DDP never sees parameters without gradients (e.g. --losses ss)
        self.aggregator = nn.Linear(num_instances * proj_dim, proj_dim) if "si" in losses else None
        self.momentum_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def momentum_pairs(self):
        """(momentum network parameters, matching online parameters), for common.momentum_update."""
        return ([*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()],
                [*self.backbone.parameters(), *self.projector.parameters()])

    def online(self, x):
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def target(self, x):
        return self.momentum_projector(self.momentum_backbone(x))

    def forward(self, view1, view2, online_instances=None, target_instances=None):
        p1, p2 = self.online(view1), self.online(view2)  # one call per view and network, as BYOL's code (detail 6)
        z1, z2 = self.target(view1), self.target(view2)
        o = t = agg = None
        if online_instances is not None and ("si" in self.losses or "ii" in self.losses):
            o = self.online(online_instances).unflatten(0, (-1, self.num_instances))  # (B, K, D)
            t = self.target(target_instances).unflatten(0, (-1, self.num_instances)) if "ii" in self.losses else None
            agg = self.aggregator(o.flatten(1)) if self.aggregator is not None else None
        return univip_loss((p1, p2), (z1, z2), o, t, agg, self.losses, self.eps, self.iters)


# ---- Training --------------------------------------------------------------------------------------------------------
def orl_lr_schedule(base, epochs, iters_per_epoch, warmup_epochs, ratio=1e-4):
    """ORL's lr (stage-3 config: mmcv's CosineAnnealing, min_lr 0, linear warmup by epoch): at step i of epoch e,
    base (1 + cos(pi e / epochs)) / 2, while i < W = warmup_epochs x iters_per_epoch times 1 - (1 - i / W)(1 - ratio);
    as mmcv, the regular lr is back at step W or at the next epoch (a W between two steps keeps the last warmup lr)."""
    warmup, out = warmup_epochs * iters_per_epoch, [base]
    for i in range(epochs * iters_per_epoch):
        regular = 0.5 * base * (1 + math.cos(math.pi * (i // iters_per_epoch) / epochs))
        out.append(regular * (1 - (1 - i / warmup) * (1 - ratio)) if i < warmup
                   else regular if i % iters_per_epoch == 0 or i == warmup else out[-1])
    return out[1:]


def main():
    # ---------------------------------------------------------------- plumbing: processes, flags, seeds
    args = get_args_parser().parse_args()
    ddp = common.init_run(args, check_args)
    terms = tuple(args.losses.split(","))

    # ---------------------------------------------------------------- data, recipe
    train_set = common.build_scene_dataset(args.data, args.data_dir, args.boxes, "train")
    if len(train_set) == 0:
        raise common.UserError(f"--data {args.data} holds no images")
    native = common.native_image_size(train_set)
    small, recipe, lr = resolve_recipe(args, native)  # before the log header, so that it is logged
    if ddp.is_main:
        why = f"instances of {common.SMALL_IMAGES} px or less: CIFAR stem" if small else "ImageNet stem"
        print(common.describe_sizes(native, small, why, scene=args.scene_size, instance=args.instance_size))
    eval_size = args.instance_size if small else args.scene_size
    knn = (common.KNNMonitor(args.eval_data, args.eval_data_dir or args.data_dir, eval_size, small, args.workers,
                             ddp.device, 0, args.seed, args.download, args.eval_subset) if args.eval_every else None)
    if knn is not None:
        knn.where = f" on {args.eval_data}"  # single-object images, not the scenes (detail 9): the lines say so
    augmentation = SceneInstanceAugmentation(args.scene_size, args.instance_size, args.num_instances, args.min_box,
                                             tuple(args.scene_scale), "si" in terms or "ii" in terms, small)
    loader = common.train_loader(train_set, augmentation, args.batch_size // ddp.world_size, ddp, args.workers,
                                 args.seed, args.subset, collate_fn=collate_scene_pairs)

    # ---------------------------------------------------------------- model (UniVIP: BYOL networks + aggregator)
    backbone, feat_dim = common.build_backbone(args.arch, small, args.scene_size)
    model = common.to_device(UniVIP(backbone, feat_dim, args.num_instances, args.hidden_dim, args.proj_dim, terms,
                                    args.sinkhorn_eps, args.sinkhorn_iters), ddp.device)
    momentum_params, online_params = model.momentum_pairs()

    # ---------------------------------------------------------------- optimizer, schedules, precision
    trained = [p for p in model.parameters() if p.requires_grad]  # not the momentum networks'
    optimizer = (torch.optim.SGD(trained, lr=lr, momentum=0.9, weight_decay=args.wd) if args.optimizer == "sgd"
                 else common.LARS(common.param_groups(model, args.wd), lr=lr, momentum=0.9))  # detail 8
    lr_schedule = orl_lr_schedule(lr, args.epochs, len(loader), args.warmup_epochs)  # detail 8
    ema_schedule = common.cosine_schedule(args.ema, 1.0, args.epochs, len(loader))  # BYOL's tau, per step
    autocast, scaler = common.mixed_precision(args.precision, ddp.device)

    # ---------------------------------------------------------------- plumbing: resume, compile + DDP, output
    run = common.TrainingRun(args, ddp, model, optimizer, scaler, autocast, backbone=model.backbone, recipe=recipe,
                             record=dict(method="univip", small_images=small, img_size=eval_size, feat_dim=feat_dim))
    start_epoch = run.resume()  # from --out's checkpoint.pt, if any: weights, optimizer, scaler, RNG, position
    train_model = run.distribute()  # SyncBatchNorm on several GPUs, torch.compile, DDP under torchrun
    run.start(knn)  # log.jsonl's header, the recipe line, the kNN monitor at random init

    # ---------------------------------------------------------------- the epochs, each of training steps (UniVIP)
    for epoch in range(start_epoch, args.epochs):
        for step, (*crops, fell_back) in run.steps(loader, epoch):  # views 1 and 2, online and target instances
            crops = augmentation.on_device(*crops, ddp.device)  # the colour operations, batched (detail 11)
            common.set_lr(optimizer, lr_schedule[step])
            with autocast():
                losses = train_model(*crops)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            common.momentum_update(momentum_params, online_params, ema_schedule[step])  # after the step (BYOL)
            if augmentation.with_instances:  # the epoch's mean: the share of its images that fell back (detail 3)
                losses["fallback_rate"] = fell_back.to(ddp.device, non_blocking=True).float().mean()
            run.log(losses, lr=lr_schedule[step], ema=ema_schedule[step])
        run.end_epoch(epoch)  # mean losses, fallback rate, the kNN (--eval-every), log line, checkpoint.pt, backbone.pt
    run.finish(note=DEMO_NOTE if args.data == "synthetic" else None)


if __name__ == "__main__":
    common.run_main(main)
