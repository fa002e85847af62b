"""Input normalisations. Each model records the one its weights expect (``model.normalization``),
so a converted checkpoint is never fed the wrong statistics by accident."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# name -> (channel order, mean, std) for images given as 0..255 RGB.
NORMALIZATIONS = {
    # torchvision ImageNet weights and every PyTorch RefineNet/LW/FCN-ResNet port.
    'imagenet': ('rgb', (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    # official MatConvNet RefineNet models: RGB minus 128, no scaling.
    'minus128': ('rgb', (128.0, 128.0, 128.0), (1.0, 1.0, 1.0)),
    # Caffe VGG16/FCN weights: BGR 0..255 minus the ImageNet BGR mean.
    'caffe_bgr': ('bgr', (104.00698793, 116.66876762, 122.67891434), (1.0, 1.0, 1.0)),
}


def normalize_images(images, normalization: str = 'imagenet'):
  """Maps 0..255 RGB images (..., H, W, 3), numpy or jax, to the model's expected input."""
  if normalization not in NORMALIZATIONS:
    raise ValueError(f'unknown normalization {normalization!r}; known: {sorted(NORMALIZATIONS)}')
  order, mean, std = NORMALIZATIONS[normalization]
  xp = np if isinstance(images, np.ndarray) else jnp
  if images.shape[-1] != 3:
    raise ValueError(f'expected RGB images with 3 channels last, got shape {images.shape}')
  x = images.astype(xp.float32)
  if order == 'bgr':
    x = x[..., ::-1]
  return (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)
