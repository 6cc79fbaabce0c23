#!/usr/bin/env bash
# The README's results table: each paper's claim at small scale on CIFAR-10 (not collected by pytest).
#
# Every method and its paper's baseline pretrain resnet_tiny on five CIFAR-10 classes (seen: airplane,
# automobile, bird, cat, deer) for one budget (2 epochs over a fixed 10,000 of the 25,000 seen-class
# training images, batch 64; UniVIP and its BYOL baseline: those images pasted 9 per scene into 1,111
# scenes of 128 px), then eval_linear.py (kNN and fast linear probe) evaluates the frozen backbone on
# the seen classes and on the other five (unseen). Each cell is the mean over the seeds, ± half their range.
#
#   bash tests/results_cifar.sh                  # the whole table, seeds 0 and 1: about 64 minutes on 2 CPU cores
#   SEEDS=0 ROWS="random supervised" SUBSET=640 EVAL="--subset 1000 --epochs 5" OUT=runs/results_check \
#       bash tests/results_cifar.sh              # a check that it runs (a few minutes)
#   ROWS="random byol_scenes univip" EPOCHS=20 EXTRA="--num-instances 2" OUT=runs/univip_vs_byol \
#       bash tests/results_cifar.sh              # UniVIP vs BYOL on scenes with a 10x budget
#
# Environment: SEEDS (default "0 1"), ROWS (default all, in table order), EPOCHS (2), SUBSET (10000),
# EXTRA (flags added to every pretraining run), EVAL (flags added to every eval_linear.py run),
# OUT (runs/results). Without data/cifar10, tests/cifar10_jpeg.py makes it from torchvision's download (CIFAR_TAR,
# for the project's own tests offline: a tarball of that folder to extract instead).
# Finished rows are not run again: delete OUT/seedS/NAME to redo one.
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS=${SEEDS:-0 1}
EPOCHS=${EPOCHS:-2}
SUBSET=${SUBSET:-10000}
EXTRA=${EXTRA:-}
EVAL=${EVAL:-}
OUT=${OUT:-runs/results}
CIFAR_TAR=${CIFAR_TAR:-}
ALL="random supervised trex trex_star mocov3 opera opera_10 swav swav_rot byol byol_rot byol_scenes univip"
ROWS=${ROWS:-$ALL}

D="--data data/cifar5_seen --subset $SUBSET"
S="--data data/cifar5_scenes --boxes data/cifar5_scenes.json"
declare -A LABEL RUN
LABEL[random]="random init";                                         RUN[random]=""
LABEL[supervised]="supervised baseline (one crop, linear classifier)"; RUN[supervised]="trex.py $D --n-local 0 --projector-layers 0 --memory-size 0"
LABEL[trex]="t-ReX";                                                 RUN[trex]="trex.py $D --recipe trex"
LABEL[trex_star]="t-ReX*";                                           RUN[trex_star]="trex.py $D --recipe trex_star"
LABEL[mocov3]="MoCo v3 (\`opera.py --sup-weight 0\`)";               RUN[mocov3]="opera.py $D --sup-weight 0"
LABEL[opera]="OPERA";                                                RUN[opera]="opera.py $D"
LABEL[opera_10]="OPERA, 10 % of the labels";                         RUN[opera_10]="opera.py $D --labeled-fraction 0.1"
LABEL[swav]="SwAV";                                                  RUN[swav]="rotssl.py $D --rot-weight 0"
LABEL[swav_rot]="SwAV + rotation";                                   RUN[swav_rot]="rotssl.py $D"
LABEL[byol]="BYOL";                                                  RUN[byol]="rotssl.py $D --base byol --rot-weight 0"
LABEL[byol_rot]="BYOL + rotation";                                   RUN[byol_rot]="rotssl.py $D --base byol"
LABEL[byol_scenes]="BYOL on scenes (\`univip.py --losses ss\`)";     RUN[byol_scenes]="univip.py $S --losses ss"
LABEL[univip]="UniVIP on scenes";                                    RUN[univip]="univip.py $S"
for name in $ROWS; do
  [ -n "${LABEL[$name]+set}" ] || { echo "unknown row '$name'; the rows are: $ALL" >&2; exit 2; }
done

echo "CIFAR-10 results: rows: $ROWS"
echo "seeds: $SEEDS; resnet_tiny, $EPOCHS epochs, batch 64, --subset $SUBSET (scenes: all 1,111)${EXTRA:+, extra flags: $EXTRA}; output in $OUT"
echo "(the whole table with seeds 0 and 1 took 64 minutes on 2 Intel Xeon cores)"

# ---------------------------------------------------------------- data: CIFAR-10, its two halves, the scenes
mkdir -p data "$OUT"
if [ ! -d data/cifar10/train ]; then  # CIFAR-10 as JPEGs in data/cifar10/{train,test}/<class>/
  python tests/cifar10_jpeg.py --out data/cifar10 --data-dir data ${CIFAR_TAR:+--tarball "$CIFAR_TAR"}
fi
# seen = the five pretraining classes, unseen = the other five (t-ReX's transfer setting, as ImageNet-CoG)
for split in train test; do
  mkdir -p data/cifar5_seen/$split data/cifar5_unseen/$split
  for c in airplane automobile bird cat deer; do ln -sfn "$PWD/data/cifar10/$split/$c" data/cifar5_seen/$split/$c; done
  for c in dog frog horse ship truck; do ln -sfn "$PWD/data/cifar10/$split/$c" data/cifar5_unseen/$split/$c; done
done
if [[ " $ROWS " == *" byol_scenes "* || " $ROWS " == *" univip "* ]] && [ ! -f data/cifar5_scenes.json ]; then
  echo "making 1,111 scenes of 9 seen-class training images (3 x 3 grid on a 128 px canvas) with their boxes"
  python - <<'EOF'
import json, os, random
from PIL import Image
rng, root = random.Random(0), "data/cifar5_seen/train"
paths = sorted(os.path.join(c, f) for c in os.listdir(root) for f in os.listdir(os.path.join(root, c)))
rng.shuffle(paths)
os.makedirs("data/cifar5_scenes", exist_ok=True)
boxes, cells = {}, [(x, y) for x in (4, 48, 92) for y in (4, 48, 92)]
for i in range(1111):
    canvas = Image.new("RGB", (128, 128), tuple(rng.randrange(256) for _ in range(3)))
    for path, (x, y) in zip(paths[9 * i: 9 * i + 9], cells):
        canvas.paste(Image.open(os.path.join(root, path)).convert("RGB"), (x, y))
    canvas.save(f"data/cifar5_scenes/{i:04d}.png")
    boxes[f"{i:04d}.png"] = [[x, y, 32, 32] for x, y in cells]
with open("data/cifar5_scenes.json.tmp", "w") as f:
    json.dump(boxes, f)
os.replace("data/cifar5_scenes.json.tmp", "data/cifar5_scenes.json")
EOF
fi

# ---------------------------------------------------------------- pretrain, then evaluate on both halves
knn() {  # the kNN top-1 of an eval file
  python -c "import json, sys; print(round(json.load(open(sys.argv[1]))['knn']['top1'], 1))" "$1"
}
for seed in $SEEDS; do
  R=$OUT/seed$seed
  mkdir -p "$R"
  for name in $ROWS; do
    if [ -f "$R/$name/eval_cifar5_unseen.json" ]; then echo "seed $seed $name: done before"; continue; fi
    if [ "$name" = random ]; then
      for half in seen unseen; do
        python eval_linear.py --ckpt random --arch resnet_tiny --data data/cifar5_$half --seed "$seed" \
          --out "$R/random" $EVAL > "$R/random_$half.txt" 2>&1 || { echo "random ($half) failed: see $R/random_$half.txt" >&2; exit 1; }
      done
    else
      rm -rf "${R:?}/$name"
      start=$SECONDS
      # shellcheck disable=SC2086  # the flags are word lists
      python ${RUN[$name]} --arch resnet_tiny --epochs "$EPOCHS" --batch-size 64 --eval-every 0 --seed "$seed" \
        $EXTRA --out "$R/$name" > "$R/$name.txt" 2>&1 || { echo "$name failed: see $R/$name.txt" >&2; exit 1; }
      echo $((SECONDS - start)) > "$R/$name.seconds"
      for half in seen unseen; do
        python eval_linear.py --ckpt "$R/$name/backbone.pt" --data data/cifar5_$half --seed "$seed" $EVAL \
          > "$R/${name}_$half.txt" 2>&1 || { echo "$name ($half) evaluation failed: see $R/${name}_$half.txt" >&2; exit 1; }
      done
    fi
    echo "seed $seed $name: kNN top-1 seen $(knn "$R/$name/eval_cifar5_seen.json"), unseen $(knn "$R/$name/eval_cifar5_unseen.json")"
  done
done

# ---------------------------------------------------------------- the table: mean over the seeds ± half their range
echo
for name in $ROWS; do printf '%s\t%s\n' "$name" "${LABEL[$name]}"; done > "$OUT/rows.tsv"
OUT="$OUT" SEEDS="$SEEDS" python - <<'EOF'
import json, os
out, seeds = os.environ["OUT"], os.environ["SEEDS"].split()
with open(f"{out}/rows.tsv") as f:
    rows = [line.rstrip("\n").split("\t") for line in f]
def mean_spread(values):
    return f"{sum(values) / len(values):.1f} ±{(max(values) - min(values)) / 2:.1f}"
print(f"| row ({len(seeds)} seed{'s' * (len(seeds) > 1)}) | seen kNN | seen linear | unseen kNN | unseen linear "
      "| images/s | wall time |")
print("|---|---|---|---|---|---|---|")
for name, label in rows:
    runs = [f"{out}/seed{s}/{name}" for s in seeds]
    cells = []
    for half in ("seen", "unseen"):
        evals = [json.load(open(f"{r}/eval_cifar5_{half}.json")) for r in runs]
        cells += [mean_spread([e[m]["top1"] for e in evals]) for m in ("knn", "linear")]
    speeds, times = [], []
    for r in runs:
        if os.path.exists(f"{r}/log.jsonl"):
            with open(f"{r}/log.jsonl") as f:
                last = [json.loads(line) for line in f][-1]
            if last.get("images_per_s") is not None:
                speeds.append(last["images_per_s"])
            with open(f"{r}.seconds") as f:
                times.append(int(f.read()))
    speed = f"{sum(speeds) / len(speeds):.0f}" if speeds else "-"
    wall = f"{sum(times) // len(times) // 60} min {sum(times) // len(times) % 60} s" if times else "-"
    print(f"| {label} | {' | '.join(cells)} | {speed} | {wall} |")
EOF
