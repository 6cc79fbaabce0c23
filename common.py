"""What the four method files share. First the ground floor, all a reader needs to understand a method: backbones,
datasets, crop sizes, batched colour augmentation, loaders, features and kNN, and what a step calls (collectives,
momentum update, LARS, schedules). Then, under a banner, the plumbing: flags, processes, checkpoints, resume,
`TrainingRun` (the glue around each method's step) and, last, how the synthetic demo images are drawn."""
import argparse
import inspect
import json
import math
import os
import platform
import random
import re
import resource
import signal
import sys
import time
import warnings
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vision_transformer import VisionTransformer
from torchvision.transforms import v2
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = ("resnet_tiny", "resnet18", "resnet34", "resnet50", "vit_small", "vit_base")
KNN_BANK = 20_000  # default memory bank of the kNN monitor: 20 images per class on ImageNet, all of a demo
SMALL_IMAGES = 64  # a dataset whose images have a shorter side of 64 px or less: CIFAR stem, native-size crops
EXIT_STOPPED = 3  # the exit status of a run stopped by SIGTERM / SIGUSR1 after saving: run it again to resume
SELF_SUPERVISED_DEMO = (  # printed at the end of the self-supervised demos on the synthetic shapes
    "what to expect: a few minutes of self-supervised training on the synthetic shapes move the kNN top-1 only a few "
    "points from random init; on CIFAR-10, BYOL, MoCo v3, UniVIP and SwAV + rotation gain within 2 epochs (README)")


class UserError(Exception):
    """A problem with the user's input: reported as one sentence, without a traceback."""


# ---- Backbones: image batch -> pooled features, with torchvision's parameter names -----------------------------------
def sincos_position_embedding(grid, dim, temperature=10000.0):
    """MoCo v3's fixed 2-D sin-cos table (1, 1 + grid^2, dim), a zero row for the class token: token r * grid + c
    (row-major) gets [sin(r w), cos(r w), sin(c w), cos(c w)], frequencies w_i = temperature^(-i / (dim / 4))."""
    if dim % 4:
        raise ValueError(f"the sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(*[torch.arange(grid, dtype=torch.float64)] * 2, indexing="ij")
    r, c = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega
    table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], 1)])
    return table.float().unsqueeze(0)


class ViT(VisionTransformer):
    """torchvision's VisionTransformer as MoCo v3's ViT (Chen, Xie, He 2021, Sec. 5; vits.py), any image size: a fixed
    sin-cos position table, a buffer at torchvision's key (backbone.pt loads into its VisionTransformer), bicubic-
    interpolated to other token grids (multi-crop, as DINO); q, k, v xavier-uniform as three blocks, other Linears
    xavier-uniform, biases 0, class token N(0, 1e-6), patch embedding U(+-sqrt(6 / (3 p^2 + D)))."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        dim, grid = self.hidden_dim, self.image_size // self.patch_size
        del self.encoder.pos_embedding  # torchvision's learned Parameter ...
        self.encoder.register_buffer("pos_embedding", sincos_position_embedding(grid, dim))  # ... becomes fixed
        for name, m in self.named_modules():
            if isinstance(m, nn.MultiheadAttention):  # in_proj_weight = [W_q; W_k; W_v], each (D, D)
                bound = math.sqrt(6.0 / (m.in_proj_weight.shape[0] // 3 + m.in_proj_weight.shape[1]))
                nn.init.uniform_(m.in_proj_weight, -bound, bound)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.Linear):  # MLP blocks and the attention's out_proj
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.class_token, std=1e-6)
        bound = math.sqrt(6.0 / (3 * self.patch_size ** 2 + dim))
        nn.init.uniform_(self.conv_proj.weight, -bound, bound)
        nn.init.zeros_(self.conv_proj.bias)

    def forward(self, x):
        n, _, h, w = x.shape
        gh, gw, g = h // self.patch_size, w // self.patch_size, self.image_size // self.patch_size
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (n, tokens, dim)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        pos = self.encoder.pos_embedding
        if (gh, gw) != (g, g):  # another input size: the table interpolated to its token grid
            grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False).to(pos.dtype)
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        x = self.encoder.ln(self.encoder.layers(self.encoder.dropout(x + pos)))
        return self.heads(x[:, 0])


def _resnet_tiny():
    """A torchvision ResNet with one BasicBlock per stage and widths 16-32-64-128 (~0.3 M parameters)."""
    model, widths = ResNet(BasicBlock, [1, 1, 1, 1]), (16, 32, 64, 128)
    model.inplanes, model.conv1, model.bn1 = 16, nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16)
    for i, width in enumerate(widths):
        setattr(model, f"layer{i + 1}", model._make_layer(BasicBlock, width, 1, stride=2 if i else 1))
    for m in model.modules():  # torchvision's initialisation, for the replaced modules
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model, widths[-1]


def vit_patch_size(img_size):
    """Patch 16 on ImageNet-sized images; on small images a patch that leaves at least 8x8 tokens."""
    return 16 if img_size >= 128 else max(2, img_size // 8)


def build_backbone(arch, small_images=False, img_size=224, zero_init_residual=False, stem_padding=1):
    """(module, feat_dim): images (n, 3, h, w) -> pooled features (n, feat_dim), with torchvision's parameter names
    (`fc` / `heads` = Identity). `small_images` (64 px or less): the CIFAR stem, a 3x3 stride-1 convolution padded by
    `stem_padding` (solo-learn's: 2), no max-pool."""
    if arch == "resnet_tiny":
        model, feat_dim = _resnet_tiny()
    elif arch in ("resnet18", "resnet34", "resnet50"):
        model = getattr(torchvision.models, arch)(zero_init_residual=zero_init_residual)
        feat_dim = model.fc.in_features
    elif arch in ("vit_small", "vit_base"):
        width, heads = (384, 12) if arch == "vit_small" else (768, 12)  # MoCo v3: ViT-S has 12 heads
        model = ViT(image_size=img_size, patch_size=vit_patch_size(img_size), num_layers=12, num_heads=heads,
                    hidden_dim=width, mlp_dim=4 * width)
        model.heads = nn.Identity()
        return model, width
    else:
        raise UserError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if small_images:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, stem_padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    if zero_init_residual:  # each residual branch starts as identity (Goyal et al. 2017)
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)
    model.fc = nn.Identity()
    return model, feat_dim


def to_device(module, device):
    """Move to the device; convnets use channels_last on CUDA (faster convolutions with bf16/fp16)."""
    module = module.to(device)
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in module.modules()):
        module = module.to(memory_format=torch.channels_last)
    return module


# ---- Datasets: CIFAR / STL-10, image folders, scenes with boxes, the synthetic shapes (drawn at the file's end) ------
def box_iou(a, b):
    """IoU of two boxes given as (x, y, w, h)."""
    inter = (max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])) *
             max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def is_image_file(name):
    return name.lower().endswith((".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"))


def load_rgb(path, size_only=False):
    """The image at `path` in RGB; `size_only`: its (width, height), read from the file's header alone."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).size if size_only else Image.open(f).convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}); remove or replace the file") from None


class ImageList(torch.utils.data.Dataset):
    """Images with optional labels (-1 = no label): the folder datasets."""

    def __init__(self, paths, labels=None, classes=None):
        self.paths, self.classes, self.labels = paths, classes, labels if labels is not None else [-1] * len(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return load_rgb(self.paths[index]), self.labels[index]


class SceneBoxes(ImageList):
    """Scene images with candidate object boxes as labels: items are (PIL image, float32 (n, 4) array of x, y, w, h)."""

    def __getitem__(self, index):
        return load_rgb(self.paths[index]), np.asarray(self.labels[index], np.float32).reshape(-1, 4)


def image_folder(root):
    """`root/<class>/*.jpg` (labelled, classes sorted) or images directly in `root` (unlabelled)."""
    if not os.path.isdir(root):
        raise UserError(f"data folder {root} does not exist")
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    found = [(os.path.join(dirpath, f), label) for label, d in enumerate(subdirs)
             for dirpath, _, files in sorted(os.walk(os.path.join(root, d))) for f in sorted(files) if is_image_file(f)]
    if found:
        return ImageList([path for path, _ in found], [label for _, label in found], subdirs)
    flat = sorted(os.path.join(root, f) for f in os.listdir(root) if is_image_file(f))
    if not flat:
        raise UserError(f"no images found in {root}; expected class subfolders or image files")
    return ImageList(flat)


def build_dataset(data, split="train", data_dir="data", download=False, with_unlabeled=False):
    """(PIL RGB image, label) pairs, -1 where there is none. `split`: "train" (a folder's train/, else itself) or
    "val" (val/ or test/, a test set; None if none). `with_unlabeled`: STL-10's unlabeled split with its train split."""
    if data == "synthetic":
        return Synthetic(split)
    train = split == "train"
    if data in ("cifar10", "cifar100", "stl10"):
        which = ({"split": ("train+unlabeled" if with_unlabeled else "train") if train else "test"} if data == "stl10"
                 else {"train": train})  # STL10, CIFAR10, CIFAR100
        try:
            ds = getattr(torchvision.datasets, data.upper())(data_dir, download=download, **which)
        except RuntimeError as e:
            raise UserError(f"{data} was not found in --data-dir {data_dir}; add --download to fetch it "
                            f"({str(e).splitlines()[0]})") from None
        ds.classes = getattr(ds, "classes", None)
        return ds
    if not os.path.exists(data):
        raise UserError(f"--data {data}: no such dataset or folder (choose synthetic, cifar10, cifar100, "
                        "stl10 or give an ImageFolder path)")
    folder = next((os.path.join(data, name) for name in (("train",) if train else ("val", "test"))
                   if os.path.isdir(os.path.join(data, name))), data if train else None)
    return image_folder(folder) if folder else None


def _read_json(path, what):
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e})") from None


def build_scene_dataset(data, data_dir="data", boxes_file=None, split="train"):
    """Scenes with boxes for UniVIP: `synthetic` (exact boxes); `coco`, data_dir/train2017 with its instances file
    (crowd boxes skipped; images without boxes kept: the sampler falls back to random ones); or a folder of images
    with `boxes_file`, JSON: image path (relative to the folder) -> [[x, y, w, h], ...] (e.g. selective search)."""
    if data == "synthetic":
        return Synthetic(split, scenes=True, boxes_only=True)
    if data == "coco":
        year_split = "train2017" if split == "train" else "val2017"
        ann = _read_json(os.path.join(data_dir, "annotations", f"instances_{year_split}.json"), "COCO annotation file")
        try:
            files = {im["id"]: im["file_name"] for im in ann["images"]}
            boxes = {i: [] for i in files}
            for a in ann["annotations"]:
                if not a.get("iscrowd", 0):
                    boxes[a["image_id"]].append(a["bbox"])
        except (KeyError, TypeError):
            raise UserError(f"the COCO annotation file in {data_dir}/annotations is not in COCO instances "
                            "format") from None
        ids = sorted(files)
        return SceneBoxes([os.path.join(data_dir, year_split, files[i]) for i in ids], [boxes[i] for i in ids])
    if boxes_file is None:
        raise UserError(f"--data {data} needs box proposals: pass --boxes FILE.json (image path -> "
                        "[[x, y, w, h], ...])")
    if not os.path.isdir(data):
        raise UserError(f"data folder {data} does not exist")
    table = _read_json(boxes_file, "box file")
    if not isinstance(table, dict) or not table:
        raise UserError(f"box file {boxes_file} must be a non-empty JSON object: image path -> list of [x, y, w, h]")
    for rel, bs in sorted(table.items()):
        if not (isinstance(bs, list) and all(isinstance(b, list) and len(b) == 4 for b in bs)):
            raise UserError(f"box file {boxes_file}: the entry of {rel} is not a list of [x, y, w, h] boxes")
    paths = [os.path.join(data, rel) for rel in sorted(table)]
    if missing := [p for p in paths if not os.path.isfile(p)]:
        raise UserError(f"box file {boxes_file} names {len(missing)} images missing under {data}, e.g. {missing[0]}")
    return SceneBoxes(paths, [table[rel] for rel in sorted(table)])


def num_classes_of(dataset):
    return len(getattr(dataset, "classes", None) or [])


def native_image_size(dataset, sample=64, seed=0):
    """The images' shorter side (crop_sizes's `native`): the median over a seeded sample (a folder's file headers
    only), so one odd file never decides it. CIFAR: 32, STL-10: 96."""
    inner = dataset
    while not isinstance(inner, ImageList) and hasattr(inner, "dataset"):
        inner = inner.dataset  # through wrappers such as a partly labelled view of the data
    if len(inner) == 0:
        raise UserError("the training set is empty")
    picks = np.random.default_rng(seed).choice(len(inner), size=min(sample, len(inner)), replace=False)
    return int(np.median([min(load_rgb(inner.paths[i], size_only=True) if isinstance(inner, ImageList) else
                              inner[int(i)][0].size) for i in picks]))


def crop_sizes(native, global_size=None, local_size=None):
    """-> (small_images, global, local size) from the images' shorter side: <= SMALL_IMAGES px (CIFAR), native size and
    96/224 of it to a multiple of 8 (32 -> 16 px); larger, the references' 224 and 96 px. Set flags win."""
    small = native <= SMALL_IMAGES
    global_size = global_size or (native if small else 224)
    local_size = local_size or (max(8, 8 * round(global_size * 96 / 224 / 8)) if small else 96)
    return small, global_size, local_size


def describe_sizes(native, small, why=None, **sizes):
    """The line every script prints about its crop sizes; `why`: the stem's reason, if not the images' own size."""
    chosen = ", ".join(f"{name.replace('_', ' ')} {px} px" for name, px in sizes.items())
    kind = why or (f"{SMALL_IMAGES} px or less: CIFAR stem" if small else f"above {SMALL_IMAGES} px: ImageNet stem")
    return f"crop sizes: {chosen} (images of about {native} px, {kind})"


# ---- Augmentation building blocks (the methods compose them; each method's pipeline is in its file) ------------------
def to_normalized_tensor(mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def eval_transform(img_size, small_images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize + CenterCrop, no augmentation (Resize 256 / crop 224 on ImageNet-sized images)."""
    resize = img_size if small_images else int(round(img_size * 256 / 224))
    return v2.Compose([v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(img_size),
                       *to_normalized_tensor(mean, std)])


# Batched colour augmentation on the training device. Each op takes images x (B, 3, H, W), float in [0, 1], and one
# parameter per image (a (B,) tensor); it equals torchvision.transforms.v2.functional's op applied to each image with
# its own parameter. None reads a value back to the host (pass parameters on x's device: a number is copied there).
def _per_image(value, x):
    return torch.as_tensor(value, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)


def _gray(x):
    return 0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # torchvision's weights


def adjust_hue(x, h):
    """Shift the hue by h (in turns, in [-0.5, 0.5]) through HSV; h = 0 returns x exactly."""
    h = _per_image(h, x)
    minc, maxc = torch.aminmax(x, dim=1, keepdim=True)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, 1.0)  # grey pixels: chroma 0, any hue gives the same colour
    r, g, b = x.split(1, dim=1)
    hue6 = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    # HSV -> RGB without the six-sector table: channel n (R 5, G 3, B 1) is v - c * clamp(min(k, 4 - k), 0, 1)
    k = (torch.arange(5, 0, -2, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) + hue6 + 6 * h).remainder(6)
    out = maxc - chroma * torch.minimum(k, 4 - k).clamp(0, 1)
    return torch.where(h == 0, x, out)  # the round trip is exact only up to rounding


def grayscale(x):
    return _gray(x).expand_as(x)


def gaussian_taps(sigma, kernel_size):
    """Weights (n, kernel_size) for sigmas (n,): Lindeberg's discrete Gaussian e^-t I_k(t), t = sigma^2, of variance
    exactly sigma^2 (before the cut) as PIL's box blurs aim at; torchvision's sampled density is nearly a delta below
    0.5 px. I_k(t) = sum_j (t/2)^(2j+k) / (j! (j+k)!), in float64, log domain."""
    half = kernel_size // 2
    k = torch.arange(-half, half + 1, dtype=torch.float64, device=sigma.device).abs().view(1, -1, 1)
    j = torch.arange(20 + half * half, dtype=torch.float64, device=sigma.device)  # enough terms up to 3 sigma = half
    t = sigma.double().pow(2).clamp_min(1e-12).view(-1, 1, 1)
    log_terms = (2 * j + k) * torch.log(t / 2) - torch.lgamma(j + 1) - torch.lgamma(j + k + 1)
    w = torch.exp(torch.logsumexp(log_terms, -1) - t.view(-1, 1))
    return torch.where(sigma.view(-1, 1) > 0, w / w.sum(1, keepdim=True), (k.view(1, -1) == 0).double())  # 0: identity


def gaussian_blur(x, sigma, kernel_size):
    """Separable blur of variance sigma^2 per image (0: none), one grouped conv2d per direction. Borders mirrored with
    the edge pixel repeated (1, 0 | 0, 1), as PIL's box blurs come out; without, far from PIL (tests/test_color.py)."""
    B, C, H, W = x.shape
    half = kernel_size // 2
    w = gaussian_taps(_per_image(sigma, x).view(-1), kernel_size).to(x.dtype).repeat_interleave(C, 0)
    mirrored = [torch.arange(-half, n + half, device=x.device).remainder(2 * n) for n in (H, W)]
    rows, cols = [torch.where(i < n, i, 2 * n - 1 - i) for i, n in zip(mirrored, (H, W))]
    y = x[:, :, rows][:, :, :, cols].reshape(1, B * C, H + 2 * half, W + 2 * half)
    y = F.conv2d(y, w.view(B * C, 1, 1, kernel_size), groups=B * C)
    return F.conv2d(y, w.view(B * C, 1, kernel_size, 1), groups=B * C).view(B, C, H, W)


def solarize(x, threshold):
    return torch.where(x >= _per_image(threshold, x), 1 - x, x)


def _jitter_blend(x, op, b, c, s):
    """One step of ColorJitter, per image: op 0 brightness, 1 contrast, 2 saturation (all blends, with 0, the
    mean grey or the grey, so one blend does them all), 3 nothing."""
    gray = _gray(x)
    target = torch.where(op == 1, gray.mean((2, 3), keepdim=True), torch.where(op == 2, gray, 0.0))
    f = torch.where(op == 0, b, torch.where(op == 1, c, torch.where(op == 2, s, 1.0)))
    return (x * f + target * (1 - f)).clamp(0, 1)


class PILGaussianBlur:
    """PIL's Gaussian blur of a PIL image, sigma uniform in (low, high), drawn from torch's RNG (seeded per image)."""
    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=torch.empty(()).uniform_(*self.sigma).item()))

    def __repr__(self):
        return f"PILGaussianBlur(sigma={self.sigma})"


class ColorAugmentation:
    """SimCLR/BYOL photometric augmentation, batched on the training device, each image with its own draw: the
    distribution of RandomApply([ColorJitter(*jitter)], jitter_p), RandomGrayscale(gray_p), Gaussian blur (sigma
    uniform in sigma * blur_scale) with blur_p, RandomSolarize(128, solarize_p), Normalize(mean, std), split in two:
    `sample()` draws one image's parameters in the DataLoader worker (torch's RNG, seeded per image), `__call__(images,
    params)` applies a batch of them on the GPU. Parameters (NUM_PARAMS = 11; an op not applied stores its identity):
    0-2 brightness, contrast, saturation factors, 3 hue shift, 4-7 the jitter order (the op at each position: 0-3 in
    that order), 8 grayscale, 9 blur sigma, 10 solarize. `blur_scale` (crop_size / 224) scales sigma to the crop; the
    kernel spans 3 of the largest sigma each side. Every method turns the blur off at 64 px or less (solo-learn's CIFAR
    recipes; sigma x 32/224 <= 0.29 px there). Ops with probability 0 are skipped.

    Where every script differs from its reference (torchvision on PIL images): PIL rounds to uint8 after every op
    (jittered images 1.3 levels darker on average), computes hue in 8-bit HSV (up to 5.6 levels apart at |hue| <=
    0.2); solarize here thresholds the unrounded value. PIL's blur is three box blurs aiming at variance sigma^2,
    rounded between passes (unchanged at sigma 0.1); here one discrete Gaussian of that variance: up to 8.2 levels
    apart (50 CIFAR-10 images, tests/test_color.py). GPUs with bf16: bf16 autocast, no scaler (references: fp16)."""

    NUM_PARAMS = 11

    def __init__(self, *, jitter, jitter_p, gray_p, blur_p, sigma, solarize_p, blur_scale=1.0, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD):
        b, c, s, h = self.jitter = jitter
        self.low = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        self.high = torch.tensor([1 + b, 1 + c, 1 + s, h])
        self.jitter_p, self.gray_p, self.blur_p, self.solarize_p = jitter_p, gray_p, blur_p, solarize_p
        self.hue, self.sigma = h > 0, (sigma[0] * blur_scale, sigma[1] * blur_scale)
        self.kernel_size = max(3, 2 * math.ceil(3 * self.sigma[1]) + 1)
        self.norm = (mean, std)
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def torchvision(self, geometric):
        """`geometric` (crop, flip), then these ops as torchvision transforms of a PIL image in the worker (the
        references' form: slower with few cores, PIL's rounding) -> normalised float tensor."""
        ops = [geometric, v2.RandomApply([v2.ColorJitter(*self.jitter)], p=self.jitter_p),
               v2.RandomGrayscale(self.gray_p)]
        if self.blur_p > 0:  # PIL's, as the references' (torchvision's GaussianBlur barely blurs below sigma 0.5)
            ops.append(v2.RandomApply([PILGaussianBlur(self.sigma)], p=self.blur_p))
        if self.solarize_p > 0:
            ops.append(v2.RandomSolarize(128, p=self.solarize_p))
        return v2.Compose(ops + to_normalized_tensor(*self.norm))

    def sample(self):
        u = torch.rand(9)  # the same draws whichever ops apply
        params = torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0])  # identity for every op
        params[4:8] = torch.randperm(4)  # ColorJitter's random order of its four ops
        if u[4] < self.jitter_p:
            params[:4] = self.low + (self.high - self.low) * u[:4]
        if u[6] < self.blur_p:
            params[9] = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[5]
        params[8], params[10] = float(u[7] < self.gray_p), float(u[8] < self.solarize_p)
        return params

    def __call__(self, images, params):
        """uint8 (or float in [0, 1]) images (B, 3, H, W) and params (B, NUM_PARAMS) -> normalised float32."""
        with torch.autocast(images.device.type, enabled=False):  # float32 whatever the caller's autocast
            x = images.float() / 255 if not images.is_floating_point() else images.float()
            p = params.float().view(-1, self.NUM_PARAMS, 1, 1)
            b, c, s, h = p[:, 0:1], p[:, 1:2], p[:, 2:3], p[:, 3:4]
            if self.jitter_p > 0:  # each image's four jitter ops in its own order, the costly hue run once:
                order = p[:, 4:8]  # the blends that precede each image's hue, its hue, the blends that follow
                hue_at = (order == 3).float().argmax(1, keepdim=True)
                for k in range(3):
                    x = _jitter_blend(x, torch.where(k < hue_at, order[:, k:k + 1], 3.0), b, c, s)
                if self.hue:
                    x = adjust_hue(x, h)
                for k in range(1, 4):
                    x = _jitter_blend(x, torch.where(k > hue_at, order[:, k:k + 1], 3.0), b, c, s)
            x = torch.where(p[:, 8:9] > 0, grayscale(x), x)
            if self.blur_p > 0:  # the where keeps others exact where TF32 convolutions round a delta kernel
                x = torch.where(p[:, 9:10] > 0, gaussian_blur(x, p[:, 9], self.kernel_size), x)
            x = solarize(x, torch.where(p[:, 10] > 0, 128 / 255, 2.0))  # as RandomSolarize(128) on uint8
            if self.mean.device != x.device:  # copied once, not on every call (a pageable copy waits for the GPU)
                self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
            return (x - self.mean) / self.std

    def view(self, geometric, image):
        """Worker side of one view: `geometric` (PIL -> PIL: crop, flip) -> (uint8 tensor, colour params)."""
        return v2.functional.pil_to_tensor(geometric(image)), self.sample()

    def on_device(self, views, device):
        """Device side: collated views of one size, [(uint8 images (B, 3, h, w), params (B, P)), ...], copied
        asynchronously, augmented in one call (channels_last on CUDA), split back per view (networks see each alone)."""
        on = lambda i: torch.cat([v[i].to(device, non_blocking=True) for v in views])
        x = self(on(0), on(1))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return list(x.chunk(len(views)))


# ---- Loaders with exactly reproducible augmentation; features and weighted kNN (DINO's protocol) ---------------------
class EpochSampler(torch.utils.data.Sampler):
    """This process's share of a seeded shuffle as (index, epoch) pairs: the augmentation is seeded by (seed, epoch,
    index), the same whatever the workers and after a resume."""

    def __init__(self, dataset_len, rank=0, world_size=1, seed=0, subset=0):
        self.indices = np.arange(dataset_len)
        if 0 < subset < dataset_len:  # a fixed subset, the same for every run with this seed
            self.indices = np.sort(np.random.default_rng(seed).permutation(dataset_len)[:subset])
        self.rank, self.world_size, self.seed, self.epoch, self.skip = rank, world_size, seed, 0, 0
        self.per_rank = len(self.indices) // world_size  # drop the tail: every rank, same step count

    def set_epoch(self, epoch, skip=0):
        """Start `epoch`; `skip` > 0 leaves out its first samples of this process (resume inside an epoch)."""
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.indices))
        mine = order[: self.per_rank * self.world_size][self.rank::self.world_size]
        return iter([(int(self.indices[i]), self.epoch) for i in mine[self.skip:]])

    def __len__(self):
        return self.per_rank


class Augmented(torch.utils.data.Dataset):
    """Applies `transform(image, target) -> sample` with RNGs seeded by (seed, epoch, index)."""

    def __init__(self, dataset, transform, seed=0):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, epoch = key
        image, target = self.dataset[index]
        seed = hash((self.seed, epoch, index)) % 2**62
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone (workers=0)
            state = random.getstate()
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.transform(image, target)
            finally:
                random.setstate(state)


def train_loader(dataset, transform, batch_size, ddp, workers, seed, subset=0, collate_fn=None):
    """`transform(image, target)` builds one sample; `batch_size` is per process; loader.sampler.set_epoch(epoch)."""
    sampler = EpochSampler(len(dataset), ddp.rank, ddp.world_size, seed, subset)
    if len(sampler) < batch_size:
        raise UserError(f"the training set has {len(sampler) * ddp.world_size} images, fewer than one batch "
                        f"({batch_size * ddp.world_size}); lower --batch-size")
    return torch.utils.data.DataLoader(
        Augmented(dataset, transform, seed), batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=ddp.device.type == "cuda", persistent_workers=workers > 0, drop_last=True,
        collate_fn=collate_fn, prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed))  # not the global RNG: resume stays exact with workers


class Transformed(torch.utils.data.Dataset):
    """(transform(image), label) for evaluation, on an optional list of indices."""

    def __init__(self, dataset, transform, indices=None):
        self.dataset, self.transform = dataset, transform
        self.indices = list(range(len(dataset)) if indices is None else indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        image, label = self.dataset[self.indices[i]]
        return self.transform(image), label


@torch.no_grad()
def extract_features(model, dataset, batch_size, workers, device, autocast=None):
    """Features and labels of every item of `dataset`, in order, on every process (each embeds a strided share)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank, n = dist.get_rank() if world > 1 else 0, len(dataset)
    if n < world:
        raise UserError(f"the evaluation set has {n} images, fewer than the {world} processes")
    feats, labels, was_training = [], [], model.training
    model.eval()
    loader = torch.utils.data.DataLoader(  # a generator of its own: iterating leaves the global RNG alone
        torch.utils.data.Subset(dataset, range(rank, n, world)), batch_size=batch_size, shuffle=False,
        num_workers=workers, pin_memory=device.type == "cuda", generator=torch.Generator())
    for images, y in loader:
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.to(memory_format=torch.channels_last)
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            feats.append(model(images).float())
        labels.append(torch.as_tensor(y).to(device))
    model.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world == 1:
        return feats, labels
    per = math.ceil(n / world)  # pad every share to the same length, gather, then restore the order
    pad_f, pad_y = feats.new_zeros(per, feats.shape[1]), labels.new_full((per,), -1)
    pad_f[: len(feats)], pad_y[: len(labels)] = feats, labels
    all_f, all_y = all_gather_nograd(pad_f), all_gather_nograd(pad_y)  # rank-major
    order = torch.arange(per * world, device=device).view(world, per).t().reshape(-1)
    return all_f[order][:n], all_y[order][:n]


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, num_classes, k=20, temperature=0.07):
    """Weighted kNN (Wu et al. 2018, as in DINO): cosine similarity, top-k neighbours voting with weight exp(sim / T),
    unlabelled (-1) training items ignored, the test set in chunks (any size). Returns top-1 and top-5 accuracy in %."""
    keep = train_labels >= 0
    train, train_labels = F.normalize(train_features[keep].float(), dim=1), train_labels[keep]
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, len(train))
    top1 = top5 = 0.0
    for start in range(0, len(test), 1024):
        sim, idx = (test[start:start + 1024] @ train.t()).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        pred = votes.topk(min(5, num_classes), dim=1).indices
        target = test_labels[start:start + 1024].view(-1, 1)
        top1 += (pred[:, :1] == target).sum().item()
        top5 += (pred == target).any(dim=1).sum().item()
    n = max(1, len(test))
    return 100.0 * top1 / n, 100.0 * top5 / n


class KNNMonitor:
    """kNN top-1 on the val split (None without labels or val). Bank: the labelled training images in use, at most
    `bank` by a fixed seeded choice (ImageNet: 20,000 + 50,000 val images, 5 % of embedding all 1.28 M)."""

    def __init__(self, data, data_dir, img_size, small_images, workers, device, subset=0, seed=0, download=False,
                 bank=KNN_BANK, train=None, batch_size=256, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        # `train`: the script's training set (not built twice), unless it has unlabelled images (STL-10's unlabeled)
        if train is None or getattr(train, "split", None) == "train+unlabeled":
            train = build_dataset(data, "train", data_dir, download)
        val = build_dataset(data, "val", data_dir, download)
        self.data, self.where = data, ""  # `where`: " on DATA" in the lines, where it is not the training data
        self.num_classes = num_classes_of(train)
        self.enabled = val is not None and self.num_classes > 0
        if not self.enabled:
            return
        tf = eval_transform(img_size, small_images, mean, std)
        indices = EpochSampler(len(train), subset=subset, seed=seed).indices
        if 0 < bank < len(indices):  # the same bank at every monitor and after a resume
            indices = np.sort(np.random.default_rng([seed, bank]).choice(indices, bank, replace=False))
        self.train, self.val = Transformed(train, tf, indices), Transformed(val, tf)
        self.batch_size, self.workers, self.device = batch_size, workers, device

    def __call__(self, backbone, autocast=None):
        if not self.enabled:
            return None
        ftrain, ytrain = extract_features(backbone, self.train, self.batch_size, self.workers, self.device, autocast)
        fval, yval = extract_features(backbone, self.val, self.batch_size, self.workers, self.device, autocast)
        return dict(zip(("knn_top1", "knn_top5"), knn_classify(ftrain, ytrain, fval, yval, self.num_classes)))


# ---- What a method's step calls: collectives, the momentum update, parameter groups, LARS, schedules -----------------
def all_gather_nograd(x):
    """Concatenate a tensor over processes along dim 0, without gradient (keys, memory writes)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def all_reduce_sum(x):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def param_groups(modules, weight_decay):
    """Weights (ndim >= 2) get weight decay; biases and norm parameters (ndim < 2) get none and are
    excluded from LARS adaptation (`lars_exclude`), as in SimCLR, BYOL, MoCo v3 and t-ReX."""
    params = [p for m in ([modules] if isinstance(modules, nn.Module) else modules) for p in m.parameters()
              if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lars_exclude": True}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017) as BYOL and MoCo v3 use it: update = g + wd w,
    scaled by eta ||w|| / ||update|| (1 if either norm is 0), then momentum (DeepMind's formula; solo-learn's divides by
    ||g|| + wd ||w||, up to 2r / (1 - r) apart, r = wd ||w|| / ||g||). `lars_exclude` groups skip decay and adaptation.
    `clip` (LARC): scale min(eta ||w|| / (lr ||update||), 1), at most eta of a layer's norm per step whatever the lr."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001, clip=False):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, clip=clip, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["lars_exclude"]:
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                trust = [torch.where((w > 0) & (g > 0), group["trust_coefficient"] * w / g, torch.ones_like(w))
                         for w, g in zip(torch._foreach_norm(params), torch._foreach_norm(grads))]
                if group.get("clip"):  # at lr 0, t / 0 = inf: scale 1, as LARC's min(ratio / lr, 1)
                    trust = [(t / group["lr"]).clamp(max=1.0) for t in trust]
                grads = torch._foreach_mul(grads, trust)
            bufs = [self.state[p]["momentum_buffer"] if "momentum_buffer" in self.state[p] else
                    self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])


def cosine_schedule(base, final, epochs, iters_per_epoch, warmup_epochs=0.0, warmup_start=0.0, endpoint=True):
    """Per-iteration values (exact after a resume): linear warmup from `warmup_start` towards `base`, then cosine to
    `final` on the last step. `endpoint=False` is DINO's, swav's and naver/trex's cosine_scheduler: warmup ending at
    `base`, then final - (final - base)(1 + cos(pi t / T)) / 2, t = 0 .. T - 1 (MoCo v3's momentum, without warmup)."""
    total = int(epochs * iters_per_epoch)
    warmup = min(int(warmup_epochs * iters_per_epoch), total)
    ramp = np.linspace(warmup_start, base, warmup, endpoint=not endpoint)
    if endpoint:
        t = np.linspace(0.0, 1.0, total - warmup)  # the last iteration lands exactly on `final`
        cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))
    else:
        t, n = np.arange(total - warmup), total - warmup
        cosine = final - (final - base) * (1 + np.cos(np.pi * t / n)) / 2
    return np.concatenate([ramp, cosine]).tolist()  # Python floats: optimizer states stay weights_only-loadable


@torch.no_grad()
def momentum_update(target_params, online_params, momentum):
    """target <- m * target + (1 - m) * online, as one fused foreach op over all tensors."""
    torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ==============================================================================================
# THE PLUMBING. A reader needs none of what follows to understand a method: flags, processes, seeds, precision,
# checkpoints and resume, the training-run helper (preemption included); last, the synthetic data's drawing.
# ==============================================================================================
def run_main(main):
    """Call `main()`; turn a UserError (also one raised inside a loader worker) into one line and exit 2."""
    try:
        main()
    except UserError as e:
        msg = str(e)
        if "Original Traceback" in msg:  # re-raised by a DataLoader worker: keep the worker's sentence
            msg = re.split(r"UserError: ", msg)[-1]
        print(f"error: {msg.strip()}", file=sys.stderr)
        sys.exit(2)
    finally:
        destroy_process_group()


def destroy_process_group():
    """If a group is up. torch 2.1 may destroy a gloo group holding the GIL while one of its threads needs it to free
    the last collective's tensors: a rare deadlock, which a short sleep avoids."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "gloo":
            time.sleep(0.2)
        dist.destroy_process_group()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`(default: X)` after each flag's help, unless the help gives its default itself (a rule the recipe applies)."""
    def _get_help_string(self, action):
        return action.help if "default" in (action.help or "") else super()._get_help_string(action)


def add_common_args(parser, method, *, epochs, batch_size, lr, wd, warmup_epochs, arch="resnet_tiny",
                    eval_every=10, demo_subset=0):
    """The flags every script shares; the paper's defaults, but data, arch, epochs, batch size and `demo_subset` (of
    --data synthetic) are the CPU demo's. `lr`, `wd`, `warmup_epochs`: a number, or the recipe's rule (a str)."""
    g = parser.add_argument_group("common options (same in every script)")
    g.add_argument("--data", default="synthetic", help="synthetic (embedded, no download), cifar10, cifar100, stl10, "
                   "or the path of an ImageFolder root with train/ and val/ (or test/)")
    g.add_argument("--data-dir", default="data", help="root of the torchvision datasets (cifar10, ...)")
    g.add_argument("--download", action="store_true", help="download the torchvision dataset into --data-dir")
    g.add_argument("--subset", type=int, default=None, help="train on a fixed random subset of this many images, 0 = "
                   f"all (default: {demo_subset or 'all'} with --data synthetic, the CPU demo; all otherwise)")
    parser.set_defaults(demo_subset=demo_subset, script=method)  # `script`: which method wrote a checkpoint
    g.add_argument("--arch", default=arch, choices=ARCHS, help="backbone; resnet_tiny is the CPU demo network")
    g.add_argument("--epochs", type=int, default=epochs, help="number of training epochs")
    g.add_argument("--batch-size", type=int, default=batch_size, help="global batch, split evenly across processes")
    recipe = lambda value, what: (dict(default=None, help=f"{what} (default: {value})") if isinstance(value, str)
                                  else dict(default=value, help=what))  # a rule (str): the recipe sets it later
    g.add_argument("--lr", type=float, **recipe(lr, "base learning rate (the method's docstring says how it scales)"))
    g.add_argument("--wd", type=float, **recipe(wd, "weight decay"))
    g.add_argument("--warmup-epochs", type=float, **recipe(warmup_epochs, "linear warmup length, per iteration"))
    g.add_argument("--workers", type=int, default=(workers := min(8, os.cpu_count() or 1)),
                   help=f"data loader processes per GPU (default: the CPU count up to 8, here {workers})")
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto = bf16 on GPUs that support it, fp16 with a grad scaler on older GPUs, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks (before the DDP wrap)")
    g.add_argument("--out", default=f"runs/{method}", help="output folder; training resumes from its checkpoint.pt")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--save-every", type=float, default=0, metavar="MINUTES", help="also save checkpoint.pt every this "
                   "many minutes (0: at epoch ends only), for machines that die without a signal (SIGTERM saves)")
    g.add_argument("--log-every", type=int, default=20, help="steps between progress-bar and NaN checks")
    g.add_argument("--eval-every", type=int, default=eval_every, help="epochs between kNN monitors (also before "
                   "training and after the last epoch); 0 = off")
    g.add_argument("--eval-subset", type=int, default=KNN_BANK, help="kNN monitor's memory bank: a fixed seeded subset "
                   "of this many labelled training images, 0 = all in use (bounds the monitor's cost)")
    return g


def check_common_args(args, world_size):
    """Resolve --subset, then reject bad values with one sentence before anything is built or written."""
    if args.subset is None:
        args.subset = args.demo_subset if args.data == "synthetic" else 0
    if args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    if args.batch_size < 1 or args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must be a positive multiple of the number of "
                        f"processes ({world_size})")
    unset_or = lambda value, ok: value is None or ok(value)  # unset: the method's recipe fills it in later
    if not (unset_or(args.lr, lambda v: v > 0) and unset_or(args.wd, lambda v: v >= 0)
            and unset_or(args.warmup_epochs, lambda v: v >= 0) and args.subset >= 0):
        raise UserError("--lr must be positive and --wd, --warmup-epochs, --subset must not be negative")
    if args.log_every < 1 or min(args.eval_every, args.workers, args.save_every, args.eval_subset) < 0:
        raise UserError("--log-every must be at least 1; --eval-every, --eval-subset, --workers and --save-every "
                        "must not be negative")
    check_out_folder(args.out)
    if args.compile and world_size > 1 and torch.cuda.is_available():  # SyncBatchNorm traced by torch.compile
        raise UserError("--compile with several GPU processes has not been run yet (SyncBatchNorm, torch.compile "
                        "and DDP together); run without --compile, or --compile on one GPU")
    if args.compile and (why := compile_unsupported()):
        raise UserError(f"--compile is not available here: {why}; run without --compile or with a newer torch")


def compile_unsupported():
    """Why torch.compile cannot run here (e.g. Python 3.12 needs torch >= 2.4), or None."""
    try:
        import torch._dynamo  # on demand: only --compile and the compile tests need it
        getattr(torch._dynamo.eval_frame, "check_if_dynamo_supported", lambda: None)()
    except (ImportError, RuntimeError) as e:
        return f"{e} (torch {torch.__version__}, Python {platform.python_version()})"
    return None


def check_out_folder(out, flag="--out"):
    """An output folder that exists, or can be created: no file in its place or above it."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{flag} {out} is a file, not a folder; choose another {flag}")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {out} cannot be created: {parent} is " +
                        ("a file" if not os.path.isdir(parent) else "not writable") + f"; choose another {flag}")


def init_distributed():
    """One process, or torchrun's (its environment), NCCL on CUDA, gloo on CPU. -> rank, world_size, local_rank,
    device, is_main, distributed."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    per_node, gpus = max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), local_rank + 1), torch.cuda.device_count()
    if device.type == "cuda" and per_node > gpus:  # every process says it, not only those without a GPU
        raise UserError(f"{per_node} processes per node need a GPU each, and the number of GPUs visible here is "
                        f"{gpus}: set torchrun's --nproc_per_node to at most {gpus}")
    if device.type == "cuda":  # this process's GPU; cuDNN's autotuner. TF32: convolutions yes (cuDNN's default),
        torch.cuda.set_device(device)  # matmuls no (torch's): the logits and similarities called fp32 are fp32
        torch.backends.cudnn.benchmark = True
    if world_size > 1 and not dist.is_initialized():
        # device_id (bind NCCL to this GPU at once) is torch >= 2.3; before, set_device above is what picks it
        bind = device.type == "cuda" and "device_id" in inspect.signature(dist.init_process_group).parameters
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **({"device_id": device} if bind else {}))
    return SimpleNamespace(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                           is_main=rank == 0, distributed=world_size > 1)


def mixed_precision(precision, device):
    """Returns (autocast context factory, GradScaler). bf16 needs no scaler; fp16 does; fp32 neither."""
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    dtype, scaled = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision), precision == "fp16"
    # torch.amp.GradScaler is torch >= 2.3; 2.1 and 2.2's torch.cuda.amp one: the same on CUDA, disabled (CPU) a no-op
    scaler = (torch.amp.GradScaler(device.type, enabled=scaled) if hasattr(torch.amp, "GradScaler") else
              torch.cuda.amp.GradScaler(enabled=scaled))
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None), scaler


def atomic_save(obj, path):
    """Write to a temporary file in the same folder, then rename: a crash never leaves a broken file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def clean_state_dict(state_dict):
    """torchvision key names: no `module.` / `_orig_mod.` prefixes, no classifier (`fc.`, `heads.`)."""
    renamed = ((k.replace("_orig_mod.", "").replace("module.", ""), v) for k, v in state_dict.items())
    return {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in renamed if not k.startswith(("fc.", "heads."))}


def plain_args(args):
    """argparse namespace -> dict of JSON-able values (the record must load with weights_only)."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v))
            for k, v in vars(args).items()}


def backbone_record(backbone, *, method, arch, small_images, img_size, feat_dim, args, epoch,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, stem_padding=1):
    return {"method": method, "arch": arch, "small_images": bool(small_images), "img_size": int(img_size),
            "mean": list(mean), "std": list(std), "feat_dim": int(feat_dim), "stem_padding": int(stem_padding),
            "state_dict": clean_state_dict(backbone.state_dict()), "args": plain_args(args), "epoch": int(epoch)}


def load_weights_only(path):
    """torch.load(weights_only=True) onto the CPU, without torch 2.1's warning about its own TypedStorage use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


# Options a resumed run may change: where and how fast it runs, what it monitors, and two a user changes on purpose
# (--lr after a non-finite loss, --epochs to train longer; schedules are recomputed from them). All others must match.
FREE_ON_RESUME = ("out", "data_dir", "eval_data_dir", "download", "workers", "compile", "save_every", "log_every",
                  "eval_every", "eval_subset", "lr", "epochs")


def resume_mismatches(ckpt, args, model=None, optimizer=None, scaler=None):
    """Why `ckpt` is not this run, a phrase each: options (but FREE_ON_RESUME), tensors, optimizer groups, fp16."""
    old, new = ckpt.get("args", {}), plain_args(args)
    as_list = lambda v: list(v) if isinstance(v, tuple) else v  # argparse gives lists where defaults are tuples
    found = [f"--{k.replace('_', '-')} {old[k]} there, {new[k]} here" for k in old
             if k in new and k not in FREE_ON_RESUME and as_list(old[k]) != as_list(new[k])]
    if model is not None and "model" in ckpt:
        there, here = ({k: tuple(v.shape) for k, v in sd.items()} for sd in (ckpt["model"], model.state_dict()))
        if differ := sorted(k for k in there.keys() | here.keys() if there.get(k) != here.get(k)):
            found.append(f"{len(differ)} of the model's tensors differ ({differ[0]}: {there.get(differ[0], 'none')} "
                         f"there, {here.get(differ[0], 'none')} here)")
    if optimizer is not None and "optimizer" in ckpt:
        groups = ckpt["optimizer"]["param_groups"], optimizer.param_groups
        there, here = ([len(g["params"]) for g in gs] for gs in groups)
        found += [f"optimizer parameter groups of {there} tensors there, {here} here"] if there != here else []
    if scaler is not None and "scaler" in ckpt and bool(ckpt["scaler"]) != scaler.is_enabled():
        fp16 = lambda on: "fp16 (a grad scaler)" if on else "bf16 or fp32 (no grad scaler)"
        found.append(f"{fp16(ckpt['scaler'])} there, {fp16(scaler.is_enabled())} here")
    return found


def load_checkpoint(out, args, model=None, optimizer=None, scaler=None):
    """`out`/checkpoint.pt if any and this run's (else one sentence naming why, nothing written). Tidies `out`: killed
    saves' temporaries removed, log.jsonl cut to the checkpoint's epochs (removed with no checkpoint)."""
    path, log, ckpt = os.path.join(out, "checkpoint.pt"), os.path.join(out, "log.jsonl"), None
    is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if os.path.exists(path):
        try:
            ckpt = load_weights_only(path)
        except Exception as e:
            raise UserError(f"{path} cannot be read ({type(e).__name__}); delete it or use another --out") from None
        script = ckpt.get("args", {}).get("script")  # the method file that wrote it (set by add_common_args)
        if script is None:
            raise UserError(f"{path} was written by an older version of these scripts (it does not say which "
                            "method); use another --out")
        if script != args.script:
            raise UserError(f"{path} is a checkpoint of {script}, not of {args.script}; use another --out")
        if found := resume_mismatches(ckpt, args, model, optimizer, scaler):
            raise UserError(f"{path} was trained with other options: {'; '.join(found)}; resume with the same "
                            "options or use another --out")
    for name in os.listdir(out) if is_main and os.path.isdir(out) else []:
        if re.fullmatch(r".+\.pt\.tmp\d+", name):  # atomic_save's temporaries: only a killed run leaves one
            os.remove(os.path.join(out, name))
    if is_main and os.path.exists(log) and ckpt is None:  # left by a run killed before its first checkpoint
        os.remove(log)
    elif is_main and os.path.exists(log):
        with open(log) as f:
            lines = [line for line in f if line.strip()]
        kept = [line for line in lines if json.loads(line).get("epoch", 0) <= ckpt["epoch"]]
        if len(kept) < len(lines):
            with open(f"{log}.tmp{os.getpid()}", "w") as f:
                f.writelines(kept)
            os.replace(f"{log}.tmp{os.getpid()}", log)
    return ckpt


# ---- The training-run helper: everything around a method's step ------------------------------------------------------
def init_run(args, check_method_args):
    """Processes, flags (checked before anything is read or written), seeds (one stream per process) -> `ddp`."""
    ddp = init_distributed()
    check_common_args(args, ddp.world_size)
    check_method_args(args)
    random.seed(args.seed + ddp.rank)
    np.random.seed((args.seed + ddp.rank) % 2**32)
    torch.manual_seed(args.seed + ddp.rank)
    return ddp


def rng_state(device):
    """torch's CPU stream, Python's and this process's GPU's (not every visible GPU's: a resume may see fewer)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and torch.is_tensor(state["cuda"]):  # a CPU run's checkpoint has none
        torch.cuda.set_rng_state(state["cuda"], device)


class TrainingRun:
    """The glue around a method's training step (DINO's `restart_from_checkpoint` and `MetricLogger.log_every`). The
    constructor only stores; the methods run in the order every `main()` shows."""

    def __init__(self, args, ddp, model, optimizer, scaler, autocast, *, backbone, record, recipe=None):
        self.args, self.ddp, self.plain, self.optimizer, self.scaler, self.autocast = (
            args, ddp, model, optimizer, scaler, autocast)
        self.backbone, self.record, self.recipe = backbone, dict(record, arch=args.arch), recipe
        # where the backbone sits in the model's state dict: checkpoint.pt holds each tensor once
        self.backbone_prefix = next(name for name, m in model.named_modules() if m is backbone) + "."
        self.start_epoch, self.step, self.resumed, self.resumed_totals = 0, 0, False, {}
        self.knn = self.knn_init = self.knn_last = None

    def resume(self):
        """Loads --out's checkpoint.pt if any: model, optimizer, grad scaler, this process's random streams, and where
        it stopped (inside an epoch: at its next batch). Returns the epoch to start at."""
        args, ddp = self.args, self.ddp
        ckpt = load_checkpoint(args.out, args, self.plain, self.optimizer, self.scaler)
        if ckpt is not None:
            self.plain.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.start_epoch, self.step, self.resumed_totals = ckpt["epoch"], ckpt["step"], ckpt.get("totals", {})
            self.knn_init = ckpt.get("knn_init")
            set_rng_state(ckpt["rng"][ddp.rank % len(ckpt["rng"])], ddp.device)  # this process's own streams
        self.resumed = ckpt is not None
        return self.start_epoch

    def distribute(self, broadcast_buffers=True):
        """The model the step calls: SyncBatchNorm on several GPUs (global-batch statistics, as the references'), then
        --compile, then DDP under torchrun (buffers sent from rank 0 before each forward if `broadcast_buffers`)."""
        ddp = self.ddp
        if ddp.distributed and ddp.device.type == "cuda":
            self.plain = nn.SyncBatchNorm.convert_sync_batchnorm(self.plain)  # same Parameters: optimizer valid
        self.model = torch.compile(self.plain) if self.args.compile else self.plain  # compile before the DDP wrap
        if ddp.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ddp.local_rank] if ddp.device.type == "cuda" else None,
                broadcast_buffers=broadcast_buffers)
        return self.model

    def start(self, knn=None):
        """log.jsonl's header and the `recipe:` line; the kNN monitor at random init (unless resumed); from now on
        SIGTERM and SIGUSR1 (how clusters stop jobs) finish the step in progress, save and stop."""
        args, ddp, self.knn = self.args, self.ddp, knn
        self.log_path = os.path.join(args.out, "log.jsonl")
        if ddp.is_main:
            os.makedirs(args.out, exist_ok=True)
            if not self.resumed:
                self._write({
                    "args": plain_args(args), "torch": torch.__version__, "torchvision": torchvision.__version__,
                    "python": platform.python_version(), "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
                    "time": time.strftime("%Y-%m-%d %H:%M:%S"), "recipe": self.recipe})
            if self.recipe:
                print("recipe: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.recipe.items()))
        if not self.resumed and knn is not None:
            self.knn_init = knn(self.backbone, self.autocast)
            if ddp.is_main and self.knn_init:
                self._write({"epoch": 0, **self.knn_init})
                print(f"random-init backbone: kNN top-1 {self.knn_init['knn_top1']:.1f}%{knn.where}")
        if ddp.is_main and knn is not None and not knn.enabled:
            print(f"kNN monitor off: {knn.data} has no labelled validation split")
        self.signal, self.last_save = None, time.monotonic()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, lambda signum, frame: setattr(self, "signal", signal.Signals(signum).name))

    def _write(self, line):  # one line of log.jsonl
        with open(self.log_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def steps(self, loader, epoch):
        """Yields (step, batch) for the epoch's steps not yet done, in train mode, with a progress bar, a NaN check
        every --log-every steps, a save on a signal or every --save-every minutes; then speed, data wait, memory."""
        args, ddp, self.loader = self.args, self.ddp, loader
        skip = self.step - epoch * len(loader) if epoch == self.start_epoch else 0
        loader.sampler.set_epoch(epoch, skip=skip * (args.batch_size // ddp.world_size))
        self.model.train()  # the evaluations put back the mode they found; this is for a method's evaluate()
        self.totals = ({k: v.to(ddp.device) if ddp.is_main else torch.zeros_like(v, device=ddp.device)
                        for k, v in self.resumed_totals.items()} if skip else {})
        self.recent, self.last, self.waited = [], {}, 0.0
        epoch_step = bar_step = self.step
        bar = tqdm(loader, total=len(loader), initial=skip, disable=not ddp.is_main,
                   desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        # data_wait, the epoch's share spent waiting for batches: near 0 compute-bound, well above 0 input-bound
        epoch_start = bar_start = waiting = time.perf_counter()
        for batch in bar:
            self.waited += time.perf_counter() - waiting
            yield self.step, batch
            self.step += 1
            if self.step % args.log_every == 0:
                loss, now = self._sync()
                rate = (self.step - bar_step) * args.batch_size / max(now - bar_start, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
                bar_step, bar_start = self.step, now
            self._preempt(epoch)
            waiting = time.perf_counter()
        secs = max(self._sync()[1] - epoch_start, 1e-9)
        peak_mb = (torch.cuda.max_memory_allocated(ddp.device) / 2**20 if ddp.device.type == "cuda" else
                   resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: kilobytes
        self.speed = {"images_per_s": (self.step - epoch_step) * args.batch_size / secs,
                      "data_wait": min(1.0, self.waited / secs), "peak_mem_mb": peak_mb}

    def log(self, losses, **last):
        """After a step: its losses into the epoch's sums (no host sync); `last`: logged as at the epoch's end."""
        for name, value in losses.items():
            self.totals[name] = self.totals.get(name, 0.0) + value.detach()
        self.recent.append(losses["loss"].detach())
        self.last.update(last)

    def _sync(self):
        """The loop's host sync (every --log-every steps, an epoch's end): all stop if any recent loss is not finite.
        Returns (the last loss, time.perf_counter()) once the GPU's queued work is done."""
        recent, self.recent = torch.stack(self.recent) if self.recent else torch.zeros(1, device=self.ddp.device), []
        if all_reduce_sum((~torch.isfinite(recent)).any().int()):  # any process's: all stop at this step
            raise UserError(f"the loss is not finite at or before step {self.step}; run the same command with a lower "
                            "--lr to resume from the last save")
        if self.ddp.device.type == "cuda":
            torch.cuda.synchronize(self.ddp.device)
        return recent[-1], time.perf_counter()

    def _preempt(self, epoch):
        """After each step: save on a signal or when --save-every is due, then stop on a signal, every process alike
        (under torchrun, a small all_reduce every --log-every steps, where the loop syncs anyway)."""
        args, ddp = self.args, self.ddp
        if ddp.distributed and self.step % args.log_every:
            return
        due = bool(args.save_every) and time.monotonic() - self.last_save >= 60.0 * args.save_every
        stop = self.signal is not None
        if ddp.distributed:  # rank 0's clock decides the timed saves; any rank's signal stops everyone
            flags = torch.tensor([stop, due and ddp.is_main], dtype=torch.int32, device=ddp.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, due = bool(flags[0]), bool(flags[1])
        if not (stop or due):
            return
        self.last_save = time.monotonic()
        self.save(epoch, self.totals)
        if stop:
            if ddp.distributed:
                dist.barrier()  # rank 0 has written the checkpoint before any rank exits
            if ddp.is_main:
                print(f"stopped by {self.signal or 'a signal to another process'} after step {self.step}: the "
                      f"checkpoint in {args.out} holds it; run the same command to resume from that step",
                      file=sys.stderr)
            sys.exit(EXIT_STOPPED)

    def end_epoch(self, epoch, metrics=None):
        """The mean losses over steps and processes, `metrics` (the method's evaluation), the kNN monitor every
        --eval-every epochs and after the last, a log.jsonl line and a printed one, checkpoint.pt and backbone.pt."""
        args, ddp = self.args, self.ddp
        names = sorted(self.totals)  # the same order on every process
        means = all_reduce_sum(torch.stack([self.totals[k] for k in names])) / (len(self.loader) * ddp.world_size)
        stats = {"epoch": epoch + 1, **dict(zip(names, means.tolist())), **self.last, **self.speed, **(metrics or {})}
        if self.knn is not None and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs):
            self.knn_last = self.knn(self.backbone, self.autocast)
            stats.update(self.knn_last or {})
        if ddp.is_main:
            self._write(stats)
            print(epoch_line(stats, args.epochs))
        self.save(epoch + 1, {})

    def save(self, epochs_done, totals):
        """checkpoint.pt and backbone.pt (atomic); inside an epoch with its running sums (its log line stays exact)."""
        totals = {k: all_reduce_sum(v.clone()) for k, v in totals.items()}  # collectives: every process
        rng = [mine := rng_state(self.ddp.device)]  # every process's, in rank order: each resumes its own streams
        if dist.is_available() and dist.is_initialized():
            rng = [None] * dist.get_world_size()
            dist.all_gather_object(rng, mine)
        if not self.ddp.is_main:
            return
        record = backbone_record(self.backbone, **self.record, args=self.args, epoch=epochs_done)
        meta = {k: v for k, v in record.items() if k != "state_dict"}  # the weights are in "model"
        atomic_save({"method": record["method"], "model": self.plain.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epochs_done,
                     "step": self.step, "totals": totals, "args": plain_args(self.args), "rng": rng,
                     "knn_init": self.knn_init, "backbone": dict(meta, state_dict_prefix=self.backbone_prefix)},
                    os.path.join(self.args.out, "checkpoint.pt"))
        atomic_save(record, os.path.join(self.args.out, "backbone.pt"))

    def finish(self, note=None):
        """The last line: the kNN top-1 after training against random init, or where the backbone is; then `note`."""
        args, init, last = self.args, self.knn_init, self.knn_last
        if not self.ddp.is_main:
            return
        if self.start_epoch >= args.epochs:
            print(f"{args.out} already holds a model trained for {args.epochs} epochs")
            return
        print(f"kNN top-1{self.knn.where}: {last['knn_top1']:.1f}% after training vs {init['knn_top1']:.1f}% at "
              f"random init (backbone: {args.out}/backbone.pt)" if init and last else
              f"done: backbone saved to {args.out}/backbone.pt")
        if note:
            print(note)


def epoch_line(stats, epochs):
    """Every script's epoch line: loss and terms, logged values, speed, evaluations in % (rates logged in [0, 1])."""
    terms = [f"{k[5:]} {v:.3f}" for k, v in stats.items() if k.startswith("loss_")]
    values = [(k, v) for k, v in stats.items() if v is not None and not k.startswith("loss") and
              k not in ("epoch", "images_per_s", "data_wait", "peak_mem_mb", "knn_top5")]
    name = lambda k: k.replace("knn", "kNN").replace("_top1", " top-1").replace("_top5", " top-5").replace("_", " ")
    percent = [f"{name(k)} " + (f"{v:.0%}" if k.endswith("_rate") else f"{v:.1f}%")
               for k, v in values if k.endswith(("top1", "top5", "_acc", "_rate"))]
    plain = [f"{k} {v:.4g}" for k, v in values if not k.endswith(("top1", "top5", "_acc", "_rate"))]
    loss = f"loss {stats['loss']:.3f}" + (f" ({', '.join(terms)})" if terms else "")
    return ", ".join([f"epoch {stats['epoch']}/{epochs}: {loss}", *plain, f"{stats['images_per_s']:.0f} images/s",
                      f"data wait {stats['data_wait']:.0%}", *percent])


# ---- The synthetic data's drawing (common.Synthetic: the demos' shapes and scenes, from (seed, split, index)) --------
def _ngon(n, radius, phase=0.0):
    return [(radius * math.cos(phase + 2 * math.pi * i / n), radius * math.sin(phase + 2 * math.pi * i / n))
            for i in range(n)]


# Each shape is a list of (polygon in unit coordinates, fill): 255 adds, 0 cuts a hole.
SHAPES = {
    "disc": [(_ngon(40, 1.0), 255)], "ring": [(_ngon(40, 1.0), 255), (_ngon(40, 0.55), 0)],
    "square": [(_ngon(4, 1.0, math.pi / 4), 255)],
    "frame": [(_ngon(4, 1.0, math.pi / 4), 255), (_ngon(4, 0.55, math.pi / 4), 0)],
    "triangle": [(_ngon(3, 1.1, -math.pi / 2), 255)],
    "star": [([((1.1 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + math.pi * i / 5),
                (1.1 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + math.pi * i / 5)) for i in range(10)], 255)],
    "cross": [([(-1, -.32), (1, -.32), (1, .32), (-1, .32)], 255), ([(-.32, -1), (.32, -1), (.32, 1), (-.32, 1)], 255)],
    "bar": [([(-1.1, -0.3), (1.1, -0.3), (1.1, 0.3), (-1.1, 0.3)], 255)],
    "half_disc": [([(math.cos(math.pi * i / 20), math.sin(math.pi * i / 20) - 0.45) for i in range(21)], 255)],
    "l_shape": [([(-.8, -1), (-.2, -1), (-.2, .4), (.8, .4), (.8, 1), (-.8, 1)], 255)],
}
SHAPE_NAMES = tuple(SHAPES)

# Colours and textures come from small shared sets, so no colour or pattern alone tells one image from all others
# (with unique colours, instance discrimination is solved by colour, as SimCLR found without colour jitter).
PALETTE = np.array([[230, 60, 50], [60, 170, 70], [50, 90, 220], [240, 200, 40], [150, 60, 190], [40, 190, 200],
                    [240, 130, 30], [235, 235, 235], [30, 30, 30], [130, 130, 130]], np.float32)

# Scenes: shapes per scene (high exclusive), radius (fraction of the side, log-uniform). Many small ones, as COCO
# has: with 3 to 6 of 0.09 to 0.17, 3 in 4 of UniVIP's view pairs held fewer than K = 4 shapes in their overlap.
SCENE_SHAPES, SCENE_RADIUS = (8, 15), (0.05, 0.15)


def _texture(rng, size):
    """A background of two palette colours: flat, stripes or a checkerboard, at 4 angles and 2 frequencies."""
    c1 = PALETTE[rng.integers(len(PALETTE))]
    c2 = 0.75 * c1 + 0.25 * PALETTE[rng.integers(len(PALETTE))]  # low contrast: the shape must stand out
    kind, freq, theta = rng.integers(3), (3, 6)[rng.integers(2)], math.pi / 4 * rng.integers(4)
    yy, xx = np.mgrid[0:size, 0:size] / size
    u, v = xx * math.cos(theta) + yy * math.sin(theta), yy * math.cos(theta) - xx * math.sin(theta)
    w = (np.zeros_like(u) if kind == 0 else 0.5 + 0.5 * np.sin(2 * math.pi * freq * u) if kind == 1 else
         (np.floor(u * freq) + np.floor(v * freq)) % 2).astype(np.float32)[..., None]
    return c1 * (1 - w) + c2 * w + rng.normal(0, 10, (size, size, 3)).astype(np.float32)


def _draw_shape(mask, rng, label, cx, cy, radius):
    draw = ImageDraw.Draw(mask)
    # Shapes stand upright up to +-30 degrees, as objects in photos do: the image has an orientation
    # (rotation prediction is well posed) while rotation still varies within a class.
    c, s = math.cos(theta := rng.uniform(-math.pi / 6, math.pi / 6)), math.sin(theta)
    for points, fill in SHAPES[SHAPE_NAMES[label]]:
        draw.polygon([(cx + radius * (c * x - s * y), cy + radius * (s * x + c * y)) for x, y in points], fill=fill)


def _paint(background, m, rng):
    """The shape (mask m in [0, 1]) on `background`, in a palette colour far from the background's mean (visible)."""
    mean = background.mean((0, 1))
    far = [c for c in PALETTE if np.abs(c - mean).sum() > 150]
    return background * (1 - m) + (far[rng.integers(len(far))] if far else 255 - mean) * m


class Synthetic(torch.utils.data.Dataset):
    """Ten shape classes, random palette colour, size, position and rotation (+-30 degrees from upright) on textured
    backgrounds: only the shape tells the class. Each image is a function of (seed, split, index). `scenes=True`: 8 to
    14 shapes, none touching, with exact boxes (x, y, w, h px) and classes as the label (`boxes_only`: boxes alone)."""

    classes = list(SHAPE_NAMES)

    def __init__(self, split="train", size=None, img_size=None, scenes=False, seed=0, boxes_only=False):
        self.split, self.scenes, self.seed, self.boxes_only = split, scenes, seed, boxes_only
        self.size, self.img_size = size or (10_000 if split == "train" else 2_000), img_size or (96 if scenes else 32)

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
        big = 2 * self.img_size  # draw at twice the size, then downsample: anti-aliased edges
        image = _texture(rng, big)
        if not self.scenes:
            label, radius, mask = index % len(SHAPE_NAMES), big * rng.uniform(0.25, 0.4), Image.new("L", (big, big), 0)
            cx, cy = rng.uniform(radius, big - radius, 2)
            _draw_shape(mask, rng, label, cx, cy, radius)
            return self._finish(_paint(image, np.asarray(mask, np.float32)[..., None] / 255, rng)), label
        boxes, labels, taken = [], [], np.zeros((big, big), bool)  # taken: the pixels of the shapes so far
        for _ in range(int(rng.integers(*SCENE_SHAPES))):
            for _attempt in range(20):  # a shape that touches none drawn before: its box holds it alone, exactly
                radius = big * math.exp(rng.uniform(*np.log(SCENE_RADIUS)))  # several sizes, small ones as often
                label, shape = int(rng.integers(len(SHAPE_NAMES))), Image.new("L", (big, big), 0)
                _draw_shape(shape, rng, label, *rng.uniform(radius, big - radius, 2), radius)
                x0, y0, x1, y1 = shape.getbbox()  # of the mask as the canvas clips it: the object's bounding box
                m = np.asarray(shape.crop((x0, y0, x1, y1))) > 0
                if not (m & taken[y0:y1, x0:x1]).any():
                    break
            else:
                continue
            taken[y0:y1, x0:x1] |= m
            image[y0:y1, x0:x1] = _paint(image[y0:y1, x0:x1], m[..., None].astype(np.float32), rng)
            boxes.append([x0, y0, x1 - x0, y1 - y0])
            labels.append(label)
        boxes = np.array(boxes, np.float32).reshape(-1, 4) / 2  # coordinates of the downsampled image
        return self._finish(image), boxes if self.boxes_only else {"boxes": boxes, "labels": np.array(labels)}

    def _finish(self, array):
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).resize((self.img_size,) * 2, Image.BILINEAR)
