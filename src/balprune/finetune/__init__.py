"""Fine-tuning: Algorithm 1 with training between the schedule's steps.

``Pruner`` is the API for a user's own training loop; ``run_finetune`` runs a recipe on a
built-in task (balprune.tasks); ``run_sweep`` and ``sensitivity`` build the paper's comparisons
on top. Importing this package does not touch a GPU.
"""

from .pruner import Pruner, clean_name, clean_state_dict, options_from_recipe

__all__ = ["Pruner", "clean_name", "clean_state_dict", "options_from_recipe"]
