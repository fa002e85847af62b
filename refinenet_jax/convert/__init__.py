"""Weight import/export: torch-free ``.pth`` I/O, strict layout mapping, orbax output."""
from refinenet_jax.convert.refinenet_torch import (LAYOUTS, CheckpointMismatchError,
                                                  export_state_dict, import_state_dict,
                                                  unwrap_state_dict)
from refinenet_jax.convert.torch_io import (CheckpointFormatError, load_torch_checkpoint,
                                           save_torch_state_dict)
from refinenet_jax.convert.orbax_io import load_converted, save_converted

__all__ = ['LAYOUTS', 'CheckpointMismatchError', 'CheckpointFormatError', 'export_state_dict',
           'import_state_dict', 'unwrap_state_dict', 'load_torch_checkpoint',
           'save_torch_state_dict', 'load_converted', 'save_converted']
