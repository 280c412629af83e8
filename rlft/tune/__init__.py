"""Hyperparameter search for rlft runs on Optuna: YAML search spaces over dotted config keys, shared RDB studies
that resume after a kill, step-wise pruning during training, and the end-of-study report (``rlft tune``)."""

from rlft.tune.pruning import StepPruningCallback
from rlft.tune.space import Param, SearchSpace, SearchSpaceError, load_search_space, parse_search_space

__all__ = ["Param", "SearchSpace", "SearchSpaceError", "StepPruningCallback", "load_search_space", "parse_search_space"]
