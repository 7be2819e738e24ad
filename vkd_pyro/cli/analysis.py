"""The analysis commands of `vkd-pyro`: sweep, ablate, diagnose, figures, compare (registered by vkd_pyro.cli).

Kept apart from the main parser (`vkd_pyro/cli/__init__.py`) so that each stays small.
"""

from __future__ import annotations

from pathlib import Path

from vkd_pyro.analysis.ablate import ablate
from vkd_pyro.analysis.compare import compare_targets, format_comparison
from vkd_pyro.analysis.diagnostics import diagnose, format_diagnostics
from vkd_pyro.analysis.figures import make_figures
from vkd_pyro.analysis.launch import make_launcher, parse_minutes
from vkd_pyro.analysis.sweep import parse_grid, run_sweep
from vkd_pyro.errors import UserError

TRUST_HELP = "import a prior or guide that the run's config.yaml names by an import path (package.module:Name)"


def _add_run_options(parser, seeds_help: str, out_help: str) -> None:
    """The options of the commands that train runs as a sweep (sweep, ablate)."""
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--seeds", type=int, default=1, help=seeds_help)
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides for every run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    launch = parser.add_argument_group("launching the runs")
    launch.add_argument("--launcher", default="local", choices=["local", "submitit"],
                        help="local: on this machine (default); submitit: one cluster job per run (SLURM), "
                        "needs pip install vkd-pyro[cluster]")
    launch.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="local: N runs side by side in worker processes, each with max(1, cores // N) "
                        "threads (default 1: one after another in this process)")
    launch.add_argument("--slurm-partition", default=None, help="submitit: the partition")
    launch.add_argument("--slurm-time", default=None, metavar="TIME",
                        help="submitit: time limit per run, MINUTES, HH:MM:SS or D-HH:MM[:SS] (default 240 minutes)")
    launch.add_argument("--slurm-gpus", type=int, default=None, metavar="G", help="submitit: GPUs per run (default 0)")
    launch.add_argument("--slurm-cpus", type=int, default=None, metavar="C",
                        help="submitit: CPUs per run, also its threads (default: the cluster's)")
    launch.add_argument("--submitit-cluster", default=None, choices=["slurm", "local"],
                        help="submitit: the executor (default: slurm where srun is found, else local)")


def add_analysis_commands(commands) -> None:
    """Add the sweep, ablate, diagnose and figures sub-parsers to `commands` (add_subparsers)."""
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


def _cmd_compare(args) -> None:
    if args.boot < 100:
        raise UserError(f"--boot: at least 100 replicates, got {args.boot}")
    result, notes = compare_targets(args.a, args.b, args.split, n_boot=args.boot, seed=args.seed)
    print(format_comparison(result, name_a=Path(args.a).name or "A", name_b=Path(args.b).name or "B"))
    for note in notes:
        print(note)


def _launcher(args):
    """The launcher the --launcher, --jobs and --slurm-* options describe (submitit's files in OUT/submitit)."""
    slurm = {"partition": args.slurm_partition, "gpus": args.slurm_gpus, "cpus": args.slurm_cpus,
             "cluster": args.submitit_cluster,
             "time_minutes": None if args.slurm_time is None else parse_minutes(args.slurm_time)}
    return make_launcher(args.launcher, args.jobs, Path(args.out) / "submitit", **slurm)


def _cmd_sweep(args) -> None:
    if not args.grid:
        raise UserError("sweep: give at least one --grid key=v1,v2,...")
    result = run_sweep(args.config, parse_grid(args.grid), args.seeds, Path(args.out), args.overrides,
                       progress=False if args.no_progress else None, overwrite=args.overwrite,
                       baseline=args.baseline, launcher=_launcher(args))
    if result.rows:
        print("\n" + (Path(args.out) / "sweep.md").read_text())
    if result.failed:
        raise UserError(f"{len(result.failed)} run(s) failed (see {args.out}/runs/*/error.txt); "
                        f"the same command trains them again")


def _cmd_ablate(args) -> None:

    values = [v for v in args.values.split(",") if v.strip()] if args.values else None
    text = ablate(args.config, args.table, args.seeds, Path(args.out), args.overrides, values,
                  progress=False if args.no_progress else None, launcher=_launcher(args))
    print("\n" + text)


def _cmd_diagnose(args) -> None:

    if args.samples < 1 or args.bins < 1:
        raise UserError("--samples and --bins: must be >= 1")
    result = diagnose(args.run, args.split, args.samples, args.bins, args.seed, trust_code=args.trust_code)
    print(format_diagnostics(result))
    suffix = "" if args.split == "test" else f"_{args.split}"
    print(f"wrote {Path(args.run) / f'diagnostics{suffix}.json'}")


def _cmd_figures(args) -> None:

    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples: must be >= 1, got {args.samples}")
    make_figures(args.run, args.compare, args.records, args.samples, trust_code=args.trust_code)


ANALYSIS_COMMANDS = {"sweep": _cmd_sweep, "ablate": _cmd_ablate, "diagnose": _cmd_diagnose, "figures": _cmd_figures,
                     "compare": _cmd_compare}

