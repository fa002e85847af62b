"""ADE20K as the MIT SceneParsing benchmark (ADEChallengeData2016), 150 classes.

Data: `ADEChallengeData2016.zip` from http://sceneparsing.csail.mit.edu (also
http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip). Masks store 0 = other
(void) and 1..150 = classes; stored here as 255 and 0..149.
"""
from __future__ import annotations

import os


from refinenet_jax.data.builders import base

# objectInfo150 order (first name of each entry), as in the benchmark's devkit.
CLASS_NAMES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass',
    'cabinet', 'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain',
    'chair', 'car', 'water', 'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field',
    'armchair', 'seat', 'fence', 'desk', 'rock', 'wardrobe', 'lamp', 'bathtub', 'railing',
    'cushion', 'base', 'box', 'column', 'signboard', 'chest_of_drawers', 'counter', 'sand', 'sink',
    'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path', 'stairs', 'runway', 'case',
    'pool_table', 'pillow', 'screen_door', 'stairway', 'river', 'bridge', 'bookcase', 'blind',
    'coffee_table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen_island', 'computer', 'swivel_chair', 'boat', 'bar', 'arcade_machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth',
    'television_receiver', 'airplane', 'dirt_track', 'apparel', 'pole', 'land', 'bannister',
    'escalator', 'ottoman', 'bottle', 'buffet', 'poster', 'stage', 'van', 'ship', 'fountain',
    'conveyer_belt', 'canopy', 'washer', 'plaything', 'swimming_pool', 'stool', 'barrel', 'basket',
    'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade_name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen',
    'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic_light', 'tray', 'ashcan', 'fan',
    'pier', 'crt_screen', 'plate', 'monitor', 'bulletin_board', 'shower', 'radiator', 'glass',
    'clock', 'flag')
assert len(CLASS_NAMES) == 150 and len(set(CLASS_NAMES)) == 150

FOLDER = 'ADEChallengeData2016'
SPLIT_DIRS = {'train': 'training', 'val': 'validation'}


class Ade20k(base.SegmentationBuilder, skip_registration=True):
  """ADE20K SceneParsing (Zhou et al. 2017): train 20210 and val 2000 images, 150 classes."""
  name = 'ade20k'
  CLASS_NAMES = CLASS_NAMES
  SPLITS = ('train', 'val')
  HOMEPAGE = 'http://sceneparsing.csail.mit.edu'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download `ADEChallengeData2016.zip` (http://sceneparsing.csail.mit.edu, direct link
  http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip) and unzip it into
  manual_dir, giving ADEChallengeData2016/images/{training,validation}/ADE_*.jpg and
  ADEChallengeData2016/annotations/{training,validation}/ADE_*.png (manual_dir may also be the
  ADEChallengeData2016 folder itself). Mask value 0 (other) becomes 255, k becomes k-1.
  """

  def _map_label(self, raw, path):
    return base.shift_zero_void(raw, len(self.class_names), path)

  def _examples(self, root):
    if os.path.isdir(os.path.join(root, FOLDER)):
      root = os.path.join(root, FOLDER)
    elif not os.path.isdir(os.path.join(root, 'images')):
      raise base.DatasetError(f'missing directory: {os.path.join(root, FOLDER)} (manual_dir must '
                              f'contain {FOLDER}/ or be it)')
    splits = {}
    for split, folder in SPLIT_DIRS.items():
      image_dir = base.require_dir(os.path.join(root, 'images', folder), f'{split} image dir')
      mask_dir = base.require_dir(os.path.join(root, 'annotations', folder), f'{split} mask dir')
      examples = base.glob_pairs(image_dir, 'ADE_*.jpg', mask_dir)
      splits[split] = examples
    return splits
