"""One process of the multi-process test: 3 train steps of a tiny RefineNet on a fixed global batch.

  python tests/distributed_worker.py OUT.npz PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES

Every process feeds only its rows of the global batch (``make_array_from_process_local_data``);
process 0 writes the losses and the final parameters and BatchNorm statistics. Run as a
subprocess by tests/test_distributed.py, which also imports :func:`train_steps` to compute the
one-process reference in its own process (and :func:`run_steps` for its one-process comparisons).
"""
import os
import sys

import jax

GLOBAL_BATCH = 8
STEPS = 3
# Only catches a coordinator that never comes up; on a loaded machine the other process may take
# minutes to import and reach initialize().
INIT_TIMEOUT_S = 1800


def run_steps(mesh, process_id: int = 0, num_processes: int = 1, rules: str = 'replicated'):
  """(state, losses) after STEPS steps of the trainer's own jitted step on ``mesh``, the state
  laid out by the sharding ``rules``.

  Imports the library here, not at module level: a worker must configure and initialize JAX
  first.
  """
  from configs.default import get_config
  from refinenet_jax import optim, sharding, train
  from refinenet_jax.data import synthetic

  c = get_config()
  c.model_overrides.base_width = 8
  c.model_overrides.path_widths = (16, 8, 8, 8)
  c.model_overrides.head_dropout = 0.5  # exercise the dropout rng too
  c.num_steps, c.warmup_steps = 10, 2
  c.sharding_rules = rules
  c.ema_decay = 0.5  # the moving average is state too (laid out by the rules, like params)
  model = train.build_model(c)
  state = sharding.create_train_state(jax.random.key(0), model=model,
                                      tx=optim.make_optimizer(c), input_shape=(1, 32, 32, 3),
                                      mesh=mesh, rules=c.sharding_rules, ema=True)
  step = train.make_train_step(c, model, mesh, sharding.shardings_of(state))
  images, labels = synthetic.make_synthetic_scenes(GLOBAL_BATCH * STEPS, (32, 32), seed=1)
  rows = GLOBAL_BATCH // num_processes
  batches = []
  for i in range(STEPS):
    start = GLOBAL_BATCH * i + process_id * rows  # this process's rows
    sl = slice(start, start + rows)
    batches.append(sharding.put_batch({'image': images[sl], 'label': labels[sl]}, mesh))
  # Compile first, then wait for every process: the CPU collectives (gloo) give a process only
  # 30 s to join the first all-reduce, less than one compile takes on a loaded machine.
  step = step.lower(state, batches[0]).compile()
  _barrier('compiled')
  losses = []
  for batch in batches:
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  return state, losses


def train_steps(mesh, process_id: int = 0, num_processes: int = 1) -> dict:
  """{'losses', 'params/...', 'batch_stats/...'} after :func:`run_steps`, as numpy arrays."""
  import numpy as np
  from flax import traverse_util

  state, losses = run_steps(mesh, process_id, num_processes)
  flat = traverse_util.flatten_dict(jax.device_get(
      {'params': state.params, 'batch_stats': state.batch_stats}), sep='/')
  return {'losses': np.array(losses), **{k: np.asarray(v) for k, v in flat.items()}}


def _barrier(name: str) -> None:
  """All processes reach ``name`` (the coordination service's barrier: no device collective,
  and a hang guard instead of gloo's 30 s)."""
  if jax.process_count() > 1:
    from jax._src import distributed
    distributed.global_state.client.wait_at_barrier(name, INIT_TIMEOUT_S * 1000)


def main(argv):
  out, pid, nproc, port, local = argv[1], *map(int, argv[2:6])
  jax.config.update('jax_num_cpu_devices', local)
  if nproc > 1:
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=nproc,
                               process_id=pid, initialization_timeout=INIT_TIMEOUT_S)
  import numpy as np

  from refinenet_jax import sharding

  mesh = sharding.make_mesh()
  assert mesh.size == nproc * local, mesh
  result = train_steps(mesh, pid, nproc)
  if pid == 0:
    np.savez(out + '.tmp.npz', **result)
    os.replace(out + '.tmp.npz', out)
  print('losses', result['losses'].tolist(), flush=True)


if __name__ == '__main__':
  main(sys.argv)
