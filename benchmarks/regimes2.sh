#!/usr/bin/env bash
# Map II of README "When does the report help? Part two": label noise in the training labels x
# training fraction at phantom difficulty 0.5, the report controls (shuffled reports, label lists) at
# the highest noise, and fresh seeds (3 to 9) for the one positive cell of each map (the first map's KD
# at 10%; map II's KD at r = 0.4 with 30%).
#   bash benchmarks/regimes2.sh OUT_DIR
# Then: .venv/bin/python benchmarks/regime_map.py OUT_DIR --png docs/regimes2.png
#       .venv/bin/python benchmarks/regime_map.py OUT_DIR/fresh [--seeds 3-9]
#       .venv/bin/python benchmarks/regime_map.py OUT_DIR/fresh2 [--seeds 3-9]
# Every sweep is resumable: run the script again and it goes on where it stopped. Two runs at a time
# (--jobs 2, one thread each). The remedy, KD's alpha and temperature are those chosen on validation in
# the first map (inference.annealing.beta_max=0.1; alpha 0.5, T = 2: the defaults).
set -euo pipefail
out=${1:?usage: benchmarks/regimes2.sh OUT_DIR}
vkd=(.venv/bin/vkd-pyro sweep --config configs/demo.yaml --no-progress --jobs 2 data.difficulty=0.5)
teacher=(inference.objective=text_only inference.annealing.schedule=constant inference.annealing.beta=0.001)
remedy=(inference.objective=vkd inference.annealing.beta_max=0.1)

# 1. fresh seeds for KD at 10% of the data: 3 to 9 (the first map used 0 to 2, trained again here for
#    the pooled interval; regime_map.py OUT/fresh --seeds 3-9 gives the fresh seeds alone)
fresh=(--seeds 10 seed=0 --grid data.train_fraction=0.1)
"${vkd[@]}" "${fresh[@]}" --out "$out/fresh/image_only" inference.objective=image_only
"${vkd[@]}" "${fresh[@]}" --out "$out/fresh/text_only" "${teacher[@]}"
"${vkd[@]}" "${fresh[@]}" --out "$out/fresh/kd" inference.objective=kd \
    "inference.kd.teacher=$out/fresh/text_only/runs/data.train_fraction={data.train_fraction}-seed{seed}"

# 2. map II: label noise r x training fraction, 3 seeds; each KD run distils its own cell's teacher.
# 3. the controls at r = 0.4: the teacher, VKD + remedy and KD with shuffled reports and with label lists.
# One training fraction at a time (the cheaper 0.3 first), so that a stopped script leaves whole columns.
cell='data.label_noise={data.label_noise},data.train_fraction={data.train_fraction}-seed{seed}'
for fraction in 0.3 1.0; do
    grid=(--seeds 3 --grid data.label_noise=0.0,0.2,0.4 --grid "data.train_fraction=$fraction")
    "${vkd[@]}" "${grid[@]}" --out "$out/image_only" inference.objective=image_only
    "${vkd[@]}" "${grid[@]}" --out "$out/text_only" "${teacher[@]}"
    "${vkd[@]}" "${grid[@]}" --out "$out/kd" inference.objective=kd "inference.kd.teacher=$out/text_only/runs/$cell"
    "${vkd[@]}" "${grid[@]}" --out "$out/vkd_remedy" "${remedy[@]}"
    "${vkd[@]}" "${grid[@]}" --out "$out/vkd" inference.objective=vkd
    controls=(--seeds 3 --grid data.label_noise=0.4 --grid "data.train_fraction=$fraction")
    for control in shuffled labels; do
        "${vkd[@]}" "${controls[@]}" --out "$out/text_only_$control" "${teacher[@]}" "data.report_control=$control"
        "${vkd[@]}" "${controls[@]}" --out "$out/kd_$control" inference.objective=kd "data.report_control=$control" \
            "inference.kd.teacher=$out/text_only_$control/runs/$cell"
        "${vkd[@]}" "${controls[@]}" --out "$out/vkd_remedy_$control" "${remedy[@]}" "data.report_control=$control"
    done
done

# 4. fresh seeds for map II's one positive cell (KD at r = 0.4 with 30% of the records), found after
#    the map had run: 3 to 9, beside 0 to 2 trained again (regime_map.py OUT/fresh2 --seeds 3-9 gives
#    the fresh seeds alone)
fresh2=(--seeds 10 seed=0 --grid data.label_noise=0.4 --grid data.train_fraction=0.3)
"${vkd[@]}" "${fresh2[@]}" --out "$out/fresh2/image_only" inference.objective=image_only
"${vkd[@]}" "${fresh2[@]}" --out "$out/fresh2/text_only" "${teacher[@]}"
"${vkd[@]}" "${fresh2[@]}" --out "$out/fresh2/kd" inference.objective=kd "inference.kd.teacher=$out/fresh2/text_only/runs/$cell"
