"""Default config: a small RefineNet on the built-in synthetic scenes, sized for 2 CPU cores.

Every key any config may set is declared here (configs derive from this one and override), and
the command line can override any of them: ``--config.num_steps=100``. Unknown keys fail.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  # model
  c.model = 'refinenet_tiny'  # a name in refinenet_jax.list_models()
  # refinenet_tiny's own widths; no tap dropout on a model this small.
  c.model_overrides = ml_collections.ConfigDict({'tap_dropout': 0.0, 'head_dropout': 0.1})
  c.num_classes = 5
  c.compute_dtype = 'float32'  # or 'bfloat16' (parameters stay float32)
  c.init_checkpoint = ''  # converted weights, a run's workdir or a .pth file, when no resume
  c.init_checkpoint_layout = ''  # of a .pth init_checkpoint; '' = from the weight manifest

  # data
  c.dataset = 'synthetic_scenes'  # a name in refinenet_jax.data.datasets.BUILDERS
  c.dataset_config = ''  # builder config, e.g. 'aug' for voc2012 (VOC + SBD train_aug)
  c.data_dir = ''  # '' = ~/tensorflow_datasets
  c.manual_dir = ''  # extracted archives, for the real datasets (not needed once built)
  c.train_split = 'train'
  c.eval_split = 'val'
  # synthetic_scenes only: what to generate. 96 px: at 64 px even a perfect predictor at the
  # models' 1/4 output resolution scores only 0.858 mIoU (experiments/colour_rule_baseline.py)
  c.image_size = 96
  c.num_train = 6000
  c.num_val = 500
  c.data_seed = 0  # also seeds shuffling and augmentation
  # input pipeline
  c.crop_size = ()  # () = (image_size, image_size)
  c.scale_range = (1.0, 1.0)
  c.flip = True
  c.eval_size = ()  # () = smallest multiple of 32 holding every eval image
  c.data_threads = 2

  # optimisation (steps count optimizer updates x grad_accum_steps micro-batches)
  c.batch_size = 32  # global, over all devices and processes
  c.num_steps = 1500
  c.optimizer = 'sgd'  # or 'adamw'
  c.learning_rate = 0.05
  c.warmup_steps = 100
  c.poly_power = 0.9
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 5e-4
  c.encoder_lr_mult = 1.0  # 0.1 in the official recipe (pretrained encoder)
  c.grad_clip_norm = 0.0  # 0 = off
  c.grad_accum_steps = 1
  c.ema_decay = 0.0  # > 0 (e.g. 0.999): evaluate and export a moving average of the params
  c.ema_warmup = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
  # loss
  # a losses.LOSSES name ('cross_entropy', 'focal', 'dice', 'lovasz', 'ohem') or a weighted sum
  # of them, e.g. 'cross_entropy+0.5*dice'
  c.loss = 'cross_entropy'
  c.loss_mode = 'quarter'  # 'quarter' (official: labels at 1/4) or 'upsample' (PyTorch ports)
  c.class_weights = ()
  c.aux_weights = ()
  c.loss_reduction = 'mean'  # or 'sum' over labelled pixels (Caffe normalize=False, FCN heavy)
  c.focal_gamma = 2.0  # 'focal': (1 - p_true)^gamma * CE (Lin et al.); 0 = cross-entropy
  # 'ohem': CE over the labelled pixels whose true-class probability is below ohem_thresh, and at
  # least the ohem_min_kept hardest per image, counted at the loss's resolution. mmseg's common
  # setting (0.7, 100000) is ~19% of a 512x1024 label; the same share with loss_mode='quarter'
  # is 1/16 of it (a min_kept above the pixels per image keeps them all: plain CE)
  c.ohem_thresh = 0.7
  c.ohem_min_kept = 100000

  # evaluation
  c.eval_batch_size = 64
  c.eval_every = 0  # steps; 0 = only at the end
  c.eval_scales = (1.0,)  # the official multi-scale test: (0.4, 0.6, 0.8, 1.0, 1.2)
  c.eval_flip = False
  c.eval_window = ()  # sliding window for images larger than the crop; () = whole image (crop
  # windows when the default eval bucket exceeds train.EVAL_PIXELS_PER_DEVICE)
  c.eval_stride = ()  # () = 2/3 of the window

  # run
  c.seed = 0
  c.mesh = (('data', -1),)  # (axis name, size) pairs; -1 = the rest (all devices, all processes)
  c.sharding_rules = 'replicated'  # a sharding.RULE_SETS name: 'replicated' or 'fsdp'
  c.log_every = 100
  c.checkpoint_every = 500
  c.keep_checkpoints = 2  # latest N; the best by val mIoU is kept as well
  c.tensorboard = True
  return c
