"""ExFuse's ablation ladder as configs: GCN baseline, +LR, +SS, +SEB, +ECRE, +DAP (cumulative).

Paper Table 3 (VOC 2012 val mIoU, SS added before LR there): GCN 76.0, +SS 77.5, +LR 78.3,
+SEB 79.0, +DAP 79.6, +ECRE 80.0. The dataset and rung come from the command line:
``--config=configs/exfuse_ladder.py:camvid,seb`` (datasets voc, camvid; default voc,dap).

Model: 'gcn_resnext101' plus the rung's switches (the last rung has every component of
'exfuse_resnext101').
Training: ExFuse's hyper-parameters are unknown (no official code exists and the paper's running
text was not readable), so this is the library's standard SGD + poly recipe (configs/recipes.py)
at ExFuse's 512x512 crop (VOC; whole 360x480 images on CamVid), evaluated single-scale as an
ablation.
Weights: rung 'gcn' starts from ImageNet ResNeXt-101 32x4d weights in torchvision layout
(e.g. timm's) converted with ``python -m refinenet_jax.convert --layout=torchvision_resnet``
into ``init_checkpoint``. From 'lr' on the encoder needs its own ImageNet pre-training (the
rearranged layout, then SS branches: refinenet_jax/pretrain.py); none is published.
Auxiliary weights (unverified in the paper): 0.1 per SS head (four heads, 0.4 in total, the
PSPNet deep-supervision weight) and 0.5 for ECRE (torchvision's FCN aux weight), in the order
of the model's ``aux_names``.
"""
import ml_collections

from configs.recipes import paper_recipe
from refinenet_jax.models.backbones import RESNEXT_LR_STAGES

RUNGS = ('gcn', 'lr', 'ss', 'seb', 'ecre', 'dap')
# what each rung switches on, on top of the previous ones
RUNG_OVERRIDES = {
    'gcn': {},
    'lr': {'stage_sizes': RESNEXT_LR_STAGES},
    'ss': {'ss_stages': (0, 1, 2, 3)},
    'seb': {'seb': True},
    'ecre': {'ecre': True},
    'dap': {'dap': True},
}
SS_WEIGHT = 0.1
ECRE_WEIGHT = 0.5
# dataset, num_classes, builder config, crop, steps
DATASETS = {
    'voc': ('voc2012', 21, 'aug', (512, 512), 40000),
    'camvid': ('camvid', 11, '', (360, 480), 10000),
}


def get_config(spec: str = 'voc,dap'):
  """``spec``: 'DATASET,RUNG', e.g. 'camvid,seb'."""
  dataset, _, rung = spec.partition(',')
  if dataset not in DATASETS or rung not in RUNGS:
    raise ValueError(f'unknown ladder entry {spec!r}: give DATASET,RUNG with a dataset of '
                     f'{sorted(DATASETS)} and a rung of {RUNGS}')
  name, num_classes, builder_config, crop, steps = DATASETS[dataset]
  c = paper_recipe('gcn_resnext101', name, num_classes, crop=crop, num_steps=steps,
                   dataset_config=builder_config)
  overrides = {'freeze_encoder_bn': True}  # as the library recipe
  for r in RUNGS[:RUNGS.index(rung) + 1]:
    overrides.update(RUNG_OVERRIDES[r])
  c.model_overrides = ml_collections.ConfigDict(overrides)
  c.aux_weights = ((SS_WEIGHT,) * len(overrides.get('ss_stages', ())) +
                   ((ECRE_WEIGHT,) if overrides.get('ecre') else ()))
  c.eval_scales = (1.0,)
  return c
