"""Regenerates tests/fixtures/parity_resnext50_encoder.npz: torchvision ResNeXt-50 32x4d stage
outputs, the reference for the strict ``torchvision_resnet`` import of ResNeXt encoders.

Needs torch + torchvision (no weights are downloaded):
  python -m experiments.make_parity_fixtures_resnext

The torchvision state-dict key list (``fc.*`` included, as in the published ImageNet files) is
filled with ``refinenet_jax.testing.synthetic_state_dict(keys, seed)``; the model runs in eval
mode on an input whose sides are not multiples of 32 and the four stage outputs are stored.
CI regenerates the same weights from the seed, so no weights are stored.
"""
import argparse
import os

import numpy as np
import torch
import torchvision

from refinenet_jax.testing import synthetic_state_dict

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'fixtures',
                   'parity_resnext50_encoder.npz')
INPUT_SHAPE = (1, 3, 35, 29)  # NCHW: small (fixture size), neither side a multiple of 32


def main(seed: int):
  model = torchvision.models.resnext50_32x4d(weights=None)
  keys = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
  sd = synthetic_state_dict(keys, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  model.eval()
  x = (np.random.default_rng(seed + 1).random(INPUT_SHAPE) * 4 - 2).astype(np.float32)
  feats = []
  with torch.no_grad():
    y = model.maxpool(model.relu(model.bn1(model.conv1(torch.from_numpy(x)))))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
      y = layer(y)
      feats.append(y.numpy().transpose(0, 2, 3, 1))
  np.savez_compressed(
      OUT, seed=seed, keys=np.array([k for k, _ in keys]),
      shapes=np.array([repr(s) for _, s in keys]), input_nhwc=x.transpose(0, 2, 3, 1),
      **{f'c{i + 2}_nhwc': f for i, f in enumerate(feats)}, torch_version=torch.__version__,
      reference=f'torchvision {torchvision.__version__} resnext50_32x4d')
  print(os.path.basename(OUT), len(keys), 'tensors; stages', [f.shape for f in feats],
        'max|c5|', float(np.abs(feats[-1]).max()), f'{os.path.getsize(OUT) / 1024:.0f} KB')


if __name__ == '__main__':
  p = argparse.ArgumentParser()
  p.add_argument('--seed', type=int, default=0)
  main(p.parse_args().seed)
