import json

import numpy as np
import pytest

from jaxfer import data


def _source(n=103):
    return data.from_arrays({"id": np.arange(n), "x": np.arange(n, dtype=np.float32)[:, None] * 2})


def _take(it, k):
    return [next(it) for _ in range(k)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("k", [0, 3, 6, 7, 13])  # 6 steps/epoch: 6, 7, 13 cross epochs
def test_resume_yields_the_same_batches(k):
    it = data.TrainIterator(_source(), 16, seed=3)
    assert it.steps_per_epoch == 6
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    assert state["seed"] == 3 and state["epoch"] == k // 6 and state["index"] == k % 6
    expected = _take(it, 8)
    fresh = data.TrainIterator(_source(), 16, seed=3)
    fresh.set_state(state)
    _same(_take(fresh, 8), expected)


def test_resume_replays_augmentation_rngs():
    def noise(ex, rng):
        return {**ex, "x": ex["x"] + rng.normal(size=1).astype(np.float32)}

    def mix(batch, rng):
        return {**batch, "x": batch["x"] * rng.uniform()}

    make = lambda: data.TrainIterator(_source(40), 8, seed=1, map_fn=noise, batch_fn=mix)
    it = make()
    _take(it, 7)
    state = it.get_state()
    expected = _take(it, 4)
    fresh = make()
    fresh.set_state(state)
    _same(_take(fresh, 4), expected)


def test_train_epochs_shuffle_differently_and_cover_without_repeats():
    it = data.TrainIterator(_source(64), 16, seed=0)
    e0 = np.concatenate([b["id"] for b in _take(it, 4)])
    e1 = np.concatenate([b["id"] for b in _take(it, 4)])
    assert sorted(e0) == list(range(64)) and sorted(e1) == list(range(64))
    assert not np.array_equal(e0, e1)
    other_seed = np.concatenate([b["id"] for b in _take(data.TrainIterator(_source(64), 16, seed=1), 4)])
    assert not np.array_equal(e0, other_seed)


def test_train_batches_have_static_shape_and_mask_of_ones():
    it = data.TrainIterator(_source(), 16, num_epochs=2)
    batches = list(it)
    assert len(batches) == 12  # 103 // 16 per epoch, then it stops
    for b in batches:
        assert b["x"].shape == (16, 1)
        assert b["mask"].dtype == np.float32 and np.all(b["mask"] == 1.0)


def test_set_state_rejects_another_seed():
    it = data.TrainIterator(_source(), 16, seed=0)
    with pytest.raises(ValueError, match="seed"):
        it.set_state({"epoch": 0, "index": 1, "seed": 5})


@pytest.mark.parametrize("batch_size", [1, 7, 16, 103, 128])
def test_eval_counts_every_example_once(batch_size):
    ev = data.EvalBatches(_source(103), batch_size)
    for _ in range(2):  # a second pass is a full pass again
        batches = list(ev)
        assert len(batches) == len(ev) == -(-103 // batch_size)
        assert all(b["x"].shape == (batch_size, 1) for b in batches)
        mask = np.concatenate([b["mask"] for b in batches])
        ids = np.concatenate([b["id"] for b in batches])[mask == 1.0]
        assert mask.sum() == 103
        assert sorted(ids.tolist()) == list(range(103))


def test_eval_padding_is_masked_zeros():
    last = list(data.EvalBatches(_source(103), 16))[-1]
    assert last["mask"].tolist() == [1.0] * 7 + [0.0] * 9
    assert np.all(last["x"][7:] == 0)


@pytest.mark.parametrize("n,global_bs", [(103, 16), (10, 4), (5, 8)])
def test_multihost_shards_disjoint_covering_and_in_lockstep(n, global_bs):
    src = _source(n)
    evals = [data.pipeline(src, global_batch_size=global_bs, train=False,
                           process_index=p, process_count=2) for p in range(2)]
    assert len(evals[0]) == len(evals[1])  # same number of steps on both hosts
    seen = []
    for ev in evals:
        batches = list(ev)
        assert all(b["mask"].shape == (global_bs // 2,) for b in batches)
        seen.append({int(i) for b in batches for i, m in zip(b["id"], b["mask"]) if m})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(n))
    assert sum(len(s) for s in seen) == n

    if n >= global_bs:
        trains = [data.pipeline(src, global_batch_size=global_bs, train=True, seed=0,
                                process_index=p, process_count=2) for p in range(2)]
        assert trains[0].steps_per_epoch == trains[1].steps_per_epoch
        ids = [{int(i) for _ in range(t.steps_per_epoch) for i in next(t)["id"]} for t in trains]
        assert not ids[0] & ids[1]


@pytest.mark.parametrize("procs", [2, 4])
def test_multihost_train_batches_concatenate_to_the_single_process_ones(procs):
    """Global order: process slices of each step, concatenated in process order,
    are exactly the single-process batch (so results do not depend on host count)."""
    src = _source(50)
    single = data.pipeline(src, global_batch_size=8, train=True, seed=3)
    parts = [data.pipeline(src, global_batch_size=8, train=True, seed=3,
                           process_index=p, process_count=procs) for p in range(procs)]
    assert all(p.steps_per_epoch == single.steps_per_epoch for p in parts)
    for _ in range(single.steps_per_epoch + 2):  # into the second epoch
        want = next(single)
        got = [next(p) for p in parts]
        assert all(g["id"].shape == (8 // procs,) for g in got)
        np.testing.assert_array_equal(np.concatenate([g["id"] for g in got]), want["id"])


def test_global_batch_must_divide_by_process_count():
    with pytest.raises(ValueError, match="divisible"):
        data.pipeline(_source(), global_batch_size=15, train=True, process_index=0, process_count=2)


def test_prefetch_keeps_the_resume_contract():
    plain = data.TrainIterator(_source(), 16, seed=2)
    pre = data.Prefetch(data.TrainIterator(_source(), 16, seed=2), size=3)
    _same(_take(pre, 5), _take(plain, 5))
    assert pre.get_state() == plain.get_state() == {"epoch": 0, "index": 5, "seed": 2}
    pre.set_state({"epoch": 2, "index": 1, "seed": 2})
    plain.set_state({"epoch": 2, "index": 1, "seed": 2})
    _same(_take(pre, 7), _take(plain, 7))
    pre.close()


def test_prefetch_passes_on_errors():
    def boom(ex, rng):
        raise RuntimeError("bad example")

    pre = data.Prefetch(data.TrainIterator(_source(), 16, map_fn=boom))
    with pytest.raises(RuntimeError, match="bad example"):
        next(pre)


def test_split_indices_deterministic_disjoint_stratified():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    parts = data.split_indices(100, (0.8, 0.1, 0.1), seed=7, stratify=labels)
    again = data.split_indices(100, (0.8, 0.1, 0.1), seed=7, stratify=labels)
    for a, b in zip(parts, again):
        np.testing.assert_array_equal(a, b)
    assert [len(p) for p in parts] == [80, 10, 10]
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    for p, frac in zip(parts, (0.8, 0.1, 0.1)):  # each class in proportion
        np.testing.assert_array_equal(np.bincount(labels[p], minlength=3), np.array([50, 30, 20]) * frac)
    other = data.split_indices(100, (0.8, 0.1, 0.1), seed=8, stratify=labels)
    assert not np.array_equal(parts[1], other[1])
    with pytest.raises(ValueError, match="sum to 1"):
        data.split_indices(10, (0.5, 0.4))


def test_split_source_keeps_label_vocabulary():
    src = data.from_arrays({"x": np.arange(20), "label": ["b", "a"] * 10}, label="label")
    train, val = data.split_source(src, (0.5, 0.5), seed=0)
    assert train.label_names == val.label_names == ("a", "b")
    assert len(train) == len(val) == 10
    assert np.bincount(train.columns["label"]).tolist() == [5, 5]


def test_make_pipeline_multihost_eval_covers_and_train_is_resumable():
    src = _source(21)
    evals = [data.make_pipeline(src, global_batch_size=4, train=False, process_index=p,
                                process_count=2) for p in range(2)]
    assert len(evals[0]) == len(evals[1]) == 6  # ceil(ceil(21 / 2) / 2)
    ids = [int(i) for ev in evals for b in ev for i, m in zip(b["id"], b["mask"]) if m]
    assert sorted(ids) == list(range(21))
    trains = [data.make_pipeline(src, global_batch_size=4, train=True, seed=1, process_index=p,
                                 process_count=2, prefetch=2) for p in range(2)]
    assert trains[0].iterator.steps_per_epoch == trains[1].iterator.steps_per_epoch == 5
    _take(trains[0], 3)
    state = trains[0].get_state()
    expected = _take(trains[0], 4)
    fresh = data.make_pipeline(src, global_batch_size=4, train=True, seed=1, process_index=0,
                               process_count=2)
    fresh.set_state(state)
    _same(_take(fresh, 4), expected)


def test_make_source_by_kind(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    src = data.make_source("jsonl", path=tmp_path / "d.jsonl")
    assert src.label_names == ("x", "y") and len(src) == 2
    with pytest.raises(ValueError, match="unknown data.kind"):
        data.make_source("parquet", path="x")
