"""CamVid from scratch on a 2-core CPU: the tiny RefineNet on half-resolution training crops.

Trains on random 0.5-1.0 rescales of the 360x480 images cropped to 192x256 (about 4x fewer
pixels per image than full size) and evaluates on the whole 360x480 val images. No ImageNet
weights. At learning rate 0.05 with batch 8 this diverged (NaN at step 200): 0.02 + clipping.
Measured on 2 CPU cores: val mIoU 0.359 / 0.442 / 0.463 / 0.501 / 0.537 / 0.574 at steps 1500 /
3000 / 4500 / 6000 / 7500 / 9000, 65 min wall (0.537 after 54 min); README "Measured".
Cross-entropy + Lovasz with ema_decay=0.999 over the same steps gave 0.570 (EMA weights) and
0.573 (raw weights): not better, so neither is the default here.
"""
from configs import default


def get_config():
  c = default.get_config()
  c.dataset = 'camvid'
  c.num_classes = 11
  c.crop_size = (192, 256)
  c.scale_range = (0.5, 1.0)
  c.batch_size = 8
  c.num_steps = 9000
  c.learning_rate = 0.02
  c.grad_clip_norm = 1.0
  c.warmup_steps = 200
  c.eval_batch_size = 8
  c.eval_every = 1500
  c.checkpoint_every = 500
  c.log_every = 50
  return c
