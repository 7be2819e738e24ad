"""What the `vkd-pyro` commands train, evaluate, predict, render and data check do. Their options are in
vkd_pyro.cli.parser; a user mistake raises UserError, which vkd_pyro.cli.main turns into one line and
status 2 (the exit statuses are listed there)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import pandas

from vkd_pyro.analysis.runs import expand_image_paths, load_run
from vkd_pyro.classes import CLASSES
from vkd_pyro.config import load_config
from vkd_pyro.data.card import check, format_card
from vkd_pyro.data.phantom import contact_sheet
from vkd_pyro.data.prepare import prepare_data
from vkd_pyro.data.registry import build_dataset
from vkd_pyro.errors import ConfigError, UserError
from vkd_pyro.files import atomic_path, check_target, write_json
from vkd_pyro.objectives import objective_for
from vkd_pyro.training.build import check_config
from vkd_pyro.training.evaluate import local_predictors, report
from vkd_pyro.training.loop import fit
from vkd_pyro.training.memory import check_memory
from vkd_pyro.training.resume import resume_config
from vkd_pyro.training.run_folder import default_run_folder, folder_lock, read_record


def _positive(value: Optional[int], name: str) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name}: must be >= 1, got {value}")


def cmd_train(args) -> None:
    progress = False if args.no_progress else None
    if args.resume is not None:
        if args.config is not None or args.out is not None:
            raise UserError("--resume DIR: the run's own config.yaml and folder are used (leave out --config and --out)")
        if args.overwrite:
            raise UserError("--resume and --overwrite: give one (continue the run, or replace it)")
        fit(resume_config(args.resume, args.overrides, args.trust_code), Path(args.resume), progress=progress,
            resume=True, trust_code=args.trust_code)
        return
    if args.config is None:
        raise UserError("train: give --config FILE (a new run) or --resume DIR (an interrupted one)")
    config = load_config(args.config, args.overrides)
    try:
        check_config(config)
    except ConfigError as exc:  # families and objectives are resolved after loading: name the file here
        raise ConfigError(f"{args.config}: {exc}") from None
    out = Path(args.out) if args.out else default_run_folder(args.config, config)
    fit(config, out, progress=progress, overwrite=args.overwrite, trust_code=args.trust_code)


def cmd_evaluate(args) -> None:
    _positive(args.samples, "--samples")
    run = load_run(args.run, device=args.device, trust_code=args.trust_code)
    objective = run.objective
    data = prepare_data(run.config, with_reports=objective.evaluation_reads_reports, device=run.device)
    samples = args.samples or run.config.inference.test_samples
    if args.split not in data.splits or len(data.splits[args.split]) == 0:
        raise UserError(f"--split {args.split}: the run's dataset has no {args.split} records")
    batch = min(run.config.train.eval_batch_size, len(data.splits[args.split]))
    check_memory(run.config, batch, samples, run.device, "train.eval_batch_size",
                 "--samples" if args.samples else "inference.test_samples")
    record = read_record(Path(args.run))
    with folder_lock(args.run, create=False):  # no training writes the folder meanwhile
        report(objective, data, Path(args.run), args.split, samples,
               *local_predictors(run.module, run.config, samples, run.device), run.device,
               {"best_epoch": run.checkpoint.get("epoch"), "val_macro_auc": run.checkpoint.get("val_macro_auc"),
                "run_id": record["run_id"] if record else None})


def cmd_predict(args) -> None:
    _positive(args.samples, "--samples")
    _positive(args.batch_size, "--batch-size")
    if args.csv:
        check_target(args.csv)  # before the predictions, not after them
    run = load_run(args.run, device=args.device, trust_code=args.trust_code)
    samples = args.samples or run.config.inference.test_samples
    batch = min(args.batch_size or run.config.train.eval_batch_size, len(expand_image_paths(args.images)))
    check_memory(run.config, batch, samples, run.device, "--batch-size" if args.batch_size else "train.eval_batch_size",
                 "--samples" if args.samples else "inference.test_samples")
    prediction = run.predict(args.images, args.samples, args.batch_size, progress=sys.stderr.isatty())
    rows = prediction.rows()
    if args.csv:
        with atomic_path(args.csv) as tmp:
            pandas.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6f")
        print(f"wrote {args.csv}: {len(rows)} images, {len(prediction.classes)} classes "
              f"(probability and std over S={prediction.samples} prior samples)")
    if args.json:
        print(json.dumps([{"image": r["image"], "probability": {c: r[c] for c in prediction.classes},
                           "std": {c: r[f"{c} std"] for c in prediction.classes}} for r in rows], indent=2))
    if args.csv or args.json:
        return
    for i, path in enumerate(prediction.images):
        print(f"{path}  (S={prediction.samples} prior samples; probability ± Monte Carlo std)")
        for c, name in enumerate(prediction.classes):
            print(f"  {name:28s} {prediction.probability[i, c]:.3f} ± {prediction.std[i, c]:.3f}")


def cmd_render(args) -> None:
    _positive(args.count, "--count")
    config = load_config(args.config, args.overrides)
    if config.data.max_reports is None:  # render only what the sheet shows
        config.data.max_reports = max(args.count, 10)
    dataset = build_dataset(config)
    count = min(args.count, len(dataset))
    titles = []
    for i in range(count):
        names = [CLASSES[c] for c in dataset.labels[i].nonzero()[0]]
        titles.append(f"{dataset.groups[i]}: " + (", ".join(names) or "(no label)"))
    contact_sheet([dataset.images[i] for i in range(count)], titles, args.out)
    print(f"wrote {args.out}: {count} {config.data.name} images at {config.data.image_size} px, signal {config.data.signal}")


def cmd_data_check(args) -> None:
    """`vkd-pyro data check`: build the config's dataset, print its card (and write it as JSON)."""
    config = load_config(args.config, args.overrides)
    card = check(config, objective_for(config).reads_reports)
    print(format_card(card), flush=True)
    if args.json:
        write_json(args.json, card)
        print(f"wrote {args.json}")
