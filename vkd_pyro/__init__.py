"""vkd-pyro: Variational Knowledge Distillation (van Sonsbeek et al., IPMI 2021) in Pyro.

The Python API: `vkd_pyro.load_run(run_dir, device="cpu")` returns a :class:`~vkd_pyro.analysis.runs.Run`
(`predict`, `evaluate`, `model`, `guide`). It is imported on first use, so that `import vkd_pyro.config`
(pure Python) does not import torch.
"""

__version__ = "0.1.0"
__all__ = ["load_run", "Run", "Prediction", "__version__"]


def __getattr__(name):
    if name in ("load_run", "Run", "Prediction"):
        from vkd_pyro.analysis import runs  # deferred (PEP 562): torch only when the API is used

        return getattr(runs, name)
    raise AttributeError(f"module 'vkd_pyro' has no attribute {name!r}")
