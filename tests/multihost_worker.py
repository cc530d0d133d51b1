"""One process of the multi-host test (tests/test_multihost.py).

Usage: multihost_worker.py OUT_NPZ LOCAL_DEVICES [jaxfer train arguments...]

Sets the number of simulated CPU devices, runs ``jaxfer train`` (which calls
``jax.distributed.initialize`` when given --coordinator/--num_processes/
--process_id), then writes the final parameters, gathered from every process,
to OUT_NPZ (process 0 only).
"""

import os
import sys

out_path, local_devices, *train_args = sys.argv[1:]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxfer import cli, experiment, tree  # noqa: E402

captured = {}
_train = experiment.train


def train_and_keep(cfg, workdir, **kw):
    captured["result"] = _train(cfg, workdir, **kw)
    return captured["result"]


experiment.train = train_and_keep
_fit = experiment.loop.fit


def fit_and_keep(*args, **kw):
    state, history = _fit(*args, **kw)
    captured["state"] = state
    return state, history


experiment.loop.fit = fit_and_keep
cli.main(["train", *train_args])

params = multihost_utils.process_allgather(captured["state"].params, tiled=True)
if jax.process_index() == 0:
    np.savez(out_path, **{k: np.asarray(v) for k, v in tree.flatten(params).items()},
             __processes__=np.asarray(jax.process_count()), __devices__=np.asarray(jax.device_count()))
