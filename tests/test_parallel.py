"""Data parallel, FSDP and pmap give the one-device result; shards really split.

The layouts need 8 devices, which XLA only simulates when told before jax
starts, so the runs happen in a fresh process (tests/parallel_check.py).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxfer.train import parallel

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from tests import stand_ins

    bert = stand_ins.tiny_bert(str(tmp_path_factory.mktemp("bert")), num_layers=2)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "parallel_check.py"), bert],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("layout", ["data", "fsdp", "pmap"])
def test_layout_matches_single_device(result, layout):
    r = result[layout]
    assert r["max_param_diff"] < 1e-5, r
    assert r["loss_diff"] < 1e-5, r
    assert r["frozen_equal"]


def test_fsdp_really_splits_params_and_adam_moments(result):
    r = result["fsdp"]
    assert "fsdp" in r["hidden_kernel_spec"]  # (256, 128) kernel split over 4 devices
    assert np.prod(r["hidden_kernel_shard_shape"]) * 4 == np.prod(r["hidden_kernel_shape"])
    assert r["adam_moment_specs"] and all("fsdp" in s for s in r["adam_moment_specs"])
    assert "fsdp" not in r["bias_spec"]  # small leaves stay replicated


def test_pretrained_weights_load_straight_into_fsdp_shards(result):
    r = result["load"]
    assert "fsdp" in r["embedding_spec"]  # (30522, 16): 30522 is not a multiple of 4, so the hidden dimension is split
    assert np.prod(r["embedding_shard_shape"]) * 4 == np.prod(r["embedding_shape"])
    assert r["all_equal"]  # same values as a plain load


def test_batch_that_does_not_divide_is_a_clear_error(result):
    assert "global batch size 12 does not divide over the 8 devices" in result["bad_batch_error"]


def test_mesh_errors_name_the_problem():
    n = jax.device_count()
    with pytest.raises(ValueError, match="at most one mesh axis"):
        parallel.make_mesh(-1, -1)
    with pytest.raises(ValueError, match="does not divide"):
        parallel.make_mesh(n + 1, 1)


def test_sharding_rule_matching_nothing_is_an_error():
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    params = {"dense": {"kernel": np.zeros((4, 4))}}
    with pytest.raises(ValueError, match="encoder"):
        parallel.param_specs(params, mesh, [("encoder/**", "fsdp"), ("**", "replicate")])
