"""ExFuse ladder on VOC 2012 train_aug, rung 4: + semantic embedding branch.

See configs/exfuse_ladder.py.
"""
from configs.exfuse_ladder import ladder_config


def get_config():
  return ladder_config('voc', 'seb')
