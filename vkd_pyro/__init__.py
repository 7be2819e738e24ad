"""vkd-pyro: Variational Knowledge Distillation (van Sonsbeek et al., IPMI 2021) in Pyro.

The Python API: `vkd_pyro.train(config, out=None, **overrides)` trains as `vkd-pyro train` does and
`vkd_pyro.load_run(run_dir, device="cpu")` loads a run folder; both return a
:class:`~vkd_pyro.analysis.runs.Run` (`predict`, `evaluate`, `model`, `guide`, `objective`). They are
imported on first use, so that `import vkd_pyro.config` (pure Python) does not import torch.
"""

__version__ = "0.1.0"
__all__ = ["train", "load_run", "Run", "Prediction", "__version__"]


def __getattr__(name):
    if name in ("train", "load_run", "Run", "Prediction"):
        from vkd_pyro.analysis import runs  # deferred (PEP 562): torch only when the API is used

        return getattr(runs, name)
    raise AttributeError(f"module 'vkd_pyro' has no attribute {name!r}")
