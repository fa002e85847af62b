"""PyTorch references of the registered architectures, timed in eager mode.

Run by experiments/benchmark.py (whole models) and experiments/microbench_ops.py (single
convolutions: a spec with ``convs``) as a child process, by path under the torch interpreter
(``python .../torch_reference.py '<json spec>'``), so it needs only torch (+ torchvision for the
torchvision models), numpy and the reference checkouts, never JAX or this library. Importable
without torch: benchmark.py uses the registry to reject a name before starting the child.

Timed like the JAX side: a first call (``first_call_s``, the eager counterpart of compiling),
``warmup`` untimed calls, then ``repeats`` runs of ``iters`` steps.
Inference is ``model.eval()`` under ``torch.inference_mode``; a train step is forward, the
cross-entropy of every head against the labels at that head's resolution (ignore 255),
backward and an SGD + momentum + weight decay update. bfloat16 runs under ``torch.autocast``
(float32 parameters, bf16 compute), the counterpart of the models' ``dtype`` field.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import types

import numpy as np

# flag / spec key -> the repository it is a checkout of
REPOS = {
    'refinenet_pytorch': 'DrSleep/refinenet-pytorch',
    'light_weight_refinenet': 'DrSleep/light-weight-refinenet',
    'pytorch_fcn': 'wkentaro/pytorch-fcn',
}
# registry name -> (REPOS key, or None for torchvision; constructor name there)
REFERENCES = {
    'refinenet_r101': ('refinenet_pytorch', 'rf101'),
    'lw_refinenet_r50': ('light_weight_refinenet', 'rf_lw50'),
    'lw_refinenet_r101': ('light_weight_refinenet', 'rf_lw101'),
    'lw_refinenet_r152': ('light_weight_refinenet', 'rf_lw152'),
    'fcn32s': ('pytorch_fcn', 'FCN32s'),
    'fcn16s': ('pytorch_fcn', 'FCN16s'),
    'fcn8s': ('pytorch_fcn', 'FCN8s'),
    'fcn8s_atonce': ('pytorch_fcn', 'FCN8sAtOnce'),
    'fcn_resnet50': (None, 'fcn_resnet50'),
    'fcn_resnet101': (None, 'fcn_resnet101'),
}
# name prefix -> why there is nothing to compare against
NO_REFERENCE = {
    'exfuse': 'ExFuse has no official code, and the unofficial ports are partial (e.g. no ECRE '
              'loss, a different DAP), so no PyTorch model has the same architecture to time',
    'gcn': 'GCN ("Large Kernel Matters") has no official code, and the unofficial ports differ '
           'in the decoder, so no PyTorch model has the same architecture to time',
}
RECORD = 'TORCH_RECORD '  # benchmark.py reads only lines with this prefix


class NoReference(KeyError):
  """The model is known to have no reference implementation (the reason is ``args[0]``)."""


def resolve(name: str):
  """(REPOS key or None, constructor) for a registry name."""
  if name in REFERENCES:
    return REFERENCES[name]
  for prefix, why in NO_REFERENCE.items():
    if name.startswith(prefix):
      raise NoReference(why)
  raise KeyError(f'no PyTorch reference registered for {name!r}; known: '
                 f'{", ".join(sorted(REFERENCES))}')


def run_child(torch_python: str, spec: dict, what: str) -> list[dict]:
  """Runs this file under ``torch_python`` with ``spec``; returns the records it prints. Raises
  if the child fails, with its stderr and ``what`` it was timing."""
  proc = subprocess.run([torch_python, __file__, json.dumps(spec)], capture_output=True,
                        text=True)
  if proc.returncode:
    raise RuntimeError(f'PyTorch child for {what} failed (exit {proc.returncode}):\n'
                       f'{proc.stderr[-3000:]}')
  return [json.loads(line[len(RECORD):]) for line in proc.stdout.splitlines()
          if line.startswith(RECORD)]


def _commit(repo: str) -> str:
  marker = os.path.join(repo, 'COMMIT')  # trees exported without .git
  if os.path.exists(marker):
    with open(marker) as f:
      return f.read().strip()
  try:
    return subprocess.check_output(['git', '-C', repo, 'rev-parse', 'HEAD'], text=True,
                                   stderr=subprocess.DEVNULL).strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def _checkout_package(name: str, folder: str):
  """``folder`` of a reference checkout as the empty package ``name`` (its ``__init__`` is not
  run), replacing the modules an earlier checkout registered under that name."""
  for mod in [m for m in sys.modules if m.split('.')[0] == name]:
    del sys.modules[mod]
  sys.modules[name] = types.ModuleType(name)
  sys.modules[name].__path__ = [folder]


def _drsleep(repo: str, ctor: str):
  # Both DrSleep repositories have top-level `models` and `utils` packages (models/resnet.py
  # imports `utils.*`): they are registered as packages rooted in ``repo``, not found on sys.path.
  for pkg in ('models', 'utils'):
    _checkout_package(pkg, os.path.join(repo, pkg))
  return getattr(importlib.import_module('models.resnet'), ctor)


def _torchfcn(repo: str, ctor: str):
  # torchfcn/__init__ pulls in its trainer and datasets, and models/__init__ its VGG16 (which
  # needs torchvision): only the module that defines ``ctor`` is loaded. The `fcn` package it
  # imports only downloads weights.
  if 'fcn' not in sys.modules and importlib.util.find_spec('fcn') is None:
    sys.modules['fcn'] = types.ModuleType('fcn')
  _checkout_package('torchfcn_models', os.path.join(repo, 'torchfcn', 'models'))
  module = importlib.import_module('torchfcn_models.' + ctor.lower().removesuffix('atonce'))
  return getattr(module, ctor)


def build(name: str, repos: dict, num_classes: int):
  """(randomly initialised reference model, description of its source)."""
  repo_key, ctor = resolve(name)
  if repo_key is None:
    import torchvision  # noqa: PLC0415
    model = getattr(torchvision.models.segmentation, ctor)(
        weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=True)
    return model, f'torchvision {torchvision.__version__}:{ctor}'
  repo = repos.get(repo_key)
  if not repo or not os.path.isdir(repo):
    raise FileNotFoundError(f'{name}: its PyTorch reference needs --{repo_key}=<checkout of '
                            f'{REPOS[repo_key]}> (got {repo!r})')
  source = f'{REPOS[repo_key]}@{_commit(repo)}:{ctor}'
  if repo_key == 'pytorch_fcn':
    return _torchfcn(repo, ctor)(n_class=num_classes), source
  return _drsleep(repo, ctor)(num_classes, imagenet=False, pretrained=False), source


def _heads(out):
  """Model output -> list of logits tensors (torchvision returns {'out', 'aux'})."""
  if isinstance(out, dict):
    return [v for k, v in out.items() if v is not None]
  return list(out) if isinstance(out, (tuple, list)) else [out]


def timing_stats(step_s, batch: int) -> dict:
  """Seconds per step and images/s over the timed runs: median, min, max (benchmark.py uses it
  too). Images/s derive from the step times, so their median is the median run's."""
  t = {'median': statistics.median(step_s), 'min': min(step_s), 'max': max(step_s)}
  return {'step_s': t, 'images_per_s': {'median': batch / t['median'],
                                        'min': batch / t['max'], 'max': batch / t['min']}}


def benchmark(spec: dict) -> list[dict]:
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415

  torch.manual_seed(0)
  torch.set_num_threads(spec['threads'])
  device = torch.device(spec['device'])
  fmt = torch.channels_last if spec['channels_last'] else torch.contiguous_format
  data = np.load(spec['inputs'])
  images = torch.from_numpy(data['image']).permute(0, 3, 1, 2).to(device)  # uint8 NCHW
  labels = torch.from_numpy(data['label'].astype(np.int64)).to(device)
  batch, _, h, w = images.shape
  # ImageNet statistics for every model: the constants do not change the cost
  mean = torch.tensor([123.675, 116.28, 103.53], device=device).view(1, 3, 1, 1)
  std = torch.tensor([58.395, 57.12, 57.375], device=device).view(1, 3, 1, 1)
  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  label_cache = {}

  def labels_at(shape):  # nearest-neighbour labels at a head's resolution
    if shape not in label_cache:
      label_cache[shape] = F.interpolate(labels[:, None].float(), size=shape,
                                         mode='nearest')[:, 0].long()
    return label_cache[shape]

  def prep():
    return ((images.float() - mean) / std).contiguous(memory_format=fmt)

  records = []
  for dtype in spec['dtypes']:
    for mode in spec['modes']:
      model, source = build(spec['model'], spec['repos'], spec['num_classes'])
      model = model.to(device).to(memory_format=fmt)
      n_heads = [None]
      autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=dtype == 'bfloat16')
      if mode == 'inference':
        model.eval()

        def step():
          with torch.inference_mode(), autocast:
            return model(prep())
      else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

        def step():
          opt.zero_grad(set_to_none=True)
          with autocast:
            heads = _heads(model(prep()))
            n_heads[0] = len(heads)
            loss = sum(F.cross_entropy(o.float(), labels_at(tuple(o.shape[-2:])),
                                       ignore_index=255) for o in heads)
          loss.backward()
          opt.step()
          return loss

      t0 = time.perf_counter()
      out = step()
      sync()
      first_call_s = time.perf_counter() - t0
      for _ in range(spec['warmup']):
        step()
      sync()
      times = []
      for _ in range(spec['repeats']):
        t0 = time.perf_counter()
        for _ in range(spec['iters']):
          out = step()
        sync()
        times.append(time.perf_counter() - t0)
      if mode == 'train' and not torch.isfinite(out):
        raise FloatingPointError(f'{spec["model"]}: non-finite loss {float(out)}')
      step_s = [t / spec['iters'] for t in times]
      records.append({
          'framework': 'torch', 'model': spec['model'], 'reference': source, 'mode': mode,
          'dtype': dtype, 'batch': batch, 'size': [h, w], 'num_classes': spec['num_classes'],
          'params': sum(p.numel() for p in model.parameters()),
          'aux_heads': None if n_heads[0] is None else n_heads[0] - 1,
          'torch_version': torch.__version__, 'device': str(device),
          'threads': torch.get_num_threads(), 'channels_last': spec['channels_last'],
          'first_call_s': first_call_s, 'warmup': spec['warmup'], 'iters': spec['iters'],
          'repeats': spec['repeats'], **timing_stats(step_s, batch),
      })
  return records


def conv_times(spec: dict) -> list[dict]:
  """ms (median of ``iters`` after one untimed call) of each convolution in ``spec['convs']``
  (NHWC input shape, HWIO kernel shape, strides, ((top, bottom), (left, right)) padding,
  dilation, groups): forward, input gradient and weight gradient, each the ATen call that eager
  autograd makes, on channels-last tensors as the benchmark's models use; and the output
  shape (NHWC), which says the padding was understood."""
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415

  torch.manual_seed(0)
  torch.set_num_threads(spec['threads'])
  cl = torch.channels_last

  def timed(fn):
    fn()
    times = []
    for _ in range(spec['iters']):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)

  rows = []
  for (n, h, w, _), (kh, kw, cin, cout), strides, ((pt, pb), (pl, pr)), dilation, groups in (
      spec['convs']):
    x = torch.randn(n, cin * groups, h, w).contiguous(memory_format=cl)
    if (pt, pl) != (pb, pr):  # torch pads symmetrically: pad the input itself (rare; timed)
      x = F.pad(x, (pl, pr, pt, pb)).contiguous(memory_format=cl)
      pt = pl = 0
    weight = (0.01 * torch.randn(cout, cin, kh, kw)).contiguous(memory_format=cl)
    args = (list(strides), [pt, pl], list(dilation), False, [0, 0], groups)
    with torch.no_grad():
      y = F.conv2d(x, weight, None, *args[:3], groups)
      dy = torch.randn_like(y).contiguous(memory_format=cl)
      backward = lambda mask: torch.ops.aten.convolution_backward(
          dy, x, weight, None, *args, mask)
      rows.append({'output shape': [y.shape[0], *y.shape[2:], y.shape[1]],  # NHWC
                   'forward ms': timed(lambda: F.conv2d(x, weight, None, *args[:3], groups)),
                   'input gradient ms': timed(lambda: backward([True, False, False])),
                   'weight gradient ms': timed(lambda: backward([False, True, False]))})
  return rows


if __name__ == '__main__':
  spec = json.loads(sys.argv[1])
  for record in conv_times(spec) if 'convs' in spec else benchmark(spec):
    print(RECORD + json.dumps(record), flush=True)
