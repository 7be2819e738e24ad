"""The `vkd-pyro` command line's parser: every sub-command, its options and its help, and nothing heavy.

Building and parsing it imports argparse only, so that `vkd-pyro --help`, `vkd-pyro train --help` and
a mistyped option answer at once; the module that runs a command (and imports torch, Pyro,
transformers) is imported by `vkd_pyro.cli.main` after parsing, from the command's `handler`
("module:function", :data:`HANDLERS`).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

DESCRIPTION = (
    "Variational Knowledge Distillation (van Sonsbeek et al., IPMI 2021) in Pyro: learn from chest "
    "X-rays paired with reports, diagnose from the X-ray alone."
)
TRUST_HELP = ("import a prior, guide or objective that the run's config.yaml names by an import path "
              "(package.module:Name)")

# sub-command -> "module:function" that runs it with the parsed arguments
HANDLERS = {
    "train": "vkd_pyro.cli.commands:cmd_train",
    "evaluate": "vkd_pyro.cli.commands:cmd_evaluate",
    "predict": "vkd_pyro.cli.commands:cmd_predict",
    "render": "vkd_pyro.cli.commands:cmd_render",
    "sweep": "vkd_pyro.cli.analysis_commands:cmd_sweep",
    "ablate": "vkd_pyro.cli.analysis_commands:cmd_ablate",
    "diagnose": "vkd_pyro.cli.analysis_commands:cmd_diagnose",
    "compare": "vkd_pyro.cli.analysis_commands:cmd_compare",
    "figures": "vkd_pyro.cli.analysis_commands:cmd_figures",
    "gradients": "vkd_pyro.cli.analysis_commands:cmd_gradients",
    "data": "vkd_pyro.cli.commands:cmd_data_check",
}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; each sub-command's `handler` default names the function that runs it."""
    parser = argparse.ArgumentParser(prog="vkd-pyro", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model and evaluate it on the test split",
                                description="Train with SVI (minus Eq. 8), keep the best validation "
                                "checkpoint, then evaluate on the test split from images alone.")
    train.add_argument("--config", default=None, help="YAML config file (e.g. configs/demo.yaml); not with --resume")
    train.add_argument("--resume", default=None, metavar="DIR",
                       help="continue the interrupted run in DIR from its last.pt (overrides: only run-time keys "
                       "such as train.max_epochs, device, data.num_workers)")
    train.add_argument("--out", default=None,
                       help="run folder (default runs/<config name>-<objective>-seed<seed>-<hash of the resolved "
                       "config>); refused when it holds another run, unless --resume or --overwrite")
    train.add_argument("--overwrite", action="store_true",
                       help="the run folder holds another run: move its files into DIR/.replaced-<time>/ and train "
                       "afresh (nothing is deleted)")
    train.add_argument("--trust-code", action="store_true",
                       help="import a prior, guide or objective that a run's config.yaml names by an import path "
                       "(the run resumed, or the kd teacher run)")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value",
                       help="dotted overrides of config values, e.g. inference.objective=no_mi train.max_epochs=5")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("evaluate", help="recompute metrics.json of a run from its checkpoint",
                                   description="Evaluate a trained run from images alone (Algorithm 2).")
    evaluate.add_argument("--run", required=True, help="run folder written by train")
    evaluate.add_argument("--split", default="test", choices=["train", "validation", "test"])
    evaluate.add_argument("--samples", type=int, default=None, help="S, prior samples (default: the run's)")
    evaluate.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                          help="where to evaluate (default auto: a GPU when one is visible); any run loads on any device")
    evaluate.add_argument("--trust-code", action="store_true", help=TRUST_HELP)

    predict = commands.add_parser("predict", help="class probabilities for image files, from the image alone",
                                  description="Per-class probability (mean over S prior samples) and its "
                                  "Monte Carlo spread for each image.")
    predict.add_argument("--run", required=True, help="run folder written by train")
    predict.add_argument("images", nargs="+", metavar="IMAGE",
                         help="image files (PNG, JPEG, TIFF, DICOM), folders of them, or glob patterns")
    predict.add_argument("--samples", type=int, default=None, help="S, prior samples (default: the run's)")
    predict.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the run's eval batch)")
    predict.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                         help="where to predict (default auto: a GPU when one is visible)")
    predict.add_argument("--csv", default=None, metavar="FILE",
                         help="write one row per image: its path, each class's probability and std")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.add_argument("--trust-code", action="store_true", help=TRUST_HELP)

    render = commands.add_parser("render", help="write a contact sheet of a dataset's images with their labels")
    render.add_argument("--config", required=True, help="YAML config file")
    render.add_argument("--out", required=True, help="PNG file to write")
    render.add_argument("--count", type=int, default=24, help="how many records (default 24)")
    render.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides")
    add_analysis_commands(commands)  # sweep, ablate, diagnose, compare, figures, gradients
    add_data_commands(commands)  # data check
    for name, choice in commands.choices.items():
        choice.set_defaults(handler=HANDLERS[name])
    return parser


def _add_run_options(parser, seeds_help: str, out_help: str) -> None:
    """The options of the commands that train runs as a sweep (sweep, ablate)."""
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--seeds", type=int, default=1, help=seeds_help)
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides for every run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    launch = parser.add_argument_group(
        "launching the runs", "An option the chosen launcher would ignore is refused. SIGINT or SIGTERM (with workers "
        "or submitit jobs also SIGHUP) stops the runs, each writing its resume state; the same command again goes on.")
    launch.add_argument("--launcher", default="local", choices=["local", "submitit"],
                        help="local: on this machine (default); submitit: one cluster job per run (SLURM), "
                        "needs pip install vkd-pyro[cluster]")
    launch.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="local: N runs side by side in worker processes, each with max(1, cores // N) "
                        "threads (default 1: one after another in this process)")
    launch.add_argument("--slurm-partition", default=None, help="submitit on SLURM: the partition")
    launch.add_argument("--slurm-time", default=None, metavar="TIME",
                        help="submitit: time limit per run, MINUTES, HH:MM:SS or D-HH:MM[:SS] (default 240 minutes)")
    launch.add_argument("--slurm-gpus", type=int, default=None, metavar="G", help="submitit: GPUs per run (default 0)")
    launch.add_argument("--slurm-cpus", type=int, default=None, metavar="C",
                        help="submitit: CPUs per run, also its threads (default: the cluster's)")
    launch.add_argument("--submitit-cluster", default=None, choices=["slurm", "local"],
                        help="submitit: the executor (default: slurm where srun is found; without SLURM, local must "
                        "be asked for: it runs every run at once on this machine)")


def add_analysis_commands(commands) -> None:
    """Add the sweep, ablate, diagnose, compare, figures and gradients sub-parsers to `commands` (add_subparsers)."""
    sweep = commands.add_parser(
        "sweep", help="train a grid of configurations over seeds and tabulate them",
        description="Train every combination of the --grid values for each seed into DIR/runs/<key=value,...>-seed<k>/ "
        "(skipping runs that finished before: those with metrics.json), then write DIR/sweep.csv, "
        "DIR/sweep.md (mean ± std over seeds) and DIR/sweep.png.")
    _add_run_options(sweep, "seeds per grid point: seed, seed+1, ... (default 1)", "sweep folder")
    sweep.add_argument("--baseline", default=None, metavar="key=value[,key=value]",
                       help="a grid point: sweep.md gives each row's macro-AUC difference to it with a 95%% interval "
                       "(paired bootstrap over test records, pooled over seeds)")
    sweep.add_argument("--grid", action="append", default=[], metavar="key=v1,v2,...",
                       help="a config key and its values (repeat for more keys), e.g. inference.num_particles=1,4,16")
    sweep.add_argument("--overwrite", action="store_true",
                       help="a run folder holds a run with other settings: move its files into "
                       "<folder>/.replaced-<time>/ and train it again (without: refused)")

    ablate = commands.add_parser(
        "ablate", help="the paper's ablations (Table 2 or 3) as a sweep, in the paper's layout",
        description="Table 2: inference.objective = vkd, no_mi, image_only; Table 3: model.z_dim = 64, 128, "
        "512, 1024. Runs them as a sweep (resumable) and writes DIR/table2.md or DIR/table3.md with the paper's "
        "figures beside ours.")
    _add_run_options(ablate, "seeds per configuration (default 1)", "ablation folder")
    ablate.add_argument("--table", type=int, required=True, choices=[2, 3], help="2 (architecture) or 3 (size of z)")
    ablate.add_argument("--values", default=None, metavar="V1,V2,...",
                        help="Table 3 only: sizes of z instead of the paper's 64,128,512,1024")

    diagnose = commands.add_parser(
        "diagnose", help="ELBO terms, posterior collapse, log p(y|x) and calibration of a run",
        description="Write <run>/diagnostics.json: the test ELBO terms at beta = 1, active units and the KL per "
        "latent dimension, an importance-sampling estimate of log p(y|x_I) (Eq. 2; prior and guide proposals) "
        "and the expected calibration error of the predictive.")
    diagnose.add_argument("--run", required=True, help="run folder written by train")
    diagnose.add_argument("--split", default="test", choices=["train", "validation", "test"])
    diagnose.add_argument("--samples", type=int, default=64, help="K, importance samples for log p(y|x) (default 64)")
    diagnose.add_argument("--bins", type=int, default=10, help="equal-width bins of the ECE (default 10)")
    diagnose.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo estimates (default 0)")
    diagnose.add_argument("--samples-curve", default="1,4,16,64,256", metavar="S1,S2,...",
                          help="numbers S of prior draws at which to measure the Monte Carlo error of the predictive "
                          "(s.e. of each probability, macro AUC over 8 redraws, seconds; default 1,4,16,64,256; '' skips it)")
    diagnose.add_argument("--trust-code", action="store_true", help=TRUST_HELP)

    compare = commands.add_parser(
        "compare", help="macro-AUC difference of two runs (or sweeps, paired by seed) with a bootstrap interval",
        description="B - A on the same test records: the macro-AUC difference with its 95%% interval from a "
        "paired bootstrap over records (pooled over the seeds both sides have), per class too. A and B are run "
        "folders, sweep folders (their runs/, one configuration) or glob patterns of run folders.")
    compare.add_argument("a", metavar="RUN_OR_SWEEP_A", help="the baseline")
    compare.add_argument("b", metavar="RUN_OR_SWEEP_B", help="the method compared with it")
    compare.add_argument("--split", default="test", choices=["train", "validation", "test"])
    compare.add_argument("--boot", type=int, default=2000, help="bootstrap replicates (default 2000)")
    compare.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")

    figures = commands.add_parser(
        "figures", help="the paper's figures for a run (t-SNE of z_I, Grad-CAM + report attention, ROC, curves)",
        description="Write PNGs into <run>/figures/: tsne.png (Fig. 2, beside --compare), record_*.png (Fig. 3), "
        "roc.png, reliability.png, training_curves.png, latent_units.png.")
    figures.add_argument("--run", required=True, help="run folder written by train (e.g. a VKD run)")
    figures.add_argument("--compare", default=None, help="a second run folder for the t-SNE (e.g. image_only)")
    figures.add_argument("--records", type=int, default=2, help="records for Fig. 3 (default 2)")
    figures.add_argument("--samples", type=int, default=None, help="S, prior samples (default: the run's)")
    figures.add_argument("--trust-code", action="store_true", help=TRUST_HELP)

    gradients = commands.add_parser(
        "gradients", help="gradient variance, SNR and cost per parameter group across sample counts and estimators",
        description="For each --grid setting, R gradient estimates of the training loss at the same weights (a "
        "run's and/or a config's initialisation) over the same K training batches, in eval mode (dropout off, batch "
        "norm on its running statistics): per parameter group the SNR, directional SNR, total variance, cosine to a "
        "reference gradient, ms per estimate, peak memory and efficiency 1 / (variance x seconds). Writes "
        "DIR/gradients.csv, DIR/gradients.md and DIR/gradients.png.")
    gradients.add_argument("--run", default=None, metavar="DIR", help="a trained run folder (its weights and config)")
    gradients.add_argument("--checkpoint", default="best", choices=["best", "last"],
                           help="the run's weights: best (checkpoint.pt, default) or last (last.pt)")
    gradients.add_argument("--config", default=None, metavar="FILE",
                           help="YAML config the settings start from (default: the run's config.yaml)")
    gradients.add_argument("--at", default=None, metavar="init,trained",
                           help="the weights: init (the config's initialisation at its seed), trained (the run's), "
                           "or both (default: trained with --run, else init)")
    gradients.add_argument("--grid", action="append", default=[], metavar="key=v1,v2,...",
                           help="a config key and its values (repeat for more keys), e.g. "
                           "inference.num_particles=1,4,16")
    gradients.add_argument("--repeats", type=int, default=32, metavar="R", help="estimates per setting (default 32)")
    gradients.add_argument("--batches", type=int, default=4, metavar="K",
                           help="training batches each estimate averages over (default 4)")
    gradients.add_argument("--beta", type=float, default=1.0, help="the fixed KL weight (default 1.0)")
    gradients.add_argument("--seed", type=int, default=0, help="repeat r draws with seed + r (default 0)")
    gradients.add_argument("--reference-repeats", type=int, default=16, metavar="N",
                           help="estimates averaged into the reference gradient (default 16)")
    gradients.add_argument("--reference-samples", type=int, default=64, metavar="N",
                           help="the reference's least L and M (default 64; the grid's largest when more)")
    gradients.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                           help="where to compute (default auto: a GPU when one is visible)")
    gradients.add_argument("--out", required=True, metavar="DIR", help="folder for the three files")
    gradients.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    gradients.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides for every setting")


def add_data_commands(commands) -> None:
    """Add `data check` (vkd_pyro.data.card) to the sub-parsers (`commands`, from add_subparsers)."""
    data = commands.add_parser("data", help="dataset tools: `data check` validates a dataset and prints its card",
                               description="Dataset tools.")
    tools = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    check_parser = tools.add_parser(
        "check", help="validate a config's dataset and print its dataset card, without training",
        description="Build the dataset of a config (decoding and caching every image), then print records per "
                    "split, positives per class per split, views, reports and the records skipped and why.")
    check_parser.add_argument("--config", required=True, help="YAML config file (e.g. configs/mimic_cxr.yaml)")
    check_parser.add_argument("--json", default=None, metavar="FILE", help="also write the card as JSON to FILE")
    check_parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides")


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse the command line; `key=value` overrides may also stand after the flags."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return args
