"""What a sweep adds to each finished run: the test-split diagnostics of its image model, kept in the run
folder as sweep_run.json (`vkd_pyro.analysis.diagnostics.summarize`, with the active units of
q(z_T|x_T) where the objective has a guide) and the wall time of the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from vkd_pyro.analysis.diagnostics import collapse_report, latent_statistics, summarize
from vkd_pyro.analysis.runs import load_run
from vkd_pyro.data.prepare import prepare_data
from vkd_pyro.files import write_json

RUN_SUMMARY = "sweep_run.json"
IS_SAMPLES = 64  # K for the log p(y|x_I) column (prior proposal)

_PREPARED: dict = {}  # the last PreparedData evaluate_run used, under "data", and its "key"


def evaluate_run(folder: Path, wall_seconds: Optional[float] = None) -> dict:
    """Load a finished run, evaluate the sweep's extra metrics on its test split, write sweep_run.json."""
    run = load_run(str(folder), trust_code=True)  # plan() checked its config is the one the sweep was given
    objective = run.objective
    key = json.dumps([run.config.to_dict()[k] for k in ("data", "text_encoder", "cache_dir")]
                     + [objective.reads_reports], sort_keys=True, default=str)
    if _PREPARED.get("key") != key:  # the runs of a sweep mostly share their data: prepare it once
        _PREPARED.clear()
        _PREPARED.update(key=key, data=prepare_data(run.config, with_reports=objective.reads_reports))
    data = _PREPARED["data"]
    metrics = json.loads((folder / "metrics.json").read_text())
    if wall_seconds is None:  # a run finished by an earlier, interrupted sweep: its training time
        wall_seconds = metrics.get("train_seconds")
    summary = {"wall_seconds": wall_seconds}
    # the diagnostics of the image model on the test split, where the objective's loss can be evaluated there
    if objective.test_elbo and objective.predicts_from == "images":
        result = summarize(run.module, data.splits["test"], run.config, run.device, is_samples=IS_SAMPLES,
                           with_guide=objective.has_guide)
        summary.update({"elbo": result["elbo"], "log_lik": result["log_p_y_given_x"]["prior_proposal"],
                        "is_samples": IS_SAMPLES, "ece": result["calibration"]["ece"],
                        "ece_bins": result["calibration"]["bins"]})
        if objective.has_guide:  # posterior collapse: the active units of q(z_T | x_T) on the test reports
            collapse = collapse_report(latent_statistics(run.module, data.splits["test"],
                                                         run.config.train.eval_batch_size, run.device, with_guide=True))
            summary.update(active_units=collapse["guide_active_units"], active_threshold=collapse["threshold"],
                           z_dim=collapse["z_dim"])
    write_json(folder / RUN_SUMMARY, summary)
    return summary
