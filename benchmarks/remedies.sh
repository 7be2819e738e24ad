#!/usr/bin/env bash
# The remedies for the posterior collapse of README "When does the report help?", compared on one cell
# of the regime map over 3 seeds: image only, VKD as in the paper, and VKD with each remedy of issue 9
# (inference.annealing.beta_max, inference.free_bits, inference.guide_warmup_epochs,
# inference.kl_gradient), then the table of benchmarks/regime_map.py (validation and test AUC, the
# difference to image only, the teacher, KL, text NLL and active units of q(z_T|x_T)).
#   bash benchmarks/remedies.sh OUT_DIR [DIFFICULTY [TRAIN_FRACTION]]     (default: 0 1.0, the demo)
# Two chains of sweeps side by side, one thread each (so they do not fight over the 2 cores); every
# sweep is resumable: run the script again and it goes on where it stopped.
set -euo pipefail
out=${1:?usage: benchmarks/remedies.sh OUT_DIR [DIFFICULTY [TRAIN_FRACTION]]}
cell=(--grid "data.difficulty=${2:-0}" --grid "data.train_fraction=${3:-1.0}")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
sweep() {  # sweep NAME OVERRIDES...
    local name=$1
    shift
    .venv/bin/vkd-pyro sweep --config configs/demo.yaml --seeds 3 --no-progress --out "$out/$name" "${cell[@]}" "$@" \
        > "$out/$name.log" 2>&1
}
mkdir -p "$out"
(
    sweep image_only inference.objective=image_only
    sweep vkd inference.objective=vkd
    sweep vkd_beta_max inference.objective=vkd inference.annealing.beta_max=0.1
) &
first=$!
(
    sweep vkd_free_bits inference.objective=vkd inference.free_bits=0.25
    sweep vkd_warmup inference.objective=vkd inference.guide_warmup_epochs=3
    sweep vkd_kl_prior inference.objective=vkd inference.kl_gradient=prior
) &
wait "$first" && wait $!  # a failed sweep (its log in OUT_DIR/NAME.log) fails the script
.venv/bin/python benchmarks/regime_map.py "$out"
