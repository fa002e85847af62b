"""Converts a PyTorch checkpoint into an orbax checkpoint for a registered model.

  python -m refinenet_jax.convert --model=refinenet_r101 --num_classes=21 \
      --layout=drsleep --checkpoint=refinenet101_voc.pth --output=/tmp/rf101_voc

Layouts: ``drsleep`` (RefineNet / LW-RefineNet), ``torchvision_resnet`` (ImageNet ResNet/ResNeXt
encoder; the decoder is initialised from ``--seed``), ``wkentaro_fcn`` (FCN-32s/16s/8s),
``wkentaro_vgg16`` / ``torchvision_vgg16`` (FCN trunk), ``torchvision_fcn`` (FCN-ResNet50/101). Import is strict: any missing, unexpected or
mis-shaped tensor aborts. Without ``--layout`` the file must be one the weight manifest recognises
by its published hash (convert/manifest.py), which then gives the layout.
"""
import argparse
import json
import sys

import jax

from refinenet_jax import console
from refinenet_jax.convert import LAYOUTS, import_state_dict
from refinenet_jax.convert.orbax_io import check_new_output, save_converted
from refinenet_jax.convert.pretrained import check_fits, resolve
from refinenet_jax.models import create_model, list_models


def main(argv=None):
  p = argparse.ArgumentParser(prog='python -m refinenet_jax.convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', required=True, choices=list_models(), metavar='NAME')
  p.add_argument('--num_classes', type=int, required=True)
  p.add_argument('--layout', default='', choices=['', *sorted(LAYOUTS)],
                 help="'' (default): from the weight manifest, for a file it recognises")
  p.add_argument('--checkpoint', required=True, help='.pth/.pt file written by torch.save')
  p.add_argument('--output', required=True,
                 help='new directory for the orbax checkpoint (must not exist)')
  p.add_argument('--overrides', default='{}', help='JSON dict of model field overrides')
  p.add_argument('--seed', type=int, default=0, help='decoder init seed (encoder-only layouts)')
  a = p.parse_args(argv)
  overrides = json.loads(a.overrides)
  try:  # before any conversion work, which can take minutes for a large model
    check_new_output(a.output)
    entry, layout = resolve(a.checkpoint, a.layout)
    model = create_model(a.model, a.num_classes, **overrides)
    check_fits(a.checkpoint, entry, layout, a.model, a.num_classes, model.normalization)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    p.error(str(e))
  variables = import_state_dict(model, a.checkpoint, layout, rng=jax.random.key(a.seed))
  out = save_converted(a.output, variables, model_name=a.model, num_classes=a.num_classes,
                       overrides=overrides, source=f'{entry.key if entry else layout}:'
                       f'{a.checkpoint}')
  n = sum(x.size for x in jax.tree.leaves(variables['params']))
  print(f'wrote {out} ({a.model}, {a.num_classes} classes, {n:,} parameters, '
        f'input normalisation {model.normalization!r})')
  return 0


if __name__ == '__main__':
  console.quiet_libraries()  # orbax's INFO lines
  sys.exit(main())
