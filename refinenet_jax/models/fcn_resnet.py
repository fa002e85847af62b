"""FCN-ResNet50/101 as torchvision builds it (``torchvision.models.segmentation.fcn_resnet*``).

A v1.5 ResNet dilated to output stride 8 (layer3 and layer4 trade their stride for dilation 2/4),
then a dense head: 3x3 conv to in/4 channels (no bias) -> BN -> ReLU -> dropout 0.1 -> 1x1 conv.
The auxiliary head is the same on layer3's output (1024 channels, also at stride 8 once dilated).
Both outputs are resized bilinearly to the input with half-pixel centres (torchvision's
``F.interpolate(..., align_corners=False)``), so the logits have the input's exact size. This is
"FCN" only in having a fully convolutional head: no skip fusion, no pad 100, no deconvolution.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from refinenet_jax.models.backbones import ENCODERS, ModuleDef
from refinenet_jax.models.layers import conv, resize_bilinear

Dtype = Any


class FCNResNet(nn.Module):
  num_classes: int
  encoder: ModuleDef = ENCODERS['resnet50']  # torchvision's are v1.5 (stride on the 3x3)
  output_stride: int = 8
  freeze_encoder_bn: bool = False
  aux_head: bool = True  # torchvision's aux_loss; its published weights carry the aux head
  head_dropout: float = 0.1
  dtype: Dtype = jnp.float32
  remat: bool = False
  normalization: str = 'imagenet'

  def _head(self, x, prefix, classifier_name, train):
    bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                      param_dtype=jnp.float32, name=f'{prefix}_bn')
    x = conv(x.shape[-1] // 4, 3, use_bias=False, name=f'{prefix}_conv', dtype=self.dtype)(x)
    x = nn.relu(bn(x))
    if self.head_dropout:
      x = nn.Dropout(self.head_dropout, deterministic=not train)(x)
    return conv(self.num_classes, 1, use_bias=True, name=classifier_name, dtype=self.dtype)(x)

  @nn.compact
  def __call__(self, images, train: bool = False, return_aux: bool = False):
    """images: (N, H, W, 3) normalised as ``self.normalization``; any H, W >= 1.

    Returns float32 logits (N, H, W, C); with the aux head, in training (or with ``return_aux``,
    like torchvision's eval-mode ``{'out', 'aux'}``) ``(logits, (aux,))``.
    """
    if return_aux and not self.aux_head:
      raise ValueError('return_aux=True needs a model built with aux_head=True')
    feats = self.encoder(name='encoder', dtype=self.dtype, remat=self.remat,
                         freeze_bn=self.freeze_encoder_bn, output_stride=self.output_stride)(
                             images.astype(self.dtype), train)
    size = images.shape[1:3]
    # Upsampling in float32: the logits are the only full-resolution tensor, bf16 would round them.
    up = lambda x: resize_bilinear(x.astype(jnp.float32), size, 'half_pixel')
    logits = up(self._head(feats[-1], 'head', 'classifier', train))
    # The aux head only matters for the loss, but init (eval mode) must still create its variables.
    if self.aux_head and (train or return_aux or self.is_initializing()):
      aux = up(self._head(feats[-2], 'aux_head', 'aux_classifier', train))
      if train or return_aux:
        return logits, (aux,)
    return logits


VARIANTS = {
    'fcn_resnet50': functools.partial(FCNResNet, encoder=ENCODERS['resnet50']),
    'fcn_resnet101': functools.partial(FCNResNet, encoder=ENCODERS['resnet101']),
    # test-sized: one block per stage, 8-channel stem (head 256 -> 64, aux head 128 -> 32 wide)
    'fcn_resnet_tiny': functools.partial(FCNResNet, encoder=ENCODERS['resnet_tiny']),
}
