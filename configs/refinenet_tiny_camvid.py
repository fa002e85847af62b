"""CamVid from scratch on a 2-core CPU: the small RefineNet, half-resolution training crops.

Trains on random 0.5-1.0 rescales of the 360x480 images cropped to 192x256 (4x fewer pixels per
image than full size), evaluates on the whole 360x480 val images. No ImageNet weights.
"""
import ml_collections

from configs import default


def get_config():
  c = default.get_config()
  c.model = 'refinenet_tiny'
  c.model_overrides = ml_collections.ConfigDict(
      {'tap_dropout': 0.0, 'head_dropout': 0.1, 'base_width': 16, 'path_widths': (64, 32, 32, 32)})
  c.dataset = 'camvid'
  c.num_classes = 11
  c.crop_size = (192, 256)
  c.scale_range = (0.5, 1.0)
  c.batch_size = 16
  c.num_steps = 3000
  c.learning_rate = 0.05
  c.warmup_steps = 200
  c.eval_batch_size = 8
  c.eval_every = 1000
  c.checkpoint_every = 500
  c.log_every = 50
  return c
