"""Regenerates tests/fixtures/*: reference outputs of the published PyTorch code.

Needs torch and checkouts of the reference repositories (not vendored here):
  python -m experiments.make_parity_fixtures \
      --refinenet_pytorch=/path/to/DrSleep/refinenet-pytorch \
      --light_weight_refinenet=/path/to/DrSleep/light-weight-refinenet \
      --pytorch_fcn=/path/to/wkentaro/pytorch-fcn

Each repository flag is optional; only the fixtures of the given ones are rewritten.

For each reference model it takes the state-dict key list, fills it with
``refinenet_jax.testing.synthetic_state_dict(keys, seed)`` (non-default BN statistics), runs the
model in eval mode on an input whose sides are not multiples of 32, and stores keys, shapes,
input and logits. CI regenerates the same weights from the seed, so no weights are stored.
It also stores tiny checkpoints written by real ``torch.save`` (zip and legacy formats) so the
torch-free reader is tested against the real thing.

FCN-VGG16 (wkentaro's FCN32s/16s/8s/8sAtOnce, full width, 5 classes; one fixture): every tensor
but the frozen ``upscore*`` deconvolutions gets synthetic weights (FCN8s's keys, which cover
the other three nets', so one weight set serves all four); the ``upscore*`` keep the bilinear
filters the reference initialises them with and never trains, which the JAX model hard-codes.
"""
import argparse
import collections
import os

import numpy as np
import torch

# the reference loaders shared with the benchmark
from experiments.torch_reference import _commit, _drsleep as _import_reference, _torchfcn
from refinenet_jax.testing import synthetic_state_dict

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'fixtures')
INPUT_SHAPE = (2, 3, 61, 83)  # NCHW, neither side a multiple of 32


def make_parity(repo, ctor, out_name, seed, num_classes=21):
  model = _import_reference(repo, ctor)(num_classes, imagenet=False, pretrained=False)
  keys = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
  sd = synthetic_state_dict(keys, seed)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  model.eval()
  x = (np.random.default_rng(seed + 1).random(INPUT_SHAPE) * 4 - 2).astype(np.float32)
  with torch.no_grad():
    logits = model(torch.from_numpy(x)).numpy()
  np.savez_compressed(
      os.path.join(HERE, out_name), seed=seed, keys=np.array([k for k, _ in keys]),
      shapes=np.array([repr(s) for _, s in keys]), input_nhwc=x.transpose(0, 2, 3, 1),
      logits_nhwc=logits.transpose(0, 2, 3, 1), torch_version=torch.__version__,
      reference=f'{os.path.basename(os.path.normpath(repo))}@{_commit(repo)}:{ctor}')
  print(out_name, ctor, len(keys), 'tensors; logits', logits.shape,
        'max|logit|', float(np.abs(logits).max()))


FCN_INPUT_SHAPE = (1, 3, 45, 61)  # NCHW, odd sides


def make_fcn_parity(repo, seed, num_classes=5, out_name='parity_fcn_vgg16.npz'):
  ctors = [_torchfcn(repo, name) for name in ('FCN32s', 'FCN16s', 'FCN8s', 'FCN8sAtOnce')]
  # FCN8s's non-upscore keys are a superset of the others': one weight set serves all four
  keys = [(k, tuple(v.shape)) for k, v in ctors[2](num_classes).state_dict().items()
          if not k.startswith('upscore')]
  sd = synthetic_state_dict(keys, seed)
  # BGR 0..255 minus the mean: the range the Caffe weights are fed
  x = ((np.random.default_rng(seed + 1).random(FCN_INPUT_SHAPE) - 0.5) * 255).astype(np.float32)
  logits = {}
  for ctor in ctors:
    model = ctor(num_classes)
    own = model.state_dict()
    model.load_state_dict({k: torch.from_numpy(sd[k]) if k in sd else v
                           for k, v in own.items()}, strict=True)
    model.eval()
    with torch.no_grad():
      out = model(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    logits[f'logits_{ctor.__name__}'] = out
    print(ctor.__name__, 'logits', out.shape, 'max|logit|', float(np.abs(out).max()))
  np.savez_compressed(
      os.path.join(HERE, out_name), seed=seed, num_classes=num_classes,
      keys=np.array([k for k, _ in keys]), shapes=np.array([repr(s) for _, s in keys]),
      input_nhwc=x.transpose(0, 2, 3, 1), **logits, torch_version=torch.__version__,
      reference=f'pytorch-fcn@{_commit(repo)}')
  print(out_name, len(keys), 'synthetic tensors')


def make_torch_io():
  g = torch.Generator().manual_seed(0)
  sd = collections.OrderedDict()
  sd['conv.weight'] = torch.randn(4, 3, 3, 3, generator=g)
  sd['bn.running_mean'] = torch.randn(4, generator=g)
  sd['bn.num_batches_tracked'] = torch.tensor(7)
  sd['transposed'] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # strided view
  sd['slice'] = torch.randn(10, generator=g)[3:8]  # storage offset
  sd['half'] = torch.randn(5, generator=g).half()
  sd['bf16'] = torch.randn(2, 3, generator=g).bfloat16()
  sd['int'] = torch.arange(5, dtype=torch.int32)
  torch.save(sd, os.path.join(HERE, 'torch_io_zip.pth'))
  torch.save({'segmenter': collections.OrderedDict(('module.' + k, v) for k, v in sd.items()),
              'epoch_start': 3}, os.path.join(HERE, 'torch_io_legacy.pth'),
             _use_new_zipfile_serialization=False)
  np.savez(os.path.join(HERE, 'torch_io_expected.npz'),
           **{k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
              for k, v in sd.items()})
  print('torch_io fixtures written')


if __name__ == '__main__':
  p = argparse.ArgumentParser()
  p.add_argument('--refinenet_pytorch')
  p.add_argument('--light_weight_refinenet')
  p.add_argument('--pytorch_fcn')
  p.add_argument('--seed', type=int, default=0)
  a = p.parse_args()
  if not (a.refinenet_pytorch or a.light_weight_refinenet or a.pytorch_fcn):
    p.error('give at least one reference repository')
  torch.manual_seed(0)
  os.makedirs(HERE, exist_ok=True)
  if a.refinenet_pytorch:
    make_torch_io()
    make_parity(a.refinenet_pytorch, 'rf101', 'parity_refinenet_r101.npz', a.seed)
  if a.light_weight_refinenet:
    make_parity(a.light_weight_refinenet, 'rf_lw50', 'parity_lw_refinenet_r50.npz', a.seed)
  if a.pytorch_fcn:
    make_fcn_parity(a.pytorch_fcn, a.seed)
