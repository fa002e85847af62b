"""refinenet_r101 on cityscapes: the released recipe (configs/recipes.py)."""
from configs.recipes import paper_recipe


def get_config():
  return paper_recipe('refinenet_r101', 'cityscapes', 19, crop=(600, 600), num_steps=60000)
