"""Property-based fuzzing: weight readers, shard indexes, CSV/JSONL readers, config overrides.

Whatever bytes or text come in, the readers either return or raise one of our own error
types (:class:`~jaxfer.errors.JaxferError`) -- never another exception, never a hang
(each input runs under a watchdog), and a shard index never makes a reader open a file
outside its folder.

``JAXFER_FUZZ_EXAMPLES`` sets the inputs per target (default 60, so the suite stays
fast); ``benchmarks/fuzz.py`` runs the same targets with many more and reports the counts
(``JAXFER_FUZZ_REPORT`` names the JSON file each target adds its count to).
"""

import contextlib
import io
import json
import os
import signal
import tempfile
import threading
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jaxfer import config as config_lib
from jaxfer import data
from jaxfer.errors import ConfigError, DataError, JaxferError, WeightsError
from jaxfer.weights import readers

EXAMPLES = int(os.environ.get("JAXFER_FUZZ_EXAMPLES", "60"))
HANG_SECONDS = 20
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    path = os.environ.get("JAXFER_FUZZ_REPORT")
    if path:
        old = json.load(open(path)) if os.path.exists(path) else {}
        for k, v in COUNTS.items():
            old[k] = old.get(k, 0) + v
        with open(path, "w") as f:
            json.dump(old, f, indent=1)


class Hang(Exception):
    pass


@contextlib.contextmanager
def watchdog(target: str):
    """Count one input of ``target``; fail it as a hang after HANG_SECONDS."""
    COUNTS[target] = COUNTS.get(target, 0) + 1
    main = threading.current_thread() is threading.main_thread()
    if main:
        def on_alarm(*_):
            raise Hang(f"{target}: no answer after {HANG_SECONDS} s")
        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        if main:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


def only_ours(fn, *args, allowed=JaxferError, **kwargs):
    """``fn(*args)`` returns or raises ``allowed``; anything else fails the property."""
    try:
        return fn(*args, **kwargs)
    except allowed:
        return None


# ------------------------------------------------------------ valid seeds
def _safetensors_bytes() -> bytes:
    from safetensors.numpy import save

    return save({"embeddings.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
                 "encoder.bias": np.ones(4, np.float16), "count": np.array([7], np.int64)})


def _torch_bytes() -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}, buffer)
    return buffer.getvalue()


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{"params/dense/kernel": np.ones((2, 3), np.float32), "params/dense/bias": np.zeros(3)})
    return buffer.getvalue()


def _msgpack_bytes() -> bytes:
    from flax import serialization

    return serialization.msgpack_serialize({"params": {"dense": {"kernel": np.ones((2, 3), np.float32)}}})


SEEDS = {"safetensors": (".safetensors", _safetensors_bytes), "pytorch": (".bin", _torch_bytes),
         "npz": (".npz", _npz_bytes), "msgpack": (".msgpack", _msgpack_bytes)}


def mutated(seed: bytes):
    """Bytes near a valid file: truncated, bytes overwritten, inserted or deleted."""
    def apply(edits):
        b = bytearray(seed)
        for kind, pos, value in edits:
            if not b:
                break
            pos %= len(b)
            if kind == "set":
                b[pos] = value
            elif kind == "insert":
                b[pos:pos] = bytes([value]) * (value % 7 + 1)
            elif kind == "delete":
                del b[pos:pos + value % 9 + 1]
            else:
                del b[pos:]
        return bytes(b)

    edit = st.tuples(st.sampled_from(["set", "insert", "delete", "truncate"]),
                     st.integers(0, 2**16), st.integers(0, 255))
    return st.lists(edit, min_size=1, max_size=6).map(apply)


def weights_input(fmt: str):
    seed = SEEDS[fmt][1]()
    return st.one_of(st.binary(max_size=2048), mutated(seed))


def write(folder: str, name: str, payload: bytes) -> str:
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(payload)
    return path


@pytest.mark.parametrize("fmt", list(SEEDS))
def test_weight_readers_return_or_raise_weights_error(fmt):
    suffix = SEEDS[fmt][0]

    @FUZZ
    @given(payload=weights_input(fmt))
    def check(payload):
        with tempfile.TemporaryDirectory() as d, watchdog(f"weights/{fmt}"):
            ckpt = only_ours(readers.read, write(d, "model" + suffix, payload), allowed=WeightsError)
            if ckpt is not None:  # what a reader returns is numeric arrays by name
                flat = ckpt.state_dict if ckpt.state_dict is not None else \
                    {f"{c}/{p}": v for c, vs in ckpt.variables.items() for p, v in vs.items()}
                assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in flat.items())

    check()


def test_safetensors_headers_with_any_json():
    """A well-framed file whose JSON header says anything (dtypes, shapes, offsets)."""
    entry = st.fixed_dictionaries({}, optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X9", ""]),
        "shape": st.lists(st.integers(-2, 2**40), max_size=4),
        "data_offsets": st.lists(st.integers(-5, 2**40), max_size=3)})
    header = st.dictionaries(st.text(max_size=8), st.one_of(entry, st.integers(), st.text(max_size=4)),
                             max_size=4)

    @FUZZ
    @given(header=header, body=st.binary(max_size=64))
    def check(header, body):
        raw = json.dumps(header).encode()
        payload = len(raw).to_bytes(8, "little") + raw + body
        with tempfile.TemporaryDirectory() as d, watchdog("weights/safetensors-header"):
            only_ours(readers.read, write(d, "model.safetensors", payload), allowed=WeightsError)

    check()


def test_msgpack_trees_of_any_shape():
    """Valid msgpack holding any nesting of maps, lists, scalars and (bogus) ndarray exts."""
    import msgpack

    leaf = st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(), st.text(max_size=6), st.binary(max_size=8),
                     st.none(), st.booleans(),
                     st.builds(lambda code, b: msgpack.ExtType(code, b), st.integers(0, 127),
                               st.binary(max_size=32)))
    trees = st.recursive(leaf, lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-2**63, 2**63 - 1)),
                                                    kids, max_size=3)), max_leaves=12)

    @FUZZ
    @given(obj=trees)
    @example(obj={"": None, 0: None})  # found by this test: a non-string key crashed the reader
    def check(obj):
        payload = msgpack.packb(obj, use_bin_type=True, strict_types=False)
        with tempfile.TemporaryDirectory() as d, watchdog("weights/msgpack-tree"):
            only_ours(readers.read, write(d, "flax_model.msgpack", payload), allowed=WeightsError)

    check()


def test_shard_indexes_never_reach_outside_their_folder():
    """Any index JSON; shard names drawn to escape. A valid safetensors file sits outside
    the folder; reading must never return its tensor."""
    outside_key = "secret.weight"
    escape = st.sampled_from(["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors",
                              "..\\outside.safetensors", "C:\\outside.safetensors", "./../outside.safetensors",
                              "shard.safetensors", "", ".", "sub"])
    names = st.one_of(escape, st.text(max_size=12))
    weight_map = st.dictionaries(st.text(max_size=6), st.one_of(names, st.integers(), st.none()), max_size=4)
    index = st.one_of(st.fixed_dictionaries({"weight_map": weight_map}),
                      st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=5)),
                                   lambda k: st.one_of(st.lists(k, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), k, max_size=3)),
                                   max_leaves=8))

    @FUZZ
    @given(obj=index)
    def check(obj):
        from safetensors.numpy import save_file

        with tempfile.TemporaryDirectory() as root, watchdog("weights/shard-index"):
            folder = os.path.join(root, "model")
            os.makedirs(os.path.join(folder, "sub"))
            save_file({outside_key: np.ones(2, np.float32)}, os.path.join(root, "outside.safetensors"))
            save_file({"inside.weight": np.ones(2, np.float32)}, os.path.join(folder, "shard.safetensors"))
            write(folder, "model.safetensors.index.json", json.dumps(obj).encode())
            ckpt = only_ours(readers.read, folder, allowed=WeightsError)
            if ckpt is not None:
                assert outside_key not in ckpt.state_dict
                assert all(os.path.commonpath([os.path.abspath(f), folder]) == folder for f in ckpt.files)

    check()


# ------------------------------------------------------------ text tables
def test_csv_reader_returns_or_raises_data_error():
    cell = st.one_of(st.text(max_size=20), st.sampled_from(["", "NaN", "null", '"', '""', "a,b", "\n", "\r\n", "\0"]))
    rows = st.lists(st.lists(cell, max_size=4), max_size=8)

    @FUZZ
    @given(header=st.lists(st.sampled_from(["text", "label", "x", ""]), max_size=4), rows=rows,
           raw=st.one_of(st.none(), st.binary(max_size=300)))
    def check(header, rows, raw):
        text = raw if raw is not None else "\n".join(",".join(r) for r in [header, *rows]).encode("utf-8", "replace")
        with tempfile.TemporaryDirectory() as d, watchdog("data/csv"):
            src = only_ours(data.read_csv, write(d, "d.csv", text), allowed=DataError)
            if src is not None:
                assert len(src) == len(src.columns["label"]) > 0
                assert all(str(t).strip() for t in src.columns["text"])

    check()


def test_jsonl_reader_returns_or_raises_data_error():
    value = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
                         lambda k: st.one_of(st.lists(k, max_size=3), st.dictionaries(st.text(max_size=5), k, max_size=3)),
                         max_leaves=6)
    record = st.one_of(value, st.fixed_dictionaries({"text": value, "label": value}))
    line = st.one_of(record.map(json.dumps), st.text(max_size=30), st.just("{\"text\": \"a\", lab"))

    @FUZZ
    @given(lines=st.lists(line, max_size=8), task=st.sampled_from(["classification", "regression"]))
    def check(lines, task):
        with tempfile.TemporaryDirectory() as d, watchdog("data/jsonl"):
            path = write(d, "d.jsonl", "\n".join(lines).encode("utf-8", "surrogatepass"))
            src = only_ours(data.read_jsonl, path, task=task, allowed=DataError)
            if src is not None and task == "regression":
                assert np.all(np.isfinite(src.columns["label"]))

    check()


# --------------------------------------------------------- config overrides
RECIPE = '''
import ml_collections
def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.task = "classification"
    c.rules = (("classifier/**", 1.0), ("**", None))
    c.optim = ml_collections.ConfigDict(dict(lr=1e-3, name="adamw", clip_norm=None, betas=(0.9, 0.999)))
    c.train = ml_collections.ConfigDict(dict(steps=10, strict_resume=False))
    c.data = ml_collections.ConfigDict(dict(label_names=("a", "b"), batch_size=8))
    return c
'''


def test_config_overrides_parse_or_raise_config_error(tmp_path):
    path = tmp_path / "recipe.py"
    path.write_text(RECIPE)
    keys = st.one_of(st.sampled_from(["seed", "task", "rules", "optim.lr", "optim.name", "optim.clip_norm",
                                      "optim.betas", "train.steps", "train.strict_resume", "data.label_names",
                                      "data.batch_size", "optim", "optim.lr.x", "nope", "train."]),
                     st.text(max_size=12))
    values = st.one_of(st.text(max_size=30), st.sampled_from(
        ["1", "-5", "1e999", "nan", "True", "none", "None", "()", "((1,2),)", "[1, 2]", "'x'", "{}",
         "(" * 200, "__import__('os')", "1+1", "0x10", "b'x'"]))

    @FUZZ
    @given(overrides=st.lists(st.tuples(keys, values), max_size=4))
    def check(overrides):
        with watchdog("config/overrides"):
            cfg = only_ours(config_lib.load_with_overrides, str(path), overrides, allowed=ConfigError)
            if cfg is not None:
                for key, _ in overrides:
                    node = cfg
                    for part in key.split("."):
                        node = node[part]  # every override landed on an existing key

    check()


def test_override_arguments_split_or_raise_config_error():
    @FUZZ
    @given(argv=st.lists(st.one_of(st.text(max_size=15), st.sampled_from(["--config.a", "--config.a=1", "--config.",
                                                                          "--config.=", "--workdir"])), max_size=6))
    def check(argv):
        with watchdog("config/argv"):
            only_ours(config_lib.split_overrides, argv, allowed=ConfigError)

    check()
