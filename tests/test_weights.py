"""Loading formats, strict merge errors and reinit, and surgery, on tiny BERTs."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jaxfer.weights as jw  # noqa: E402
from jaxfer import tree  # noqa: E402
from jaxfer.models import heads  # noqa: E402
from jaxfer.weights import readers, surgery  # noqa: E402

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)


def same(a, b):
    fa, fb = tree.flatten(a), tree.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.fixture(scope="module")
def torch_base(tmp_path_factory):
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, torch_base):
    path = tmp_path_factory.mktemp("base")
    torch_base.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(base_dir):
    return jw.load(base_dir)


@pytest.fixture(scope="module")
def imagenet_like_dir(tmp_path_factory):
    torch.manual_seed(2)
    m = transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=1000)).eval()
    path = tmp_path_factory.mktemp("cls1000")
    m.save_pretrained(path)
    return path


def test_head_mismatch_is_one_error_naming_both_shapes(imagenet_like_dir):
    with pytest.raises(jw.LoadError) as e:
        jw.load(imagenet_like_dir, head=heads.Classifier(3))
    msg = str(e.value)
    assert "classifier/kernel: (32, 1000) vs (32, 3)" in msg
    assert "classifier/bias: (1000,) vs (3,)" in msg
    assert len(e.value.mismatched) == 2 and not e.value.missing and not e.value.unexpected


def test_reinit_replaces_head_and_reports(imagenet_like_dir, base):
    model = jw.load(imagenet_like_dir, head=heads.Classifier(3), reinit=["classifier/**"])
    assert set(model.report.reinitialized) == {"classifier/kernel", "classifier/bias"}
    assert "(32, 1000) -> (32, 3)" in model.report.reinitialized["classifier/kernel"]
    assert model.params["classifier"]["kernel"].shape == (32, 3)
    assert "classifier/kernel" in str(model.report)
    ids = np.arange(12).reshape(2, 6) % 99
    assert model.apply(None, ids, attention_mask=np.ones_like(ids))["logits"].shape == (2, 3)


def test_reinit_pattern_matching_nothing_is_an_error(base_dir):
    with pytest.raises(tree.NoMatchError, match="reinit pattern 'clasifier/\\*\\*'"):
        jw.load(base_dir, head=heads.Classifier(3), reinit=["clasifier/**"])


def test_backbone_from_task_checkpoint_drops_head(imagenet_like_dir):
    model = jw.load(imagenet_like_dir)
    assert set(model.report.dropped) == {"classifier/kernel", "classifier/bias"}
    assert "classifier" not in model.params and "pooler" in model.params


def test_new_head_on_base_checkpoint_is_initialised(base_dir, base):
    model = jw.load(base_dir, head=heads.Classifier(5, pooling="mean"))
    assert sorted(model.report.initialized) == ["classifier/bias", "classifier/kernel"]
    same(model.params["bert"], base.params)


def test_missing_and_unexpected_keys_listed_together(tmp_path, base_dir):
    from safetensors.numpy import load_file, save_file

    shutil.copy(base_dir / "config.json", tmp_path / "config.json")
    sd = load_file(base_dir / "model.safetensors")
    del sd["encoder.layer.1.output.dense.bias"]
    sd["encoder.layer.1.extra.weight"] = np.zeros((3, 3), np.float32)
    sd["surprise"] = np.zeros(2, np.float32)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(jw.LoadError) as e:
        jw.load(tmp_path)
    assert e.value.missing == ["encoder/layer/1/output/dense/bias"]
    assert set(e.value.unexpected) == {"encoder/layer/1/extra/kernel", "surprise"}
    model = jw.load(tmp_path, reinit=["encoder/layer/1/output/dense/bias"], ignore=["surprise", "**/extra/*"])
    assert set(model.report.dropped) == {"surprise", "encoder/layer/1/extra/kernel"}


def test_pytorch_bin_and_sharded_safetensors_match(tmp_path, torch_base, base):
    bin_dir, shard_dir = tmp_path / "bin", tmp_path / "shards"
    # transformers 5 always writes safetensors; write the legacy .bin as v4's save_pretrained did
    torch_base.save_pretrained(bin_dir)
    (bin_dir / "model.safetensors").unlink()
    torch.save(torch_base.state_dict(), bin_dir / "pytorch_model.bin")
    torch_base.save_pretrained(shard_dir, max_shard_size="20KB")
    assert (bin_dir / "pytorch_model.bin").exists()
    assert (shard_dir / "model.safetensors.index.json").exists()
    from_bin, from_shards = jw.load(bin_dir), jw.load(shard_dir)
    assert from_bin.report.format == "pytorch"
    assert from_shards.report.format == "safetensors" and len(from_shards.report.files) > 1
    same(from_bin.params, base.params)
    same(from_shards.params, base.params)


def test_flax_msgpack_round_trip(tmp_path, base_dir, base):
    from flax import serialization

    shutil.copy(base_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.to_bytes(base.params))
    again = jw.load(tmp_path)
    assert again.report.format == "msgpack" and again.report.converted == 0
    same(again.params, base.params)


def test_npz_and_orbax_round_trip(tmp_path, base_dir, base):
    import orbax.checkpoint as ocp

    shutil.copy(base_dir / "config.json", tmp_path / "config.json")
    jw.write_npz(tmp_path / "model.npz", base.variables)
    same(jw.load(tmp_path).params, base.params)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((tmp_path / "orbax").absolute(), base.variables)
    ckpt.wait_until_finished()
    from_orbax = jw.load(tmp_path, weights=tmp_path / "orbax")
    assert from_orbax.report.format == "orbax"
    same(from_orbax.params, base.params)


def test_dtype_cast_is_reported(base_dir):
    model = jw.load(base_dir, dtype=jnp.bfloat16)
    assert model.params["pooler"]["dense"]["kernel"].dtype == jnp.bfloat16
    assert model.report.cast["pooler/dense/kernel"] == "float32->bfloat16"


def test_corrupt_safetensors_names_the_file(tmp_path, base_dir):
    shutil.copy(base_dir / "config.json", tmp_path / "config.json")
    data = (base_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(jw.WeightsError, match="model.safetensors.*corrupt or truncated"):
        jw.load(tmp_path)


def test_offline_hub_id_not_cached_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        jw.sources.resolve("nobody-here/no-such-model")


# ------------------------------------------------------------------ surgery
def vit_like(grid=4, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"vit": {"embeddings": {
        "position_embeddings": jnp.asarray(rng.normal(size=(1, 1 + grid * grid, d)), jnp.float32),
        "patch_embeddings": {"projection": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, d)), jnp.float32)}},
    }}}


def test_resize_position_embeddings_keeps_cls_and_shape():
    p = vit_like()
    path = "vit/embeddings/position_embeddings"
    new, rec = surgery.resize_position_embeddings(p, path, 6)
    pe, old = surgery.get(new, path), surgery.get(p, path)
    assert pe.shape == (1, 1 + 36, 8) and rec.after == (1, 37, 8)
    np.testing.assert_array_equal(pe[:, 0], old[:, 0])
    assert "4x4 -> 6x6" in str(rec)
    assert surgery.get(p, path).shape == (1, 17, 8)  # input untouched
    same_grid, rec = surgery.resize_position_embeddings(p, path, (4, 4))
    np.testing.assert_array_equal(surgery.get(same_grid, path), old)
    # a constant grid stays constant under interpolation
    const = surgery.set_leaf(p, path, jnp.ones((1, 17, 8)))
    np.testing.assert_allclose(surgery.get(surgery.resize_position_embeddings(const, path, 7)[0], path), 1.0,
                               atol=1e-5)


def test_adapt_input_channels():
    p = vit_like()
    path = "vit/embeddings/patch_embeddings/projection/kernel"
    k = np.asarray(surgery.get(p, path))
    grey, rec = surgery.adapt_input_channels(p, path, 1)
    np.testing.assert_allclose(surgery.get(grey, path), k.sum(axis=2, keepdims=True), rtol=1e-6)
    assert rec.after == (3, 3, 1, 8)
    # a grey image through the summed kernel == the same image as RGB through the original
    x = np.random.default_rng(1).normal(size=(3, 3))
    np.testing.assert_allclose(np.einsum("hw,hwio->o", x, surgery.get(grey, path)),
                               np.einsum("hwc,hwco->o", np.stack([x] * 3, -1), k), rtol=1e-5)
    six, _ = surgery.adapt_input_channels(p, path, 6)
    np.testing.assert_allclose(surgery.get(six, path)[:, :, 4], k[:, :, 1] * 0.5, rtol=1e-6)
    with pytest.raises(tree.NoMatchError):
        surgery.adapt_input_channels(p, "vit/embeddings/nope/kernel", 1)


def test_reset_head():
    p = {"classifier": {"kernel": jnp.ones((8, 1000)), "bias": jnp.ones((1000,))}}
    new, rec = surgery.reset_head(p, "classifier", 3)
    assert new["classifier"]["kernel"].shape == (8, 3) and not np.any(new["classifier"]["bias"])
    assert rec.before == (8, 1000) and p["classifier"]["kernel"].shape == (8, 1000)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/ABS/outside.safetensors",
                                  "sub/../../outside.safetensors", "..\\outside.safetensors",
                                  "C:\\outside.safetensors"])
def test_shard_index_cannot_name_a_file_outside_its_folder(tmp_path, name):
    from safetensors.numpy import save_file

    outside = tmp_path / "outside.safetensors"
    save_file({"secret": np.ones(2, np.float32)}, str(outside))  # a valid file: it would load
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    name = name.replace("/ABS/", str(tmp_path) + "/")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"secret": name}}))
    with pytest.raises(jw.WeightsError, match="outside the checkpoint folder"):
        readers.read(folder)
