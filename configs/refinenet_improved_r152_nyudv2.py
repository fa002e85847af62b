"""refinenet_improved_r152 on nyudv2_40: the released recipe (configs/recipes.py)."""
from configs.recipes import paper_recipe


def get_config():
  return paper_recipe('refinenet_improved_r152', 'nyudv2_40', 40, crop=(400, 400), num_steps=20000)
