"""Test-only launcher: ``refinenet_jax.main``, held forever once a checkpoint of step >= N is saved.

  RJ_HOLD_MARKER=MARKER [RJ_HOLD_STEP=6] python tests/hold_after_save.py --workdir=... [flags]

When a ``Checkpoints.save`` call for a step >= RJ_HOLD_STEP returns (orbax's asynchronous write
may still be in flight), the step is written to MARKER (atomically) and the process sleeps
forever. tests/test_train_resume.py waits for MARKER and SIGKILLs it: a kill at a known point of
training however slow the machine, instead of polling checkpoint folders against a race with a
run that may finish first.
"""
import os
import time

from absl import app

from refinenet_jax import checkpoint, main

MARKER = os.environ['RJ_HOLD_MARKER']
HOLD_STEP = int(os.environ.get('RJ_HOLD_STEP', '6'))

_save = checkpoint.Checkpoints.save


def _save_then_hold(self, step, *args, **kwargs):
  _save(self, step, *args, **kwargs)
  if step >= HOLD_STEP:
    with open(MARKER + '.tmp', 'w') as f:
      f.write(str(step))
    os.replace(MARKER + '.tmp', MARKER)
    while True:  # until SIGKILL
      time.sleep(3600)


checkpoint.Checkpoints.save = _save_then_hold

if __name__ == '__main__':
  app.run(main.main)
