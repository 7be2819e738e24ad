"""Inference for the probabilistic core: the ELBO estimators and their terms, the module, KL annealing."""
