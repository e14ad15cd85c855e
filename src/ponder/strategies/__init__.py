"""Strategies by name: the registry the CLI (``--strategy``), ``ponder eval``, sweeps and
``ponder serve`` use. ``core`` holds the registry itself (``Strategy``, ``Context``,
``register``, ``build``, the model loaders); each family registers its strategies in
a module of its own, factories beside their registrations: ``token_level``,
``parallel``, ``search``, ``refinement``, ``adaptive``."""

from . import adaptive, parallel, refinement, step_search, token_level  # noqa: F401 (each registers its family)
from .core import (ALL_ADAPTERS, ALL_OPTIONS, CONSTRAINT_SETTINGS, STRATEGIES, Context, Strategy, build, load_endpoint,
                   load_model, load_reward_model, register)

__all__ = ["ALL_ADAPTERS", "ALL_OPTIONS", "CONSTRAINT_SETTINGS", "STRATEGIES", "Context", "Strategy", "build",
           "load_endpoint", "load_model", "load_reward_model", "register"]
