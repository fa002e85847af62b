"""fcn8s_atonce on voc2012, heavy recipe (recipes.fcn_recipe) in one stage from VGG16.

pool4 x 0.01 and pool3 x 1e-4 before their score convs let all three streams train together:
lr 1e-10 on the summed loss, 300k iterations (reference: 65.4 mIoU on seg11valid).
``init_checkpoint``: VGG16 converted into fcn8s_atonce (layout 'wkentaro_vgg16').
"""
from configs.recipes import fcn_recipe


def get_config():
  return fcn_recipe('fcn8s_atonce', learning_rate=1e-10, num_steps=300_000)
