"""Default config: a small RefineNet on the built-in synthetic scenes, sized for 2 CPU cores."""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.model = 'refinenet_tiny'
  # refinenet_tiny's own widths; no tap dropout on a model this small.
  c.model_overrides = ml_collections.ConfigDict({'tap_dropout': 0.0, 'head_dropout': 0.1})
  c.dataset = 'synthetic_scenes'  # a name in refinenet_jax.data.datasets.BUILDERS
  c.data_dir = ''  # '' = ~/tensorflow_datasets
  c.manual_dir = ''  # extracted archives, for the real datasets (not needed once built)
  c.train_split = 'train'
  c.eval_split = 'val'
  c.num_classes = 5
  # synthetic_scenes only: what to generate
  c.image_size = 64
  c.num_train = 2000
  c.num_val = 500
  c.data_seed = 0  # also seeds shuffling and augmentation
  # input pipeline
  c.crop_size = ()  # () = (image_size, image_size)
  c.scale_range = (1.0, 1.0)
  c.flip = True
  c.eval_size = ()  # () = smallest multiple of 32 holding every eval image
  c.data_threads = 2
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_steps = 1500
  c.learning_rate = 0.05
  c.warmup_steps = 100
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.ignore_label = 255
  c.seed = 0
  c.log_every = 100
  return c
