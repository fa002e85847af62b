"""fcn8s_atonce on voc2012 with a normalised loss and minibatches (CVPR 2015-style SGD).

Mean per-pixel loss, batch 16 (the CVPR paper's 20, rounded to split over 8 devices), fixed
lr 1e-4, momentum 0.9, weight decay 5e-4, from VGG16 in one stage (the at-once skip scaling),
bfloat16 compute. The remaining settings follow recipes.fcn_recipe. Steps: ~30 epochs of
train_aug. Declared and resolved by the tests, not trained here.
"""
from configs.recipes import VOC_TRAIN_AUG_IMAGES, fcn_recipe


def get_config():
  c = fcn_recipe('fcn8s_atonce', learning_rate=1e-4, num_steps=30 * VOC_TRAIN_AUG_IMAGES // 16,
                 loss_reduction='mean', batch_size=16, momentum=0.9)
  c.compute_dtype = 'bfloat16'
  c.eval_every = c.checkpoint_every = 1000
  c.log_every = 50
  return c
