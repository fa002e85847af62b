"""refinenet_improved_r101 on sun_rgbd: the released recipe (configs/recipes.py)."""
from configs.recipes import paper_recipe


def get_config():
  return paper_recipe('refinenet_improved_r101', 'sun_rgbd', 37, crop=(400, 400), num_steps=40000)
