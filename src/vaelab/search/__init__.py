"""Optuna search: a persistent study over a search space in conf/search/, each trial one vaelab training run
(vaelab.search.driver tells how the pieces fit)."""
