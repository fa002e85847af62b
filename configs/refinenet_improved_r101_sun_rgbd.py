"""refinenet_improved_r101 on sun_rgbd: the released recipe (configs/recipes.py).

SUN-RGBD has no val split: the published numbers are on its 5050-image test split.
"""
from configs.recipes import paper_recipe


def get_config():
  c = paper_recipe('refinenet_improved_r101', 'sun_rgbd', 37, crop=(400, 400), num_steps=40000)
  c.eval_split = 'test'
  return c
