"""refinenet_improved_r101 on person_part: the released recipe (configs/recipes.py)."""
from configs.recipes import paper_recipe


def get_config():
  return paper_recipe('refinenet_improved_r101', 'person_part', 7, crop=(400, 400), num_steps=20000)
