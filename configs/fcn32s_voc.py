"""fcn32s on voc2012: the released "heavy" FCN recipe (``fcn_recipe`` in configs/recipes.py),
lr 1e-10, from VGG16."""
from configs.recipes import fcn_recipe


def get_config():
  return fcn_recipe('fcn32s', learning_rate=1e-10)
