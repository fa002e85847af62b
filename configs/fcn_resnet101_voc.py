"""fcn_resnet101 on voc2012 (train_aug): the torchvision recipe of configs/fcn_resnet50_voc.py."""
from configs.fcn_resnet50_voc import torchvision_recipe


def get_config():
  return torchvision_recipe('fcn_resnet101')
