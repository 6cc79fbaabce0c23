#!/usr/bin/env bash
# The README's demo table: each no-argument demo's kNN gain over random init, seeds 0 to 2 (not collected by pytest).
#
# For every seed: eval_linear.py on a random-init resnet_tiny (--ckpt random), then each demo with that seed and
# eval_linear.py on its backbone.pt. kNN top-1 % (k = 20) on the synthetic validation split, with the whole
# synthetic training split as the memory bank (the demos' own monitors use the --subset in use, so t-ReX and
# OPERA print lower numbers there). BYOL's demo trains solo-learn's CIFAR variant (CIFAR-10 mean and std, stem
# padding 2), not the network of --ckpt random: its gain is over its own random init, its monitor's first line
# (log.jsonl; the same kNN on the whole training split, as rotssl.py trains on all of it).
#
#   bash tests/demo_table.sh                         # 3 seeds x 5 demos (each 1.5 to 2.5 min, each evaluation 25 s)
#   SEEDS=0 DEMOS="trex" FLAGS="--epochs 1 --subset 256" EVAL="--subset 500 --epochs 5" OUT=runs/demos_check \
#       bash tests/demo_table.sh                     # a check that it runs (a few minutes)
#
# Environment: SEEDS (default "0 1 2"), DEMOS (default "trex opera swav_rot byol_rot univip"), FLAGS (added to
# every demo run), EVAL (flags added to every eval_linear.py run), OUT (runs/demos). Finished runs are not run again: delete OUT/NAME_sSEED to redo one.
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS=${SEEDS:-0 1 2}
ALL="trex opera swav_rot byol_rot univip"
DEMOS=${DEMOS:-$ALL}
FLAGS=${FLAGS:-}
EVAL=${EVAL:-}
OUT=${OUT:-runs/demos}
declare -A RUN=([trex]="trex.py" [opera]="opera.py" [swav_rot]="rotssl.py" [byol_rot]="rotssl.py --base byol"
                [univip]="univip.py")
for name in $DEMOS; do
  [ -n "${RUN[$name]+set}" ] || { echo "unknown demo '$name'; the demos are: $ALL" >&2; exit 2; }
done
echo "demo table: kNN top-1 after each demo vs random init; demos: $DEMOS; seeds: $SEEDS${FLAGS:+; demo flags: $FLAGS}${EVAL:+; evaluation flags: $EVAL}"
echo "output in $OUT (on 2 Intel Xeon cores each demo took 1.5 to 2.5 minutes and each evaluation about 25 s)"
mkdir -p "$OUT"

knn() {  # the kNN top-1 of an eval file
  python -c "import json, sys; print(f\"{json.load(open(sys.argv[1]))['knn']['top1']:.1f}\")" "$1"
}
for seed in $SEEDS; do
  if [ ! -f "$OUT/random_s$seed/eval_synthetic.json" ]; then
    python eval_linear.py --ckpt random --arch resnet_tiny --seed "$seed" --out "$OUT/random_s$seed" $EVAL \
      > "$OUT/random_s$seed.txt" 2>&1 || { echo "random init failed: see $OUT/random_s$seed.txt" >&2; exit 1; }
  fi
  echo "seed $seed random init: kNN top-1 $(knn "$OUT/random_s$seed/eval_synthetic.json")"
  for name in $DEMOS; do
    run=$OUT/${name}_s$seed
    if [ ! -f "$run/eval_synthetic.json" ]; then
      rm -rf "$run"
      start=$SECONDS
      # shellcheck disable=SC2086  # the flags are word lists
      python ${RUN[$name]} --seed "$seed" --out "$run" $FLAGS > "$run.txt" 2>&1 \
        || { echo "$name failed: see $run.txt" >&2; exit 1; }
      echo "  ($((SECONDS - start)) s)" >> "$run.txt"
      python eval_linear.py --ckpt "$run/backbone.pt" --seed "$seed" $EVAL > "${run}_eval.txt" 2>&1 \
        || { echo "$name evaluation failed: see ${run}_eval.txt" >&2; exit 1; }
    fi
    echo "seed $seed python ${RUN[$name]}: kNN top-1 $(knn "$run/eval_synthetic.json")"
  done
done

echo
for name in $DEMOS; do printf '%s\t%s\n' "$name" "${RUN[$name]}"; done > "$OUT/demos.tsv"
OUT="$OUT" SEEDS="$SEEDS" python - <<'EOF'
import json, os
out, seeds = os.environ["OUT"], os.environ["SEEDS"].split()
knn = lambda run: round(json.load(open(f"{out}/{run}/eval_synthetic.json"))["knn"]["top1"], 1)  # gains as printed
with open(f"{out}/demos.tsv") as f:
    demos = [line.rstrip("\n").split("\t") for line in f]
random = {s: knn(f"random_s{s}") for s in seeds}
print("| demo | " + " | ".join(f"seed {s}" for s in seeds) + " |")
print("|---|" + "---|" * len(seeds))
print("| random init (`eval_linear.py --ckpt random --arch resnet_tiny --seed S`) | "
      + " | ".join(f"{random[s]:.1f}" for s in seeds) + " |")
def init(name, seed):  # BYOL's own random init (its monitor's first line), the others': --ckpt random's
    if name != "byol_rot":
        return random[seed]
    with open(f"{out}/{name}_s{seed}/log.jsonl") as f:
        return next(r["knn_top1"] for r in map(json.loads, f) if r.get("epoch") == 0)
for name, command in demos:
    cells = [f"{knn(f'{name}_s{s}'):.1f} ({knn(f'{name}_s{s}') - init(name, s):+.1f}"
             + (f" over its init {init(name, s):.1f})" if name == "byol_rot" else ")") for s in seeds]
    print(f"| `python {command}` | " + " | ".join(cells) + " |")
EOF
