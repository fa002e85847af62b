"""The released RefineNet training recipe as a function; the per-dataset configs call it.

What transfers from the official MatConvNet code (guosheng/refinenet): crop 400 (Cityscapes 600)
enlarged ×1.2 inside the network, random scale 0.7-1.3, flip, frozen encoder BatchNorm
statistics, encoder learning rate ×0.1, decoder N(0, 0.01), labels at 1/4 resolution, multi-scale
evaluation at 0.4-1.2. What does not: batch 1 with a manually dropped constant learning rate;
these configs use batch 16 with SGD + poly decay, as the PyTorch ports and every JAX codebase do.
The encoder starts from ImageNet weights converted once with
``python -m refinenet_jax.convert --layout=torchvision_resnet ...`` (``init_checkpoint``).
These recipes are declared and resolved by the tests, not yet trained to the published numbers.
"""
import ml_collections

from configs import default

OFFICIAL_EVAL_SCALES = (0.4, 0.6, 0.8, 1.0, 1.2)


def paper_recipe(model: str, dataset: str, num_classes: int, *, crop=(400, 400),
                 num_steps: int = 40000, normalization: str = 'imagenet',
                 dataset_config: str = '', lw: bool = False):
  c = default.get_config()
  c.model = model
  c.model_overrides = ml_collections.ConfigDict({
      'freeze_encoder_bn': True,
      'input_scales': (1.0,) if lw else (1.2,),  # LW feeds the crop as is
      'normalization': normalization,
  })
  c.num_classes = num_classes
  c.dataset, c.dataset_config = dataset, dataset_config
  if dataset_config == 'aug':  # VOC + SBD: the builder's splits are train_aug / val
    c.train_split = 'train_aug'
  c.crop_size = crop
  c.scale_range = (0.7, 1.3)
  c.batch_size = 16
  c.num_steps = num_steps
  c.learning_rate = 0.01
  c.warmup_steps = 500
  c.weight_decay = 1e-4
  c.encoder_lr_mult = 0.1
  c.compute_dtype = 'bfloat16'
  c.eval_batch_size = 8
  c.eval_every = 5000
  c.eval_scales = OFFICIAL_EVAL_SCALES
  c.eval_window = crop
  c.checkpoint_every = 1000
  c.log_every = 50
  c.data_threads = 8
  return c
