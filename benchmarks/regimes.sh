#!/usr/bin/env bash
# The regime map of README "When does the report help?": every objective on the demo config over
# training fractions x phantom difficulties x 3 seeds, then the table and docs/regimes.png.
#   bash benchmarks/regimes.sh OUT_DIR [REMEDY_OVERRIDES...]
# Sweeps are resumable: run it again and it goes on where it stopped. Two runs at a time (--jobs 2, one
# thread each); about an hour on 2 CPU cores.
set -euo pipefail
out=${1:?usage: benchmarks/regimes.sh OUT_DIR [remedy overrides, e.g. inference.free_bits=0.5]}
shift
remedy=("$@")
vkd=(.venv/bin/vkd-pyro sweep --config configs/demo.yaml --seeds 3 --no-progress --jobs 2)
grid=(--grid data.difficulty=0,0.5 --grid data.train_fraction=0.1,0.3,1.0)
"${vkd[@]}" --out "$out/image_only" "${grid[@]}" inference.objective=image_only
# the teacher's ceiling: the report branch as a variational information bottleneck with Alemi et al.'s
# small constant beta (the demo's Eq. 9 schedule, up to beta = 1 on a 512-d latent, collapses it)
teacher=(inference.objective=text_only inference.annealing.schedule=constant inference.annealing.beta=0.001)
"${vkd[@]}" --out "$out/text_only" --grid data.train_fraction=0.1,0.3,1.0 "${teacher[@]}"
"${vkd[@]}" --out "$out/vkd" "${grid[@]}" inference.objective=vkd
"${vkd[@]}" --out "$out/kd" "${grid[@]}" inference.objective=kd \
    "inference.kd.teacher=$out/text_only/runs/data.train_fraction={data.train_fraction}-seed{seed}"
if [ ${#remedy[@]} -gt 0 ]; then
    "${vkd[@]}" --out "$out/vkd_remedy" "${grid[@]}" inference.objective=vkd "${remedy[@]}"
fi
.venv/bin/python benchmarks/regime_map.py "$out" --png docs/regimes.png
