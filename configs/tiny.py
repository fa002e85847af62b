"""Test config: the smallest RefineNet on 32x32 synthetic scenes, a few steps (seconds on CPU)."""
import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.model_overrides = ml_collections.ConfigDict(
      {'tap_dropout': 0.0, 'head_dropout': 0.1, 'base_width': 8, 'path_widths': (16, 8, 8, 8)})
  c.image_size, c.num_train, c.num_val = 32, 32, 10
  c.batch_size, c.eval_batch_size = 8, 8
  c.num_steps, c.warmup_steps = 12, 2
  c.log_every, c.checkpoint_every = 4, 4
  return c
