"""The CIFAR scenes of the results table (tests/results_cifar.sh) and of tests/test_univip.py: training images
pasted, none over another, into 128 px scenes with their exact boxes, for univip.py (--data OUT --boxes OUT.json).

  python tests/cifar_scenes.py SOURCE OUT COUNT     # SOURCE: class folders of images, e.g. data/cifar5_seen/train

Each scene tries to place 12 images at sides of 20 to 32 px (32: the image as it is; smaller: resized bilinear, with
antialiasing) at random spots on a plain background of a random colour; an image that finds no free spot in 50 tries
is left out (about 11 placed). The images are taken in turn from a shuffled list of all of SOURCE, reshuffled
when used up, so that more scenes show every image in more places and company (rather than more epochs over fewer
scenes). Why many small objects: with 9 images of 32 px in a 3 x 3 grid, 78 % of UniVIP's scene-view pairs held fewer
than K = 4 whole images in their overlap and fell back to random boxes; with these scenes, 7 to 9 %
(tests/test_univip.py checks at most 20 %). Writes OUT/NNNNN.png (lossless: a box's pixels are the pasted image),
OUT.json (file -> [[x, y, w, h], ...], the boxes) and OUT_sources.json (file -> the source image of each box), both
JSON files last and atomically: a finished build has them.
"""
import json
import os
import random
import sys

from PIL import Image

CANVAS, PER_SCENE, SIDES, TRIES = 128, 12, (20, 24, 28, 32), 50


def build(source, out, count, seed=0):
    """Write `count` scenes from the images under the class folders of `source` into `out` (see the module)."""
    rng = random.Random(seed)
    paths = sorted(os.path.join(c, f) for c in os.listdir(source) if os.path.isdir(os.path.join(source, c))
                   for f in os.listdir(os.path.join(source, c)))
    if not paths:
        raise SystemExit(f"no images in the class folders of {source}")
    os.makedirs(out, exist_ok=True)
    order, boxes, sources = [], {}, {}
    for i in range(count):
        canvas = Image.new("RGB", (CANVAS, CANVAS), tuple(rng.randrange(256) for _ in range(3)))
        name, placed, used = f"{i:05d}.png", [], []
        for _ in range(PER_SCENE):
            if not order:  # every image once, in a new order, before any is used again
                order = rng.sample(paths, len(paths))
            path, side = order.pop(), rng.choice(SIDES)
            for _attempt in range(TRIES):
                x, y = rng.randrange(CANVAS - side + 1), rng.randrange(CANVAS - side + 1)
                if all(x + side <= a or a + s <= x or y + side <= b or b + s <= y for a, b, s, _ in placed):
                    break
            else:
                continue
            with Image.open(os.path.join(source, path)) as image:
                canvas.paste(image.convert("RGB").resize((side, side), Image.BILINEAR), (x, y))
            placed.append([x, y, side, side])
            used.append(path)
        canvas.save(os.path.join(out, name))
        boxes[name], sources[name] = placed, used
    for suffix, table in (("_sources.json", sources), (".json", boxes)):  # the box file last: it marks a finished build
        with open(out + suffix + ".tmp", "w") as f:
            json.dump(table, f)
        os.replace(out + suffix + ".tmp", out + suffix)


if __name__ == "__main__":
    if len(sys.argv) != 4 or not sys.argv[3].isdigit():
        raise SystemExit(__doc__.split("\n\n")[1].strip())
    build(sys.argv[1], sys.argv[2].rstrip("/"), int(sys.argv[3]))
