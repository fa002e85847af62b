"""fcn32s on voc2012: the released "heavy" FCN recipe (shelhamer/fcn.berkeleyvision.org).

As there: batch 1 whole images, SGD momentum 0.99, fixed learning rate on the loss *summed* over
pixels (``loss_reduction='sum'``, Caffe ``normalize: false``), 1e-10 / 1e-12 / 1e-14 for
32s / 16s / 8s, weight decay 5e-4 on kernels only, 100k iterations, no mirroring or scaling,
score convs zero-initialised, upsampling fixed bilinear, Caffe BGR input. Staged: FCN-32s starts
from VGG16 (convert ``vgg16_from_caffe.pth`` with ``refinenet_jax.convert.fcn_torch``, layout
'wkentaro_vgg16', into an fcn32s checkpoint), FCN-16s from the FCN-32s weights and FCN-8s from the
FCN-16s ones: ``init_checkpoint`` naming a coarser FCN's converted checkpoint upgrades it
(``refinenet_jax.models.fcn.upgrade_variables``: new skips start at zero).
Differences: data is VOC 2012 train_aug (10,582) / val (1,449), not SBD train (8,498) /
seg11valid (736); images are padded to 500x500 (mean colour, ignored labels) so batches have one
shape, where Caffe reshapes per image; Caffe's 2x bias learning rate has no equivalent (one
learning rate per encoder/decoder group). Declared and resolved by the tests, not yet trained to
a published number (reference: 63.6 / 65.0 / 65.5 mIoU on seg11valid).
"""
import ml_collections

from configs import default

VOC_MAX_SIDE = 500


def fcn_recipe(model: str, *, learning_rate: float, num_steps: int = 100_000,
               loss_reduction: str = 'sum', batch_size: int = 1, momentum: float = 0.99):
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
    c.num_devices = 1  # "online" learning: one image, one device
  return c


def get_config():
  return fcn_recipe('fcn32s', learning_rate=1e-10)
