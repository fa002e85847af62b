"""refinenet_jax: RefineNet, FCN and ExFuse semantic segmentation in JAX/Flax."""
from refinenet_jax.models import MODELS, create_model, list_models
from refinenet_jax.models.preprocessing import NORMALIZATIONS, normalize_images

__version__ = '0.1.0'
__all__ = ['MODELS', 'create_model', 'list_models', 'normalize_images', 'NORMALIZATIONS']
