"""sharding.py on conftest's 8 fake devices: meshes from ``config.mesh``, the rules that lay out
the train state, and ``create_train_state`` initialising straight into them. (FSDP training
against replicated training: tests/test_distributed.py.)"""
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from refinenet_jax import sharding, steps

S = jax.ShapeDtypeStruct


def test_make_mesh_axes_and_sizes():
  assert jax.device_count() == 8
  for axes in ((('data', -1),), -1):
    mesh = sharding.make_mesh(axes)
    assert mesh.axis_names == ('data',) and mesh.shape['data'] == 8
  assert sharding.make_mesh(4).devices.tolist() == jax.devices()[:4]  # an int: the first n
  mesh = sharding.make_mesh((('data', 2), ('model', 2)))
  assert mesh.axis_names == ('data', 'model') and dict(mesh.shape) == {'data': 2, 'model': 2}
  mesh = sharding.make_mesh((('model', 2), ('data', -1)))  # -1: the rest
  assert dict(mesh.shape) == {'model': 2, 'data': 4} and mesh.size == 8
  mesh = sharding.make_mesh((('data', -1),), jax.devices()[:2])  # given devices
  assert mesh.size == 2


@pytest.mark.parametrize('axes,message', [
    ((('model', 8),), "one 'data' axis"),
    ((('data', 2), ('data', 4)), 'distinct names'),
    ((('data', -1), ('model', -1)), 'at most one -1'),
    ((('data', 0),), 'sizes are positive'),
    ((('data', 16),), 'needs 16 devices; 8 are available'),
    ((('data', -1), ('model', 3)), '8 are available'),  # 8 devices do not split into 3s
])
def test_make_mesh_refuses_bad_axes(axes, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(axes)


def _abstract():
  return {'params': {'conv': {'kernel': S((3, 3, 8, 16), np.float32),
                              'bias': S((16,), np.float32)},
                     'odd': {'kernel': S((3, 5), np.float32)}},
          'opt_state': ({'mu': {'conv': {'kernel': S((3, 3, 8, 16), np.float32)}}},
                        S((), np.int32)),
          'batch_stats': {'mean': S((16,), np.float32)},
          'step': S((), np.int32)}


def _specs(rules, mesh):
  tree = sharding.state_shardings(_abstract(), mesh, rules)
  for s in jax.tree.leaves(tree):
    assert isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh
  return {sharding.leaf_path(path): s.spec
          for path, s in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_replicated_rules_replicate_everything():
  assert set(_specs('replicated', sharding.make_mesh(8)).values()) == {P()}


def test_fsdp_splits_the_largest_divisible_dimension_over_data():
  mesh = sharding.make_mesh((('data', 4), ('model', 2)))  # 'data' has 4 devices
  specs = _specs('fsdp', mesh)
  assert specs == {
      'params/conv/kernel': P(None, None, None, 'data'),  # 16 > 8, both divisible by 4
      'params/conv/bias': P('data'),
      'params/odd/kernel': P(),  # no dimension divisible by 4: replicated
      'opt_state/0/mu/conv/kernel': P(None, None, None, 'data'),
      'opt_state/1': P(),  # a scalar
      'batch_stats/mean': P(),  # no rule matches: replicated
      'step': P()}
  # one device on 'data': nothing to split
  assert set(_specs('fsdp', sharding.make_mesh(1)).values()) == {P()}


def test_custom_rules_first_match_wins_and_take_partition_specs():
  mesh = sharding.make_mesh((('data', 4), ('model', 2)))
  rules = ((r'conv/kernel$', (None, None, 'data', 'model')),  # a PartitionSpec tuple
           (r'^params/', 'replicate'),  # does not override the rule above
           (r'bias|mean', 'fsdp'))
  specs = _specs(rules, mesh)
  assert specs['params/conv/kernel'] == P(None, None, 'data', 'model')
  assert specs['opt_state/0/mu/conv/kernel'] == P(None, None, 'data', 'model')
  assert specs['params/conv/bias'] == P()  # 'replicate' matched first
  assert specs['batch_stats/mean'] == P('data')
  assert specs['params/odd/kernel'] == specs['step'] == P()


def test_unknown_rule_set_is_named():
  with pytest.raises(ValueError, match=r"unknown sharding_rules 'zero3'; known: \['fsdp', "
                                       r"'replicated'\]"):
    sharding.state_shardings(_abstract(), sharding.make_mesh(8), 'zero3')


def test_create_train_state_lands_in_the_abstract_shardings():
  kw = dict(model=nn.Dense(16), tx=optax.adam(1e-3), input_shape=(1, 8),
            mesh=sharding.make_mesh(8), rules='fsdp')
  abstract = sharding.abstract_train_state(jax.random.key(0), **kw)
  state = sharding.create_train_state(jax.random.key(0), **kw)
  assert (jax.tree.leaves(sharding.shardings_of(state))
          == jax.tree.leaves(sharding.shardings_of(abstract)))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == jax.tree.map(
      lambda a: (a.shape, a.dtype), abstract)
  assert state.params['kernel'].sharding.spec == P(None, 'data')
  assert state.params['bias'].addressable_shards[0].data.shape == (2,)  # 16 over 8 devices
  mu = state.opt_state[0].mu
  assert mu['kernel'].sharding.spec == P(None, 'data') and mu['bias'].sharding.spec == P('data')
  assert state.opt_state[0].count.sharding.is_fully_replicated
  # the same values as the unsharded initialiser
  plain = steps.init_train_state(jax.random.key(0), model=kw['model'], tx=kw['tx'],
                                 input_shape=kw['input_shape'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), plain)


@pytest.mark.slow
def test_fsdp_checkpoint_restores_replicated_on_another_device_count(tmp_path, capsys):
  from configs.tiny import get_config
  from refinenet_jax import train
  c = get_config()
  c.data_dir, c.tensorboard = str(tmp_path / 'data'), False
  c.num_steps, c.mesh, c.sharding_rules = 2, (('data', 4),), 'fsdp'
  workdir = str(tmp_path / 'run')
  out = train.train_and_evaluate(c, workdir)
  # the 4-device FSDP checkpoint, restored replicated onto 2 devices, scores the same
  c.mesh, c.sharding_rules = (('data', 2),), 'replicated'
  again = train.evaluate(c, workdir, checkpoint='latest')
  assert again['miou'] == pytest.approx(out['val']['miou'], abs=1e-9)
  # and training goes on from it
  c.num_steps = 3
  resumed = train.train_and_evaluate(c, workdir)
  assert 'resuming from step 2' in capsys.readouterr().out
  assert resumed['step'] == resumed['train_loss'][-1]['step'] == 3
