"""fcn_resnet50 on voc2012 (train_aug): torchvision's references/segmentation recipe
(recipes.torchvision_recipe)."""
from configs.recipes import torchvision_recipe


def get_config():
  return torchvision_recipe('fcn_resnet50')
