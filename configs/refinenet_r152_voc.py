"""refinenet_r152 on voc2012: the released recipe (configs/recipes.py)."""
from configs.recipes import paper_recipe


def get_config():
  return paper_recipe('refinenet_r152', 'voc2012', 21, crop=(400, 400), dataset_config='aug')
