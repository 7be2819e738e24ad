"""vkd-pyro: Variational Knowledge Distillation (van Sonsbeek et al., IPMI 2021) in Pyro."""

__version__ = "0.1.0"
