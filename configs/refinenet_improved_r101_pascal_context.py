"""refinenet_improved_r101 on pascal_context: the released recipe (configs/recipes.py)."""
from configs.recipes import paper_recipe


def get_config():
  return paper_recipe('refinenet_improved_r101', 'pascal_context', 60, crop=(400, 400), num_steps=40000)
