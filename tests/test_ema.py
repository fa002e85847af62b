"""Exponential moving average of the parameters: the update rule, once per optimizer update,
and what inference uses. (1 vs 8 devices and FSDP: tests/test_distributed.py; checkpointed,
resumed, evaluated and exported: the end-to-end test in tests/test_train_smoke.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import get_config
from refinenet_jax import optim, steps


def _config(decay, accum=1, warmup=False):
  c = get_config()
  c.ema_decay, c.grad_accum_steps, c.ema_warmup = decay, accum, warmup
  return c


def test_off_by_default():
  assert get_config().ema_decay == 0 and optim.ema_from_config(get_config()) is None


@pytest.mark.parametrize('accum,warmup', [(1, False), (1, True), (3, False), (2, True)])
def test_update_rule_against_a_loop(accum, warmup):
  update = jax.jit(optim.ema_from_config(_config(0.9, accum, warmup)))
  rng = np.random.default_rng(0)
  ema = {'w': np.float32(rng.normal(size=3))}
  want = ema['w'].astype(np.float64)
  params = ema
  for step in range(1, 13):  # micro-steps; the params change only at optimizer updates
    if step % accum == 0:
      params = {'w': np.float32(rng.normal(size=3))}
      n = step // accum
      d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
      want = d * want + (1 - d) * params['w']
    ema = update(ema, params, jnp.int32(step))
    np.testing.assert_allclose(ema['w'], want, rtol=1e-6, atol=1e-6)
  assert ema['w'].dtype == np.float32


def test_inference_uses_the_average_when_the_state_keeps_one():
  p, e, bs = {'w': jnp.ones(2)}, {'w': jnp.zeros(2)}, {'m': jnp.ones(1)}
  state = steps.TrainState(step=0, apply_fn=None, params=p, tx=None, opt_state=None,
                           batch_stats=bs, rng=None)
  assert steps.variables_of(state) == {'params': p, 'batch_stats': bs}
  assert jax.tree.leaves(state.replace(ema_params=None)) == jax.tree.leaves(state)
  assert steps.variables_of(state.replace(ema_params=e))['params'] is e
