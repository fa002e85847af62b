"""The training recipes as functions; the per-dataset config files call them.

These recipes are declared and resolved by the tests, not yet trained to the published numbers.
"""
import ml_collections

from configs import default

OFFICIAL_EVAL_SCALES = (0.4, 0.6, 0.8, 1.0, 1.2)
VOC_MAX_SIDE = 500
VOC_TRAIN_AUG_IMAGES = 10582


def paper_recipe(model: str, dataset: str, num_classes: int, *, crop=(400, 400),
                 num_steps: int = 40000, dataset_config: str = '', lw: bool = False):
  """The released RefineNet training recipe.

  What transfers from the official MatConvNet code (guosheng/refinenet): crop 400 (Cityscapes 600)
  enlarged ×1.2 inside the network, random scale 0.7-1.3, flip, frozen encoder BatchNorm
  statistics, encoder learning rate ×0.1, decoder N(0, 0.01), labels at 1/4 resolution,
  multi-scale evaluation at 0.4-1.2. What does not: batch 1 with a manually dropped constant
  learning rate; these configs use batch 16 with SGD + poly decay, as the PyTorch ports and every
  JAX codebase do. The encoder starts from ImageNet weights converted once with
  ``python -m refinenet_jax.convert --layout=torchvision_resnet ...`` (``init_checkpoint``).
  """
  c = default.get_config()
  c.model = model
  c.model_overrides = ml_collections.ConfigDict({
      'freeze_encoder_bn': True,
      'input_scales': (1.0,) if lw else (1.2,),  # LW feeds the crop as is
      'normalization': 'imagenet',
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


def fcn_recipe(model: str, *, learning_rate: float, num_steps: int = 100_000,
               loss_reduction: str = 'sum', batch_size: int = 1, momentum: float = 0.99):
  """The released "heavy" FCN recipe (shelhamer/fcn.berkeleyvision.org) on VOC 2012.

  As there: batch 1 whole images, SGD momentum 0.99, fixed learning rate on the loss *summed*
  over pixels (``loss_reduction='sum'``, Caffe ``normalize: false``), 1e-10 / 1e-12 / 1e-14 for
  32s / 16s / 8s, weight decay 5e-4 on kernels only, 100k iterations, no mirroring or scaling,
  score convs zero-initialised, upsampling fixed bilinear, Caffe BGR input. Staged: FCN-32s
  starts from VGG16 (convert ``vgg16_from_caffe.pth`` with ``refinenet_jax.convert.fcn_torch``,
  layout 'wkentaro_vgg16', into an fcn32s checkpoint), FCN-16s from the FCN-32s weights and
  FCN-8s from the FCN-16s ones: ``init_checkpoint`` naming a coarser FCN's converted checkpoint
  upgrades it (``refinenet_jax.models.fcn.upgrade_variables``: new skips start at zero).
  Differences: data is VOC 2012 train_aug (10,582) / val (1,449), not SBD train (8,498) /
  seg11valid (736); images are padded to 500x500 (mean colour, ignored labels) so batches have
  one shape, where Caffe reshapes per image; Caffe's 2x bias learning rate has no equivalent (one
  learning rate per encoder/decoder group). Reference: 63.6 / 65.0 / 65.5 mIoU on seg11valid.
  """
  c = default.get_config()
  c.model = model
  c.model_overrides = ml_collections.ConfigDict({})  # caffe_bgr input, element-wise dropout 0.5
  c.num_classes = 21
  c.dataset, c.dataset_config = 'voc2012', 'aug'
  c.train_split, c.eval_split = 'train_aug', 'val'
  c.crop_size = (VOC_MAX_SIDE, VOC_MAX_SIDE)  # every VOC image whole
  c.scale_range = (1.0, 1.0)
  c.flip = False
  c.batch_size = batch_size
  c.num_steps = num_steps
  c.learning_rate = learning_rate
  c.warmup_steps = 0
  c.poly_power = 0.0  # lr_policy "fixed"
  c.momentum = momentum
  c.weight_decay = 5e-4
  c.encoder_lr_mult = 1.0
  c.loss_mode = 'upsample'  # logits are at the input size already: no resizing happens
  c.loss_reduction = loss_reduction
  c.eval_batch_size = 8
  c.eval_every = 4000
  c.checkpoint_every = 4000
  c.log_every = 100
  c.data_threads = 8
  if batch_size == 1:
    c.mesh = (('data', 1),)  # "online" learning: one image, one device
  return c


def torchvision_recipe(model: str):
  """torchvision's references/segmentation recipe on VOC 2012 train_aug.

  As there: SGD lr 0.02, momentum 0.9, weight decay 1e-4, batch 32 (8 GPUs x 4), poly 0.9 per
  step with no warm-up, 30 epochs, loss = CE(out) + 0.5 CE(aux) on logits at the input size,
  crop 480, horizontal flip, BatchNorm trained (statistics over the global batch, like SyncBN).
  The encoder starts from torchvision's ImageNet ResNet (``--layout=torchvision_resnet`` into
  ``init_checkpoint``). Differences: torchvision resizes the short side to 260-1040 px (0.5-2x
  its base 520), which is 0.7-2.8x a typical 375 px VOC short side, so that is the relative
  range here; its aux head trains at 10x the learning rate, not expressible by the optimizer's
  encoder/decoder split (the whole model trains at 1x); weight decay skips biases and norm
  parameters; evaluation is on the original images, not resized to 520.
  """
  c = default.get_config()
  c.model = model
  c.model_overrides = ml_collections.ConfigDict({'aux_head': True})
  c.num_classes = 21
  c.dataset, c.dataset_config = 'voc2012', 'aug'
  c.train_split, c.eval_split = 'train_aug', 'val'
  c.crop_size = (480, 480)
  c.scale_range = (0.7, 2.8)
  c.batch_size = 32
  c.num_steps = 30 * VOC_TRAIN_AUG_IMAGES // 32
  c.learning_rate = 0.02
  c.warmup_steps = 0
  c.momentum = 0.9
  c.weight_decay = 1e-4
  c.loss_mode = 'upsample'
  c.aux_weights = (0.5,)
  c.compute_dtype = 'bfloat16'
  c.eval_batch_size = 8
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.log_every = 50
  c.data_threads = 8
  return c
