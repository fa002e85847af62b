"""lw_refinenet_r50 on voc2012: the released recipe (configs/recipes.py)."""
from configs.recipes import paper_recipe


def get_config():
  return paper_recipe('lw_refinenet_r50', 'voc2012', 21, crop=(500, 500), dataset_config='aug',
                      lw=True)
