"""ExFuse ladder on VOC 2012 train_aug, rung 2: + layer rearrangement (8, 8, 9, 8).

See configs/exfuse_ladder.py.
"""
from configs.exfuse_ladder import ladder_config


def get_config():
  return ladder_config('voc', 'lr')
