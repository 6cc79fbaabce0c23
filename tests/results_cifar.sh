#!/usr/bin/env bash
# The README's results table: each paper's claim at small scale on CIFAR-10 (not collected by pytest).
#
# Every method and its paper's baseline pretrain resnet_tiny on five CIFAR-10 classes (seen: airplane,
# automobile, bird, cat, deer) for one budget (2 epochs over a fixed 10,000 of the 25,000 seen-class
# training images, batch 64), then eval_linear.py (kNN and fast linear probe) evaluates the frozen
# backbone on the seen classes and on the other five (unseen). UniVIP, its BYOL baseline and its ablations
# pretrain on SCENES scenes of 128 px made by tests/cifar_scenes.py from all 25,000 seen-class training
# images (about 11 per scene, 20 to 32 px, none over another; each image in about 11 scenes at 25,600):
# 2 epochs over 25,600 scenes is 800 steps, in which UniVIP's sampler falls back to random boxes on about
# 7 to 9 % of the pairs (the `fallback` column; BYOL samples no boxes). Each cell is the mean over the seeds,
# ± half their range; the ablation rows run at the seeds of ABLATION_SEEDS only.
#
#   bash tests/results_cifar.sh                  # the whole table, seeds 0 and 1
#   SEEDS=0 ROWS="random supervised" SUBSET=640 EVAL="--subset 1000 --epochs 5" OUT=runs/results_check \
#       bash tests/results_cifar.sh              # a check that it runs (a few minutes)
#   SEEDS="0 1 2" ROWS="byol_scenes univip univip_si univip_ii" BATCH=32 SCENES=12800 \
#       OUT=runs/univip_decision bash tests/results_cifar.sh   # UniVIP's decision: 800 steps of batch 32,
#       3 seeds, the ablations at seed 0 (the README's UniVIP rows; at batch 64, twice the time)
#
# Environment: SEEDS (default "0 1"), ROWS (default all, in table order), EPOCHS (2), SUBSET (10000),
# SCENES (25600), BATCH (64), ABLATION_SEEDS (0), EXTRA (flags added to every pretraining run), EVAL (flags added to
# every eval_linear.py run), OUT (runs/results). Without data/cifar10, tests/cifar10_jpeg.py makes it from
# torchvision's download (CIFAR_TAR, for the project's own tests offline: a tarball of that folder to extract
# instead). Finished rows are not run again: delete OUT/seedS/NAME to redo one.
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS=${SEEDS:-0 1}
EPOCHS=${EPOCHS:-2}
BATCH=${BATCH:-64}
SUBSET=${SUBSET:-10000}
SCENES=${SCENES:-25600}
ABLATION_SEEDS=${ABLATION_SEEDS:-0}
EXTRA=${EXTRA:-}
EVAL=${EVAL:-}
OUT=${OUT:-runs/results}
CIFAR_TAR=${CIFAR_TAR:-}
ALL="random supervised trex trex_star mocov3 opera opera_10 swav swav_rot byol byol_rot byol_scenes univip univip_si univip_ii"
ABLATIONS="univip_si univip_ii"
ROWS=${ROWS:-$ALL}

D="--data data/cifar5_seen --subset $SUBSET"
SC=data/cifar5_scenes_$SCENES  # named by their count: a build of another size is never reused
S="--data $SC --boxes $SC.json"
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
LABEL[univip_si]="UniVIP without L_ii (\`--losses ss,si\`)";         RUN[univip_si]="univip.py $S --losses ss,si"
LABEL[univip_ii]="UniVIP without L_si (\`--losses ss,ii\`)";         RUN[univip_ii]="univip.py $S --losses ss,ii"
for name in $ROWS; do
  [ -n "${LABEL[$name]+set}" ] || { echo "unknown row '$name'; the rows are: $ALL" >&2; exit 2; }
done

echo "CIFAR-10 results: rows: $ROWS"
echo "seeds: $SEEDS (ablations: $ABLATION_SEEDS); resnet_tiny, $EPOCHS epochs, batch $BATCH, --subset $SUBSET (scenes: all $SCENES)${EXTRA:+, extra flags: $EXTRA}; output in $OUT"

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
if [[ " $ROWS " == *" byol_scenes "* || " $ROWS " == *" univip"* ]] && [ ! -f $SC.json ]; then
  echo "making $SCENES scenes of seen-class training images with their boxes (tests/cifar_scenes.py)"
  python tests/cifar_scenes.py data/cifar5_seen/train $SC "$SCENES"
fi

# ---------------------------------------------------------------- pretrain, then evaluate on both halves
knn() {  # the kNN top-1 of an eval file
  python -c "import json, sys; print(round(json.load(open(sys.argv[1]))['knn']['top1'], 1))" "$1"
}
row_seeds() {  # the seeds of a row: SEEDS, for an ablation row only those also in ABLATION_SEEDS
  for s in $SEEDS; do [[ " $ABLATIONS " == *" $1 "* && " $ABLATION_SEEDS " != *" $s "* ]] || printf '%s ' "$s"; done
}
for seed in $SEEDS; do
  R=$OUT/seed$seed
  mkdir -p "$R"
  for name in $ROWS; do
    [[ " $(row_seeds "$name") " == *" $seed "* ]] || continue
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
      python ${RUN[$name]} --arch resnet_tiny --epochs "$EPOCHS" --batch-size "$BATCH" --eval-every 0 --seed "$seed" \
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
for name in $ROWS; do printf '%s\t%s\t%s\n' "$name" "${LABEL[$name]}" "$(row_seeds "$name")"; done > "$OUT/rows.tsv"
OUT="$OUT" SEEDS="$SEEDS" python - <<'EOF'
import json, os
out, seeds = os.environ["OUT"], os.environ["SEEDS"].split()
with open(f"{out}/rows.tsv") as f:
    rows = [line.rstrip("\n").split("\t") for line in f]
def mean_spread(values):
    return f"{sum(values) / len(values):.1f} ±{(max(values) - min(values)) / 2:.1f}"
print(f"| row ({len(seeds)} seed{'s' * (len(seeds) > 1)}) | seen kNN | seen linear | unseen kNN | unseen linear "
      "| fallback | images/s | wall time |")
print("|---|---|---|---|---|---|---|---|")
for name, label, row_seeds in rows:
    if not row_seeds.split():  # an ablation row none of whose ABLATION_SEEDS is in SEEDS
        continue
    if row_seeds.split() != seeds:  # an ablation row: fewer seeds
        label += f", seed{'s' * (len(row_seeds.split()) > 1)} {', '.join(row_seeds.split())}"
    runs = [f"{out}/seed{s}/{name}" for s in row_seeds.split()]
    cells = []
    for half in ("seen", "unseen"):
        evals = [json.load(open(f"{r}/eval_cifar5_{half}.json")) for r in runs]
        cells += [mean_spread([e[m]["top1"] for e in evals]) for m in ("knn", "linear")]
    speeds, times, fallbacks = [], [], []
    for r in runs:
        if os.path.exists(f"{r}/log.jsonl"):
            with open(f"{r}/log.jsonl") as f:
                epochs = [json.loads(line) for line in f][1:]
            if epochs[-1].get("images_per_s") is not None:
                speeds.append(epochs[-1]["images_per_s"])
            if "fallback_rate" in epochs[-1]:  # UniVIP's: pairs whose views lacked K whole boxes, over the run
                fallbacks.append(sum(e["fallback_rate"] for e in epochs) / len(epochs))
            with open(f"{r}.seconds") as f:
                times.append(int(f.read()))
    speed = f"{sum(speeds) / len(speeds):.0f}" if speeds else "-"
    wall = f"{sum(times) // len(times) // 60} min {sum(times) // len(times) % 60} s" if times else "-"
    fallback = f"{100 * sum(fallbacks) / len(fallbacks):.0f} %" if fallbacks else "-"
    print(f"| {label} | {' | '.join(cells)} | {fallback} | {speed} | {wall} |")
EOF
