"""One process of the multi-process test: 3 train steps of a tiny RefineNet on a fixed global batch.

  python tests/distributed_worker.py OUT.npz PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES

Every process feeds only its rows of the global batch (``make_array_from_process_local_data``);
process 0 writes the final parameters. Run as a subprocess by tests/test_distributed.py.
"""
import sys

out, pid, nproc, port, local = sys.argv[1], *map(int, sys.argv[2:6])

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', local)
if nproc > 1:
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=nproc,
                             process_id=pid, initialization_timeout=60)

import functools  # noqa: E402

import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from configs.default import get_config  # noqa: E402
from refinenet_jax import optim, sharding, steps, train  # noqa: E402
from refinenet_jax.data import synthetic  # noqa: E402


def main():
  c = get_config()
  c.model_overrides.base_width = 8
  c.model_overrides.path_widths = (16, 8, 8, 8)
  c.model_overrides.head_dropout = 0.5  # exercise the dropout rng too
  c.num_steps, c.warmup_steps = 10, 2
  model = train.build_model(c)
  mesh = sharding.make_mesh()
  assert mesh.size == nproc * local, mesh
  init = functools.partial(train.create_train_state, model=model, tx=optim.make_optimizer(c),
                           input_shape=(1, 32, 32, 3))
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_sh = sharding.state_shardings(abstract, mesh)
  state = jax.jit(init, out_shardings=state_sh)(jax.random.key(0))
  step = jax.jit(functools.partial(steps.train_step, model=model),
                 in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  images, labels = synthetic.make_synthetic_scenes(24, (32, 32), seed=1)
  rows = 8 // nproc
  losses = []
  for i in range(3):
    sl = slice(8 * i + pid * rows, 8 * i + (pid + 1) * rows)  # this process's rows
    batch = sharding.put_batch({'image': images[sl], 'label': labels[sl]}, mesh)
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  if pid == 0:
    flat = traverse_util.flatten_dict(jax.device_get(
        {'params': state.params, 'batch_stats': state.batch_stats}), sep='/')
    np.savez(out, losses=np.array(losses), **flat)
  print('losses', losses, flush=True)


if __name__ == '__main__':
  main()
