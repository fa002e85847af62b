"""ExFuse ladder on VOC 2012 train_aug, rung 6: + densely adjacent prediction.

Every component of exfuse_resnext101 is on; see configs/exfuse_ladder.py.
"""
from configs.exfuse_ladder import ladder_config


def get_config():
  return ladder_config('voc', 'dap')
