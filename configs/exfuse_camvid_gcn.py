"""ExFuse ladder on CamVid (11 classes), rung 1: the GCN baseline on ResNeXt-101 32x4d.

See configs/exfuse_ladder.py.
"""
from configs.exfuse_ladder import ladder_config


def get_config():
  return ladder_config('camvid', 'gcn')
