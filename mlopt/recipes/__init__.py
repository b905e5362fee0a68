"""Recipes: the schema (``schema.py``) and loading from YAML with clear errors (``load.py``)."""

from mlopt.recipes.load import dump_recipe, load_recipe, recipe_from_dict
from mlopt.recipes.schema import Recipe

__all__ = ["Recipe", "dump_recipe", "load_recipe", "recipe_from_dict"]
