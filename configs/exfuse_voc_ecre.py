"""ExFuse ladder on VOC 2012 train_aug, rung 5: + explicit channel resolution embedding.

See configs/exfuse_ladder.py.
"""
from configs.exfuse_ladder import ladder_config


def get_config():
  return ladder_config('voc', 'ecre')
