"""Evaluation and analysis of trained runs: metrics, the Python API to a run, diagnostics, figures, sweeps."""
