"""What the analysis commands of `vkd-pyro` do: sweep, ablate, diagnose, compare, figures, gradients (their options:
vkd_pyro.cli.parser)."""

from __future__ import annotations

from pathlib import Path

from vkd_pyro.analysis.ablate import ablate
from vkd_pyro.analysis.compare import compare_targets, format_comparison
from vkd_pyro.analysis.diagnostics import diagnose, format_diagnostics
from vkd_pyro.analysis.figures import make_figures
from vkd_pyro.analysis.gradients import Options, run_gradients
from vkd_pyro.analysis.grid import parse_grid
from vkd_pyro.analysis.launch import make_launcher, parse_minutes
from vkd_pyro.analysis.sweep import run_sweep
from vkd_pyro.errors import UserError


def cmd_compare(args) -> None:
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


def cmd_sweep(args) -> None:
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


def cmd_ablate(args) -> None:
    values = [v for v in args.values.split(",") if v.strip()] if args.values else None
    text = ablate(args.config, args.table, args.seeds, Path(args.out), args.overrides, values,
                  progress=False if args.no_progress else None, launcher=_launcher(args))
    print("\n" + text)


def sample_counts(text: str) -> tuple[int, ...]:
    """--samples-curve: comma-separated numbers S >= 1 (empty: none); a one-line UserError otherwise."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise UserError(f"--samples-curve: comma-separated numbers of draws >= 1 such as 1,4,16,64,256 "
                        f"('' skips it), got {text!r}")
    return tuple(int(part) for part in parts)


def cmd_diagnose(args) -> None:
    if args.samples < 1 or args.bins < 1:
        raise UserError("--samples and --bins: must be >= 1")
    result = diagnose(args.run, args.split, args.samples, args.bins, args.seed, trust_code=args.trust_code,
                      samples_curve=sample_counts(args.samples_curve))
    print(format_diagnostics(result))
    suffix = "" if args.split == "test" else f"_{args.split}"
    print(f"wrote {Path(args.run) / f'diagnostics{suffix}.json'}")


def cmd_figures(args) -> None:
    if args.samples is not None and args.samples < 1:
        raise UserError(f"--samples: must be >= 1, got {args.samples}")
    make_figures(args.run, args.compare, args.records, args.samples, trust_code=args.trust_code)


def cmd_gradients(args) -> None:
    options = Options(Path(args.out), config=args.config, run=args.run, overrides=args.overrides, grid=args.grid,
                      at=args.at, checkpoint=args.checkpoint, repeats=args.repeats, batches=args.batches,
                      beta=args.beta, seed=args.seed, reference_repeats=args.reference_repeats,
                      reference_samples=args.reference_samples, device=args.device, trust_code=args.trust_code)
    text, paths = run_gradients(options)
    print("\n" + text)
    print(f"wrote {paths[0]}, {', '.join(p.name for p in paths[1:])}")
