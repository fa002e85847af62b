"""ExFuse ladder on CamVid (11 classes), rung 5: + explicit channel resolution embedding.

See configs/exfuse_ladder.py.
"""
from configs.exfuse_ladder import ladder_config


def get_config():
  return ladder_config('camvid', 'ecre')
