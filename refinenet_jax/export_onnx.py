"""ONNX export of a serving function (``export.serving_function``) through jax2onnx.

One artifact for every batch size and image size: the input is ``images: uint8[b, h, w, 3]`` with
symbolic ``b``, ``h`` and ``w``, the outputs ``labels: int32[b, h, w]`` and
``probs: float[b, h, w, num_classes]``. jax2onnx and onnx come with the optional ``onnx`` extra,
which installs in a venv of its own (README, "ONNX export": jax2onnx's pins conflict with the
library's), so they are imported only here, when an export is asked for.

Three repairs of what jax2onnx 0.17 writes, all on the ONNX graph:

* ``lax.reduce_window`` max becomes a MaxPool over all four NHWC dims of a (1, 1, N, H, W, C)
  view; ONNX Runtime pools at most three spatial dims ("Unsupported pooling size"). A window
  that is 1 over N and C is rewritten as a 2-D MaxPool of the NCHW transpose.
* Convolutions are laid out NCHW inside the graph while the recorded intermediate shapes stay
  NHWC; the stale ``value_info`` is dropped (ONNX Runtime infers shapes itself), so loading the
  model prints no shape-merge warnings.
* A symbolic size's ``floordiv`` (``ceil(h / 2)`` is ``-floordiv(-h, 2)``) is written as an
  integer Div, which truncates toward zero: off by one for odd sizes. It is made to floor.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

INPUT_NAME = 'images'
OUTPUT_NAMES = ('labels', 'probs')
# jax2onnx's name for the Div of a symbolic size's floordiv (converter/lower_dimexpr.py)
_SIZE_DIV = 'dimexpr_div'
EXTRA_HINT = ("ONNX export needs the optional 'onnx' extra (jax2onnx, onnxruntime), installed in "
              "its own venv; see README.md, 'ONNX export'")


def _import_converter():
  try:
    import jax2onnx  # noqa: F401
    import onnx
  except ImportError as e:
    raise ImportError(f'{EXTRA_HINT} ({e})') from e
  return jax2onnx, onnx


def _pool_2d(model) -> int:
  """Rewrites every 4-spatial-dim MaxPool whose window is trivial over its first and last dims
  (N and C of NHWC) as Squeeze -> NCHW -> 2-D MaxPool -> NHWC -> Unsqueeze; returns the count."""
  from onnx import helper, numpy_helper
  graph, nodes, count = model.graph, [], 0
  for node in graph.node:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    kernel = list(attrs.get('kernel_shape', ()))
    r = len(kernel)
    if node.op_type != 'MaxPool' or r != 4 or len(node.output) != 1 or attrs.get('ceil_mode') \
        or attrs.get('auto_pad', b'NOTSET') not in (b'NOTSET', 'NOTSET'):
      nodes.append(node)
      continue
    strides = list(attrs.get('strides', [1] * r))
    pads = list(attrs.get('pads', [0] * 2 * r))
    dilations = list(attrs.get('dilations', [1] * r))
    trivial = [kernel[i] == 1 and strides[i] == 1 and pads[i] == pads[i + r] == 0 for i in (0, 3)]
    if not all(trivial):
      nodes.append(node)
      continue
    n = f'{node.name or "maxpool"}_2d{count}'
    axes = numpy_helper.from_array(np.array([0, 1], np.int64), f'{n}_axes')
    graph.initializer.append(axes)
    nodes += [
        helper.make_node('Squeeze', [node.input[0], axes.name], [f'{n}_nhwc'], name=f'{n}_squeeze'),
        helper.make_node('Transpose', [f'{n}_nhwc'], [f'{n}_nchw'], name=f'{n}_to_nchw',
                         perm=[0, 3, 1, 2]),
        helper.make_node('MaxPool', [f'{n}_nchw'], [f'{n}_pooled'], name=n,
                         kernel_shape=kernel[1:3], strides=strides[1:3],
                         dilations=dilations[1:3], pads=[pads[1], pads[2], pads[5], pads[6]]),
        helper.make_node('Transpose', [f'{n}_pooled'], [f'{n}_out'], name=f'{n}_to_nhwc',
                         perm=[0, 2, 3, 1]),
        helper.make_node('Unsqueeze', [f'{n}_out', axes.name], [node.output[0]],
                         name=f'{n}_unsqueeze'),
    ]
    count += 1
  del graph.node[:]
  graph.node.extend(nodes)
  return count


def _floor_divisions(model) -> int:
  """Makes jax2onnx's size arithmetic floor like ``jax.export``'s: each Div of a symbolic
  size's ``floordiv`` becomes ``Div(a - Mod(a, b), b)``, exact for either sign (an integer Mod
  takes the divisor's sign, as Python's ``%``). Returns the count."""
  from onnx import helper
  nodes, count = [], 0
  for node in model.graph.node:
    if node.op_type != 'Div' or not node.output[0].startswith(_SIZE_DIV):
      nodes.append(node)
      continue
    a, b = node.input
    n = f'{node.output[0]}_floor'
    nodes += [helper.make_node('Mod', [a, b], [f'{n}_mod'], name=f'{n}_mod'),
              helper.make_node('Sub', [a, f'{n}_mod'], [f'{n}_exact'], name=f'{n}_sub'),
              helper.make_node('Div', [f'{n}_exact', b], list(node.output), name=n)]
    count += 1
  del model.graph.node[:]
  model.graph.node.extend(nodes)
  return count


def to_onnx(fn, num_classes: int, path: str | os.PathLike, *, opset: int = 23) -> str:
  """Converts ``fn(images: uint8[b, h, w, 3]) -> {'labels', 'probs'}`` to an ONNX file at
  ``path`` with symbolic b, h, w; returns the path. Checked with ``onnx.checker``."""
  jax2onnx, onnx = _import_converter()
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape('b, h, w, 3'), jnp.uint8)
  out = jax.eval_shape(fn, spec)
  if not isinstance(out, dict) or sorted(out) != list(OUTPUT_NAMES):
    raise ValueError(f'the serving function must return a dict with keys {OUTPUT_NAMES}, '
                     f'got {jax.tree.structure(out)}')
  b, h, w = spec.shape[:3]
  if tuple(out['labels'].shape) != (b, h, w) or tuple(out['probs'].shape) != (b, h, w,
                                                                              num_classes):
    raise ValueError(f"expected labels (b, h, w) and probs (b, h, w, {num_classes}), got "
                     f"{out['labels'].shape} and {out['probs'].shape}")
  # a dict's leaves come out in sorted key order, as OUTPUT_NAMES lists them
  model = jax2onnx.to_onnx(fn, [spec], model_name='refinenet_jax', opset=opset,
                           input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES))
  _pool_2d(model)
  _floor_divisions(model)
  del model.graph.value_info[:]
  onnx.helper.set_model_props(model, {'num_classes': str(num_classes)})
  onnx.checker.check_model(model, full_check=True)
  path = os.fspath(path)
  onnx.save_model(model, path)
  return path
