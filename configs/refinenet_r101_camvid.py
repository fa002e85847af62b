"""refinenet_r101 on camvid: the released recipe (configs/recipes.py)."""
from configs.recipes import paper_recipe


def get_config():
  return paper_recipe('refinenet_r101', 'camvid', 11, crop=(360, 480), num_steps=10000)
