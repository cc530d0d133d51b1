"""Serving export: the exported function, reloaded in a fresh process that never imports
jaxfer, gives the live model's outputs (within 1e-6) for batch sizes 1 and 7."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxfer as jf
from jaxfer import export, exported

from stand_ins import tiny_bert, tiny_resnet

TOL = 1e-6
FRESH_PROCESS = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import exported                       # the loader copied into the export folder
model = exported.load(sys.argv[1])
inputs = dict(np.load(sys.argv[2]))
out = {}
for n in (1, 7):
    for k, v in model(**{k: x[:n] for k, x in inputs.items()}).items():
        out[f"{k}_{n}"] = v
np.savez(sys.argv[3], **out)
print(json.dumps({"jaxfer_imported": any(m == "jaxfer" or m.startswith("jaxfer.") for m in sys.modules),
                  "labels": model.label_names}))
"""


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    model = jf.load(tiny_bert(str(tmp_path_factory.mktemp("bert"))),
                    head=jf.heads.Classifier(3, pooling="mean"), rng=1)
    texts = ["I love this", "awful day", "meeting at 3", "so happy", "terrible", "report", "great"]
    return model, jf.data.tokenize_texts(texts, model.tokenizer(), 16)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    model = jf.load(tiny_resnet(str(tmp_path_factory.mktemp("resnet"))),
                    head=jf.heads.Classifier(4, dense_name="1"), rng=1)
    x = np.random.default_rng(0).normal(size=(7, 3, 32, 32)).astype(np.float32)
    return model, {"pixel_values": x}


def _live(model, inputs, n):
    fn = jax.jit(export.inference_fn(jf.model_apply(model)))
    return {k: np.asarray(v) for k, v in
            fn(export.flat_variables(model.variables), {k: x[:n] for k, x in inputs.items()}).items()}


@pytest.mark.parametrize("name", ["bert", "resnet"])
def test_stablehlo_in_a_fresh_process_matches_the_live_model(name, request, tmp_path):
    model, inputs = request.getfixturevalue(name)
    labels = [f"c{i}" for i in range(model.module.head.num_classes)]
    folder = export.stablehlo(tmp_path / "export", jf.model_apply(model), model.variables,
                              {k: x[:2] for k, x in inputs.items()}, label_names=labels)
    np.savez(tmp_path / "inputs.npz", **inputs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, folder, str(tmp_path / "inputs.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"jaxfer_imported": False, "labels": labels}
    out = np.load(tmp_path / "out.npz")
    for n in (1, 7):
        live = _live(model, inputs, n)
        for k in ("logits", "probs"):
            got = out[f"{k}_{n}"]
            assert got.shape == live[k].shape == (n, len(labels))
            diff = float(np.abs(got - live[k]).max())
            print(f"{name} {k} batch {n}: max |exported - live| = {diff:.2e}")
            assert diff <= TOL


def test_the_loader_names_bad_inputs(bert, tmp_path):
    model, inputs = bert
    folder = export.stablehlo(tmp_path / "e", jf.model_apply(model), model.variables, inputs)
    loaded = exported.load(folder)
    assert loaded.input_names == ("input_ids", "attention_mask", "token_type_ids")
    with pytest.raises(ValueError, match="missing \\['token_type_ids'\\]"):
        loaded(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    with pytest.raises(ValueError, match="takes \\['batch', 16\\]"):
        loaded(**{k: x[:, :8] for k, x in inputs.items()})
    with pytest.raises(FileExistsError):
        export.stablehlo(folder, jf.model_apply(model), model.variables, inputs)
    sig = json.load(open(os.path.join(folder, "signature.json")))
    assert sig["inputs"]["input_ids"] == {"shape": [None, 16], "dtype": "int32"}


def test_bfloat16_variables_round_trip_as_bits():
    x = np.asarray(jax.numpy.arange(5, dtype=jax.numpy.bfloat16))
    stored = exported.stored_array(x)
    assert stored.dtype == np.uint16
    back = exported.restored_array(stored, "bfloat16")
    assert back.dtype == x.dtype and np.array_equal(back.view(np.uint16), x.view(np.uint16))


def test_onnx_export_matches_the_live_model(bert, tmp_path):
    pytest.importorskip("jax2onnx")
    ort = pytest.importorskip("onnxruntime")
    model, inputs = bert
    path = export.onnx(tmp_path / "model.onnx", jf.model_apply(model), model.variables, inputs)
    session = ort.InferenceSession(path)
    assert [i.name for i in session.get_inputs()] == list(inputs)
    assert [o.name for o in session.get_outputs()] == ["logits", "probs"]
    for n in (1, 7):
        live = _live(model, inputs, n)
        logits, probs = session.run(None, {k: x[:n] for k, x in inputs.items()})
        diff = max(float(np.abs(logits - live["logits"]).max()), float(np.abs(probs - live["probs"]).max()))
        print(f"onnx batch {n}: max |onnx - live| = {diff:.2e}")
        assert diff <= 1e-5


def test_saved_model_export_matches_the_live_model(bert, tmp_path):
    """Needs TensorFlow (pip install 'jaxfer[savedmodel]'); skipped where it is not installed."""
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("orbax.export")
    model, inputs = bert
    folder = export.saved_model(tmp_path / "sm", jf.model_apply(model), model.variables, inputs)
    serve = tf.saved_model.load(folder).signatures["serving_default"]
    for n in (1, 7):
        live = _live(model, inputs, n)
        out = serve(**{k: tf.constant(x[:n]) for k, x in inputs.items()})
        got = {k: v.numpy() for k, v in out.items()}
        diff = max(float(np.abs(got[k] - live[k]).max()) for k in ("logits", "probs"))
        print(f"SavedModel batch {n}: max |tf - live| = {diff:.2e}")
        assert diff <= 1e-5
