"""fcn8s on voc2012, heavy recipe (recipes.fcn_recipe): lr 1e-14, from the FCN-16s weights.

Set ``--config.init_checkpoint`` to the trained FCN-16s as a converted checkpoint; its score_pool3
starts at zero, so training starts from the FCN-16s predictions.
"""
from configs.recipes import fcn_recipe


def get_config():
  return fcn_recipe('fcn8s', learning_rate=1e-14)
