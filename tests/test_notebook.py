"""experiments/refinenet_jax_colab.ipynb runs headlessly, every cell, at test sizes, so it
cannot rot: any failing cell fails the test (nbclient raises CellExecutionError naming it)."""
import json
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parent.parent / 'experiments' / 'refinenet_jax_colab.ipynb'
# Injected after the notebook's own parameters cell, as papermill does.
TEST_PARAMETERS = """
MODEL = 'lw_refinenet_tiny'
IMAGE_SIZE = 32
BATCH_PER_DEVICE = 1
TRAIN_STEPS = 2
BENCH_ITERS = 1
BENCH_REPEATS = 1
"""


@pytest.mark.slow
def test_notebook_runs_every_cell(monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  (i,) = [k for k, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', [])]
  nb.cells.insert(i + 1, nbformat.v4.new_code_cell(
      TEST_PARAMETERS.strip(), metadata={'tags': ['injected-parameters']}))
  # The kernel inherits this environment: conftest's 8 fake devices and its compile cache;
  # few XLA optimisations (the cells' results are checked, not their speed).
  monkeypatch.setenv('JAX_DISABLE_MOST_OPTIMIZATIONS', 'true')
  NotebookClient(nb, timeout=600, kernel_name='python3',
                 resources={'metadata': {'path': str(NOTEBOOK.parent)}}).execute()

  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in c.outputs if o.output_type == 'stream')
  assert 'on 8 cpu device(s); global batch 8' in text
  assert '2 steps on 8 device(s)' in text
  data = [o.get('data', {}) for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert any('image/png' in d for d in data), 'the prediction figure was not drawn'
  tables = [d['text/markdown'] for d in data if 'text/markdown' in d]
  assert len(tables) == 1
  rows = [r for r in tables[0].splitlines() if r.startswith('| lw_refinenet_tiny |')]
  assert [r.split(' | ')[1] for r in rows] == ['inference', 'train']


def test_notebook_is_stored_without_outputs():
  # outputs would go stale and bloat diffs; Colab shows them when run
  nb = json.loads(NOTEBOOK.read_text())
  assert all(not c.get('outputs') and c.get('execution_count') is None
             for c in nb['cells'] if c['cell_type'] == 'code')
  assert os.path.getsize(NOTEBOOK) < 50_000
