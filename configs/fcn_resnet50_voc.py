"""fcn_resnet50 on voc2012 (train_aug): torchvision's references/segmentation recipe.

As there: SGD lr 0.02, momentum 0.9, weight decay 1e-4, batch 32 (8 GPUs x 4), poly 0.9 per
step with no warm-up, 30 epochs, loss = CE(out) + 0.5 CE(aux) on logits at the input size, crop
480, horizontal flip, BatchNorm trained (statistics over the global batch, like SyncBN). The
encoder starts from torchvision's ImageNet ResNet (``--layout=torchvision_resnet`` into
``init_checkpoint``). Differences: torchvision resizes the short side to 260-1040 px (0.5-2x its
base 520), which is 0.7-2.8x a typical 375 px VOC short side, so that is the relative range here;
its aux head trains at 10x the learning rate, not expressible by the optimizer's
encoder/decoder split (the whole model trains at 1x); weight decay skips biases and norm
parameters; evaluation is on the original images, not resized to 520. Declared and resolved by
the tests, not yet trained to a published number.
"""
import ml_collections

from configs import default

TRAIN_AUG_IMAGES = 10582


def torchvision_recipe(model: str):
  c = default.get_config()
  c.model = model
  c.model_overrides = ml_collections.ConfigDict({'aux_head': True})
  c.num_classes = 21
  c.dataset, c.dataset_config = 'voc2012', 'aug'
  c.train_split, c.eval_split = 'train_aug', 'val'
  c.crop_size = (480, 480)
  c.scale_range = (0.7, 2.8)
  c.batch_size = 32
  c.num_steps = 30 * TRAIN_AUG_IMAGES // 32
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


def get_config():
  return torchvision_recipe('fcn_resnet50')
