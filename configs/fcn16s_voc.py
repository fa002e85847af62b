"""fcn16s on voc2012, heavy recipe (recipes.fcn_recipe): lr 1e-12, from the FCN-32s weights.

Set ``--config.init_checkpoint`` to the trained FCN-32s as a converted checkpoint; its score_pool4
starts at zero, so training starts from the FCN-32s predictions.
"""
from configs.recipes import fcn_recipe


def get_config():
  return fcn_recipe('fcn16s', learning_rate=1e-12)
