"""The batched colour augmentation of common.py against torchvision's per-image functional ops."""
import itertools
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import common
from conftest import colour_aug

TOL = 1 / 255


def images(n, seed=0):
    """uint8 (n, 3, 20, 24): random pixels, plus grey pixels, saturated colours (0/255 per channel, so
    channel ties too) and a flat patch, the cases where HSV and contrast code tends to break."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 20, 24), generator=g, dtype=torch.uint8)
    x[:, :, :5] = x[:, :1, :5]  # grey rows
    x[:, :, 5:10] = torch.randint(0, 2, (n, 3, 5, 24), generator=g, dtype=torch.uint8) * 255
    x[:, :, 10:12, :6] = 128  # exactly at the solarize threshold
    return x


def per_image(op, x, values, **kwargs):
    return torch.stack([op(image, v, **kwargs) for image, v in zip(x, values)])


def jitter_blend(op):
    """The pipeline's one blend for ColorJitter's op 0 (brightness), 1 (contrast) or 2 (saturation)."""
    def apply(x, factors):
        f = factors.view(-1, 1, 1, 1)
        return common._jitter_blend(x, torch.full_like(f, float(op)), f, f, f)
    return apply


@pytest.mark.parametrize("ours, theirs, values", [
    (jitter_blend(0), TF.adjust_brightness, [0.6, 1.0, 1.4, 0.8, 0.0]),
    (jitter_blend(1), TF.adjust_contrast, [0.0, 0.6, 1.4, 1.0, 1.1]),
    (jitter_blend(2), TF.adjust_saturation, [0.0, 0.8, 1.2, 1.0, 0.5]),
    (common.adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.1, 0.5, 0.27, -0.33]),
    (common.solarize, TF.solarize, [0.5, 128 / 255, 0.0, 1.0]),
])
def test_ops_equal_torchvision_per_image(ours, theirs, values):
    x = images(len(values)).float() / 255
    expected = per_image(theirs, x, values)
    got = ours(x, torch.tensor(values))
    assert got.shape == x.shape and got.dtype == torch.float32
    assert (got - expected).abs().max() <= TOL, (got - expected).abs().amax((1, 2, 3))


@pytest.mark.parametrize("sigma", torch.linspace(0.1, 2.0, 20).tolist())
def test_blur_has_the_variance_sigma_squared_at_every_sigma(sigma):
    """The blur's std is sigma at every sigma (the variance PIL's box blurs aim at, before their uint8 rounding); the
    Gaussian sampled at integer taps (torchvision's kernel) only from about 0.5 px (below 0.01 at 0.2)."""
    kernel_size = colour_aug().kernel_size  # 13: the pipeline's kernel at sigma up to 2
    impulse = torch.zeros(1, 3, 31, 31)
    impulse[..., 15, 15] = 1.0
    y = common.gaussian_blur(impulse, torch.tensor([sigma]), kernel_size)[0, 0]
    pos = torch.arange(31.0) - 15
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5)
    for profile in (y.sum(0), y.sum(1)):  # both directions
        assert (profile * pos).sum().abs() < 1e-5  # centred
        assert (profile * pos ** 2).sum().sqrt().item() == pytest.approx(sigma, rel=0.05)
    sampled = torch.exp(-0.5 * (pos[9:22] / 0.2) ** 2)  # the old kernel at sigma 0.2: almost a delta
    assert ((sampled / sampled.sum()) * pos[9:22] ** 2).sum().sqrt() < 0.01


def test_blur_per_image_sigma_zero_is_identity_and_tiny_images_work():
    x = images(4).float() / 255
    sigmas = torch.tensor([0.3, 0.0, 1.0, 2.0])
    got = common.gaussian_blur(x, sigmas, 13)
    for i, s in enumerate(sigmas):  # a batch blurs each image with its own sigma
        assert torch.allclose(got[i:i + 1], common.gaussian_blur(x[i:i + 1], s.view(1), 13), atol=1e-6)
    assert torch.equal(got[1], x[1]) and torch.equal(common.gaussian_blur(x, torch.zeros(4), 13), x)
    tiny = common.gaussian_blur(x[:, :, :4, :5], torch.full((4,), 2.0), 13)  # smaller than the kernel's half
    assert tiny.shape == (4, 3, 4, 5) and torch.isfinite(tiny).all()


def test_blur_borders_follow_pil(cifar10_root):
    """At the borders PIL's GaussianBlur comes out as a mirror that repeats the edge pixel: the 8 px band along
    the edges is as close to PIL as the interior (reflecting without the edge pixel: up to 17 levels off)."""
    from PIL import Image, ImageFilter
    folder = cifar10_root / "train" / "bird"
    for path in sorted(folder.iterdir())[:6]:
        image = Image.open(path).convert("RGB").resize((96, 96), Image.BICUBIC)
        x = TF.pil_to_tensor(image)[None].float() / 255
        band = torch.ones(96, 96, dtype=torch.bool)
        band[8:-8, 8:-8] = False
        for sigma in (0.5, 1.0, 2.0):
            pil = TF.pil_to_tensor(image.filter(ImageFilter.GaussianBlur(radius=sigma))).float()
            diff = (common.gaussian_blur(x, torch.tensor([sigma]), 13)[0] * 255 - pil).abs()
            assert diff[:, band].max() <= 5 and diff[:, band].max() <= diff[:, ~band].max() + 1.5, (path, sigma)


def test_the_differences_from_pil_that_color_augmentation_states(cifar10_root):
    """The figures of ColorAugmentation's docstring, measured on 50 CIFAR-10 images (32 px, sharp edges) against
    torchvision's ops on PIL images (uint8 after each): the jitter's mean offset, hue's largest difference (|h| up to
    0.2), the blur's largest difference (sigma 0.1 to 2) and PIL's three box blurs leaving images unchanged at 0.1."""
    from PIL import Image, ImageFilter
    paths = sorted((cifar10_root / "train" / "bird").iterdir())[:50]
    aug, ops = colour_aug(jitter=(0.4, 0.4, 0.2, 0.2), jitter_p=1.0, gray_p=0.0), [
        TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    torch.manual_seed(0)
    offsets, hue, blur, unchanged = [], 0.0, 0.0, True
    for path in paths:
        image = Image.open(path).convert("RGB")
        x, params, pil = TF.pil_to_tensor(image).float() / 255, aug.sample(), image
        ours = unnormalize(aug, aug(TF.pil_to_tensor(image)[None], params[None]))[0]
        for op in params[4:8].long().tolist():
            pil = ops[op](pil, params[op].item())
        offsets.append((TF.pil_to_tensor(pil).float() - ours * 255).mean().item())
        for h in (-0.2, -0.1, 0.1, 0.2):
            theirs = TF.pil_to_tensor(TF.adjust_hue(image, h)).float()
            hue = max(hue, (common.adjust_hue(x[None], torch.tensor([h]))[0] * 255 - theirs).abs().max().item())
        for sigma in torch.linspace(0.1, 2.0, 20).tolist():
            theirs = TF.pil_to_tensor(image.filter(ImageFilter.GaussianBlur(radius=sigma))).float()
            blur = max(blur, (common.gaussian_blur(x[None], torch.tensor([sigma]), 13)[0] * 255 - theirs).abs().max())
            unchanged &= sigma > 0.15 or torch.equal(theirs, x * 255)
    offset = sum(offsets) / len(offsets)
    print(f"PIL's jitter minus ours: {offset:.2f} levels on average; hue: up to {hue:.1f} levels apart; "
          f"blur: up to {blur:.1f} levels apart; PIL's blur at sigma 0.1 leaves the images unchanged: {unchanged}")
    assert -2 < offset < -0.5 and 3 < hue < 10 and 4 < blur < 9 and unchanged


def test_grayscale_equals_torchvision():
    x = images(3).float() / 255
    expected = TF.rgb_to_grayscale(x, num_output_channels=3)
    assert (common.grayscale(x) - expected).abs().max() <= TOL


def reference(aug, image, params):
    """One image through torchvision's functional ops, as the old PIL pipeline composed them."""
    x = image.float() / 255
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    if not torch.equal(params[:4], torch.tensor([1.0, 1, 1, 0])):  # RandomApply skips ColorJitter altogether
        for op in params[4:8].long().tolist():
            x = ops[op](x, params[op].item())
    if params[8] > 0:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if params[9] > 0:  # the blur itself is tested against PIL above
        x = common.gaussian_blur(x[None], params[9:10], aug.kernel_size)[0]
    if params[10] > 0:
        x = TF.solarize(x, 128 / 255)
    return x


def unnormalize(aug, y):
    return y * aug.std + aug.mean


def test_call_equals_torchvision_composition():
    aug = colour_aug(jitter_p=0.8, gray_p=0.3, blur_p=0.5, solarize_p=0.4)
    torch.manual_seed(1)
    params = torch.stack([aug.sample() for _ in range(12)])
    x = images(12)
    got = unnormalize(aug, aug(x, params))
    expected = torch.stack([reference(aug, image, p) for image, p in zip(x, params)])
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert (got - expected).abs().max() <= TOL
    # the draw must have exercised every op, in several orders, and left some images alone
    assert (params[:, 8] > 0).any() and (params[:, 9] > 0).any() and (params[:, 10] > 0).any()
    assert len({tuple(p[4:8].tolist()) for p in params}) > 3


def test_every_jitter_order_is_applied_per_image():
    """One image, the same factors, all 24 orders in one batch: each as torchvision applies it."""
    aug = colour_aug()
    orders = torch.tensor(list(itertools.permutations(range(4))), dtype=torch.float32)
    p = torch.tensor([0.7, 1.3, 0.2, 0.3, 0, 0, 0, 0, 0, 0, 0]).repeat(24, 1)
    p[:, 4:8] = orders
    x = images(1).repeat(24, 1, 1, 1)
    got = unnormalize(aug, aug(x, p))
    for i in range(24):
        assert (got[i] - reference(aug, x[i], p[i])).abs().max() <= TOL, orders[i]
    assert (got[0] - got[-1]).abs().max() > 10 * TOL  # the order matters for these factors


def test_sample_distribution():
    aug = colour_aug(jitter=(0.4, 0.3, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=0.5,
                                   solarize_p=0.1, sigma=(0.1, 2.0), blur_scale=0.5)
    torch.manual_seed(0)
    n = 4000
    params = torch.stack([aug.sample() for _ in range(n)])
    assert params.shape == (n, common.ColorAugmentation.NUM_PARAMS) and params.dtype == torch.float32
    jittered = (params[:, :4] != torch.tensor([1.0, 1, 1, 0])).any(1)
    for flags, p in [(jittered, 0.8), (params[:, 8] > 0, 0.2), (params[:, 9] > 0, 0.5), (params[:, 10] > 0, 0.1)]:
        assert abs(flags.float().mean() - p) < 3.5 * math.sqrt(p * (1 - p) / n), (flags.float().mean(), p)
    assert set(params[:, 8].tolist()) == {0, 1} and set(params[:, 10].tolist()) == {0, 1}
    assert torch.equal(params[~jittered, :4], torch.tensor([[1.0, 1, 1, 0]]).expand(int((~jittered).sum()), 4))
    for i, (low, high) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]):
        v = params[jittered, i]
        assert v.min() >= low and v.max() <= high
        assert v.min() < low + 0.01 and v.max() > high - 0.01
        assert abs(v.mean() - (low + high) / 2) < 0.05 * (high - low)  # uniform, not skewed
    draws = params[jittered][:, [0, 1, 2, 3, 8, 9, 10]]  # factors, gray, sigma, solarize: independent draws
    assert (torch.corrcoef(draws.T) - torch.eye(7)).abs().max() < 0.1
    sigma = params[params[:, 9] > 0, 9]
    assert sigma.min() >= 0.05 - 1e-6 and sigma.max() <= 1.0 + 1e-6
    assert sigma.min() < 0.07 and sigma.max() > 0.98
    orders = params[:, 4:8].long()
    assert torch.equal(orders.sort(1).values, torch.arange(4).expand(n, 4))  # permutations of the 4 ops
    counts = torch.unique(orders, dim=0, return_counts=True)[1].float()
    assert len(counts) == 24
    chi2 = ((counts - n / 24) ** 2 / (n / 24)).sum()
    assert chi2 < 50  # 23 degrees of freedom: p ~ 0.001


def test_zero_strength_and_kernel_size():
    aug = colour_aug(jitter=(0.4, 0.0, 0.2, 0.0), jitter_p=1.0)
    torch.manual_seed(0)
    params = torch.stack([aug.sample() for _ in range(200)])
    assert (params[:, 1] == 1).all() and (params[:, 3] == 0).all()
    brightness = torch.stack([colour_aug(jitter=(1.5, 0, 0, 0), jitter_p=1.0).sample()[0]
                              for _ in range(200)])
    assert brightness.min() >= 0 and brightness.min() < 0.1 and brightness.max() > 2.4  # [max(0, 1 - v), 1 + v]
    assert colour_aug(blur_scale=1.0).kernel_size == 13  # 2 * ceil(3 * 2.0) + 1
    assert colour_aug(blur_scale=96 / 224).kernel_size == 7  # sigma max 0.857 -> ceil(2.57) = 3
    assert colour_aug(blur_scale=32 / 224).kernel_size == 3
    assert colour_aug(sigma=(0.1, 0.01), blur_scale=0.1).kernel_size == 3  # at least 3


def test_sample_is_deterministic_given_the_torch_seed():
    aug = colour_aug(blur_p=0.5, solarize_p=0.5)
    torch.manual_seed(7)
    a = torch.stack([aug.sample() for _ in range(5)])
    torch.manual_seed(7)
    b = torch.stack([aug.sample() for _ in range(5)])
    torch.manual_seed(8)
    c = torch.stack([aug.sample() for _ in range(5)])
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_no_op_images_come_back_only_normalized():
    aug = colour_aug(blur_p=1.0, solarize_p=1.0)
    params = torch.tensor([1.0, 1, 1, 0, 0, 1, 2, 3, 0, 0, 0]).repeat(4, 1)
    params[:, 4:8] = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i)) for i in range(4)])
    x = images(4)
    mean, std = torch.tensor(common.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(common.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.equal(aug(x, params), (x.float() / 255 - mean) / std)
    assert torch.equal(aug(x.float() / 255, params), (x.float() / 255 - mean) / std)  # float input, same


def test_solarize_threshold_is_that_of_random_solarize_128_on_uint8():
    aug = colour_aug(solarize_p=1.0)
    params = torch.tensor([1.0, 1, 1, 0, 0, 1, 2, 3, 0, 0, 1]).repeat(3, 1)
    x = images(3)
    x[:, :, 12, :4] = torch.tensor([126, 127, 128, 129], dtype=torch.uint8)
    expected = TF.solarize(x, 128).float() / 255
    assert (unnormalize(aug, aug(x, params)) - expected).abs().max() < 1e-6


def test_bf16_autocast_does_not_change_the_result():
    aug = colour_aug(blur_p=0.5, solarize_p=0.2)
    torch.manual_seed(3)
    params = torch.stack([aug.sample() for _ in range(6)])
    x = images(6)
    expected = aug(x, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = aug(x, params)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_every_method_draws_its_views_and_colour_parameters_from_seed_epoch_and_index_alone():
    """The workers' half of each method's augmentation, as the loader calls it: the same (seed, epoch, index)
    gives bit-equal uint8 views and colour parameters (so a resumed run sees the same augmentations), and
    another epoch other ones."""
    import opera, rotssl, trex, univip
    cases = [(common.Synthetic("train", size=8), opera.TwoViewAugmentation(32, 0.08)),
             (common.Synthetic("train", size=8), trex.MultiCropAugmentation(32, 16, n_local=2)),
             (common.Synthetic("train", size=8), lambda im, t: rotssl.Augmentation("swav", 32, 16, 2, True)(im)),
             (common.build_scene_dataset("synthetic"), univip.SceneInstanceAugmentation(48, 16, 2, 8.0, (0.08, 1.0)))]
    for data, aug in cases:
        ds = common.Augmented(data, aug, seed=3)
        a, b, other = _tensors(ds[(5, 2)]), _tensors(ds[(5, 2)]), _tensors(ds[(5, 3)])
        assert len(a) >= 4 and all(torch.equal(x, y) for x, y in zip(a, b))
        assert any(not torch.equal(x, y) for x, y in zip(a, other))
        assert any(x.dtype == torch.uint8 for x in a)


def _tensors(sample):
    if torch.is_tensor(sample):
        return [sample]
    if isinstance(sample, dict):
        return [t for v in sample.values() for t in _tensors(v)]
    if isinstance(sample, (list, tuple)):
        return [t for v in sample for t in _tensors(v)]
    return []


def blocks(size=64, block=4, seed=0):
    """A PIL image of blocks of random colours: sharp edges for the blur, every crop alike."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (3, size // block, size // block), generator=g, dtype=torch.uint8)
    return TF.to_pil_image(x.repeat_interleave(block, 1).repeat_interleave(block, 2))


def both_forms(colour, image, n):
    """n colour-augmented copies of `image` batched (the scripts' way) and n through colour.torchvision() (PIL, in
    the worker), unnormalised: two (n, 3, h, w) batches in [0, 1]."""
    keep = lambda image: image  # no crop: the colour operations alone
    batched = colour.on_device([tuple(torch.stack(t) for t in zip(*[colour.view(keep, image) for _ in range(n)]))],
                               torch.device("cpu"))[0]
    pipeline = colour.torchvision(keep)
    return unnormalize(colour, batched), unnormalize(colour, torch.stack([pipeline(image) for _ in range(n)]))


def test_the_torchvision_form_draws_what_the_batched_form_draws():
    """ColorAugmentation.torchvision(): the references' composition of torchvision transforms, with the ranges and
    probabilities of sample(); the blur's sigmas and the ops' probabilities act alike in both forms (400 images)."""
    from torchvision.transforms import v2
    crop = v2.RandomHorizontalFlip()
    aug = colour_aug(jitter=(0.4, 0.3, 1.5, 0.1), jitter_p=0.7, gray_p=0.2, blur_p=0.6, solarize_p=0.3, blur_scale=0.5)
    ops = aug.torchvision(crop).transforms
    assert [type(t).__name__ for t in ops] == ["RandomHorizontalFlip", "RandomApply", "RandomGrayscale", "RandomApply",
                                               "RandomSolarize", "ToImage", "ToDtype", "Normalize"] and ops[0] is crop
    jitter = ops[1].transforms[0]
    ranges = [jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue]
    assert torch.allclose(torch.tensor(ranges).T.float(), torch.stack([aug.low, aug.high]))  # saturation from 0
    assert (ops[1].p, ops[2].p, ops[3].p, ops[4].p, ops[4].threshold) == (0.7, 0.2, 0.6, 0.3, 128)
    assert ops[3].transforms[0].sigma == aug.sigma == (0.05, 1.0)
    assert (tuple(ops[-1].mean), tuple(ops[-1].std)) == (common.IMAGENET_MEAN, common.IMAGENET_STD)
    torch.manual_seed(0)
    sharpness = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))
    blur = colour_aug(jitter_p=0.0, gray_p=0.0, blur_p=1.0)  # sigma 0.1 to 2: PIL's blur against ours
    ours, theirs = (sharpness(x) for x in both_forms(blur, blocks(), 400))
    assert (ours.mean() - theirs.mean()).abs() < 4 * (ours.var() / 400 + theirs.var() / 400).sqrt()
    flags = colour_aug(jitter_p=0.0, gray_p=0.5, solarize_p=0.5)
    for x in both_forms(flags, blocks(), 400):  # grey: equal channels; solarized: nothing above mid-grey
        grey, solarized = (x.std(1).amax((1, 2)) < 1e-3).float(), (x.amax((1, 2, 3)) <= 0.5 + TOL).float()
        assert abs(grey.mean() - 0.5) < 0.1 and abs(solarized.mean() - 0.5) < 0.1


@pytest.mark.parametrize("method", ["opera", "trex", "swav", "byol", "univip"])
def test_each_methods_torchvision_pipelines_are_its_views(method):
    """Each method's torchvision() gives one pipeline per kind of view, in the order of its views: that view's crop
    and colour operations (the same objects the batched path uses), and an image of the same size."""
    import opera, rotssl, trex, univip
    image = blocks(128, 8)
    if method == "opera":
        aug = opera.TwoViewAugmentation(96, 0.3)
        views = [(aug.colour1, aug.geometric), (aug.colour2, aug.geometric)]
    elif method == "trex":
        aug = trex.MultiCropAugmentation(96, 48, n_local=2, scale_split=0.3)
        views = [(aug.global_colour, aug.global_crop), (aug.local_colour, aug.local_crop)]
    elif method in ("swav", "byol"):
        aug = rotssl.Augmentation(method, 96, 48, 2, rotate=True)
        views = [(c, aug.global_crop) for c in aug.global_colours] + (
            [(aug.local_colour, aug.local_crop)] if method == "swav" else [])
    else:
        aug = univip.SceneInstanceAugmentation(96, 48, 4, 8, (0.5, 1.0))
        views, image = [(c, aug.flip) for c in aug.colours], image.resize((96, 96))
    pipelines = aug.torchvision()
    assert len(pipelines) == len(views)
    for pipeline, (colour, crop) in zip(pipelines, views):
        assert pipeline.transforms[0] is crop and repr(pipeline) == repr(colour.torchvision(crop))
        batched = colour.on_device([tuple(t[None] for t in colour.view(crop, image))], torch.device("cpu"))[0]
        assert pipeline(image).shape == batched.shape[1:] and pipeline(image).dtype == batched.dtype
