"""refinenet_improved_r101 on ade20k: the released recipe (configs/recipes.py)."""
from configs.recipes import paper_recipe


def get_config():
  return paper_recipe('refinenet_improved_r101', 'ade20k', 150, crop=(400, 400), num_steps=120000)
