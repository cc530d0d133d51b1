"""Batches cut to a length bucket carry cached rows cut the same way: same outputs as full width."""

import jax
import numpy as np

from jaxfer import data
from jaxfer.data.text import TOKEN_KEYS
from jaxfer.train import linen_apply
from jaxfer.transfer import batches, features, prefix

from test_transfer_features import tiny_task_model, token_source


def test_cut_batches_give_the_same_outputs_and_cached_rows():
    model, params = tiny_task_model(pooling="mean", dropout=0.0)
    src = token_source(32)
    full = next(iter(data.pipeline(src, global_batch_size=32, train=False)))
    tiny = {k: v for k, v in full.items()}
    apply_fn = jax.jit(lambda b: linen_apply(model)({"params": params}, b, train=False)[0]["logits"])
    cut = {k: v[:, :5] if k in TOKEN_KEYS else v for k, v in tiny.items()}
    keep = full["attention_mask"].sum(1) <= 5  # these examples lose only padding
    np.testing.assert_allclose(apply_fn(cut)[keep], apply_fn(tiny)[keep], atol=2e-6)

    # rows filled from cut batches are the full-width rows at the real positions, zeros after
    fn = prefix.boundary_fn(model, "bert/encoder/layer/1")
    ref = features.extract(lambda v, b: fn(v, b), {"params": params}, [full])
    lazy = batches.OnDemand(lambda v, b: fn(v, b), {"params": params}, src.columns["id"], row_shape=(8, 16))
    wrapped = batches.with_features([{**cut, "id": full["id"], "mask": full["mask"]}], lazy, key="b",
                                     length_key="attention_mask")
    rows = next(iter(wrapped))["b"]
    assert rows.shape == (32, 5, 16)
    real = full["attention_mask"][:, :5] > 0
    np.testing.assert_allclose(rows[real & keep[:, None]], ref.take(full["id"])[:, :5][real & keep[:, None]],
                               atol=2e-6)
    assert lazy.filled == 32 and np.all(lazy.take(full["id"])[:, 5:] == 0)
