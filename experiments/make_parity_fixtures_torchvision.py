"""Regenerates tests/fixtures/parity_fcn_resnet50.npz: reference outputs of torchvision's
``fcn_resnet50`` (both the "out" and the "aux" head).

Needs torch and torchvision (no weights are downloaded):
  python -m experiments.make_parity_fixtures_torchvision

As in make_parity_fixtures.py: the model's state-dict keys are filled with
``synthetic_state_dict(keys, seed)`` and the model runs in eval mode on an input whose sides are
not multiples of 8 or 32. CI regenerates the weights from the stored keys and seed. To keep the
file small the model has 3 classes and the input holds multiples of 1/256 in [-2, 2), exact in
float16, so it is stored as float16 and read back bit-identical.
"""
import os

import numpy as np
import torch
import torchvision
from torchvision.models.segmentation import fcn_resnet50

from experiments.make_parity_fixtures import HERE, INPUT_SHAPE
from refinenet_jax.testing import synthetic_state_dict


def make_fcn_parity(out_name='parity_fcn_resnet50.npz', seed=0, num_classes=3):
  model = fcn_resnet50(weights=None, weights_backbone=None, num_classes=num_classes,
                       aux_loss=True)
  keys = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
  sd = synthetic_state_dict(keys, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  model.eval()
  rng = np.random.default_rng(seed + 1)
  x = (rng.integers(-512, 512, INPUT_SHAPE) / 256).astype(np.float16)
  with torch.no_grad():
    out = model(torch.from_numpy(x.astype(np.float32)))
  logits, aux = (out[k].numpy().transpose(0, 2, 3, 1) for k in ('out', 'aux'))
  np.savez_compressed(
      os.path.join(HERE, out_name), seed=seed, keys=np.array([k for k, _ in keys]),
      shapes=np.array([repr(s) for _, s in keys]), input_nhwc=x.transpose(0, 2, 3, 1),
      logits_nhwc=logits, aux_nhwc=aux, torch_version=torch.__version__,
      reference=f'torchvision=={torchvision.__version__}:fcn_resnet50(aux_loss=True)')
  print(out_name, len(keys), 'tensors; out', logits.shape, 'max|out|', float(np.abs(logits).max()),
        'max|aux|', float(np.abs(aux).max()), 'bytes', os.path.getsize(os.path.join(HERE, out_name)))


if __name__ == '__main__':
  torch.manual_seed(0)
  os.makedirs(HERE, exist_ok=True)
  make_fcn_parity()
