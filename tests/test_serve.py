"""The HTTP server on 127.0.0.1: 200 concurrent requests from a real HTTP client, batched,
all answered with the model's own predictions; bad requests get a 4xx and it keeps serving."""

import asyncio
import base64
import io
import socket
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

import jaxfer as jf  # noqa: E402
from jaxfer.inference import Predictor, Spec  # noqa: E402
from jaxfer.serve import make_app  # noqa: E402

from stand_ins import WORDS, tiny_bert, tiny_vit  # noqa: E402

LABELS = ("negative", "neutral", "positive")
MAX_BATCH = 16


class Server:
    """uvicorn in a thread on a free port of 127.0.0.1; stops on exit, whatever happened."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive(), "server did not stop"


@pytest.fixture(scope="module")
def text_predictor(tmp_path_factory):
    model = jf.load(tiny_bert(str(tmp_path_factory.mktemp("bert"))),
                    head=jf.heads.Classifier(3, pooling="mean"), rng=3)
    spec = Spec({"kind": "text", "max_length": 16, "text": "text"}, LABELS)
    return Predictor.from_model(model, model.variables, spec, tokenizer=model.tokenizer(),
                                batch_sizes=(MAX_BATCH,))  # one compiled program


def texts(n, seed=0):
    rng = np.random.default_rng(seed)
    words = [w for ws in WORDS.values() for w in ws]
    return [f"request {i}: " + " ".join(rng.choice(words, 3)) for i in range(n)]


async def _post_all(url, bodies, timeout=120.0):
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        return await asyncio.wait_for(asyncio.gather(*(client.post("/predict", json=b) for b in bodies)),
                                      timeout)


def test_200_concurrent_requests_are_batched_and_answered_correctly(text_predictor):
    inputs = texts(200)
    expected = text_predictor(inputs)
    app = make_app(text_predictor, max_batch_size=MAX_BATCH, max_wait_ms=50)
    with Server(app) as server:
        responses = asyncio.run(_post_all(server.url, [{"inputs": [t]} for t in inputs]))
        health = httpx.get(server.url + "/health", timeout=30).json()
    assert [r.status_code for r in responses] == [200] * 200
    for i, r in enumerate(responses):
        (row,) = r.json()["predictions"]
        probs = np.array([row["probs"][n] for n in LABELS])
        assert row["label"] == LABELS[int(np.argmax(expected["probs"][i]))]
        np.testing.assert_allclose(probs, expected["probs"][i], atol=1e-6)
    sizes = {int(k): v for k, v in health["batches"].items()}
    print("batch sizes formed (size: count):", dict(sorted(sizes.items())))
    assert health["status"] == "ok" and health["requests"] == 200
    assert sum(k * v for k, v in sizes.items()) == 200
    assert max(sizes) <= MAX_BATCH
    assert max(sizes) > 1, "200 concurrent requests never shared a batch"


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(text_predictor):
    app = make_app(text_predictor, max_body_bytes=1 << 20, max_items=8)
    with Server(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        post = lambda **kw: client.post("/predict", **kw)  # noqa: E731
        cases = {
            "malformed JSON": (post(content=b'{"inputs": ["ok",', headers={"content-type": "application/json"}), 400),
            "wrong field": (post(json={"text": ["hello"]}), 422),
            "extra field": (post(json={"inputs": ["hello"], "top_k": 2}), 422),
            "not a list": (post(json={"inputs": "hello"}), 422),
            "empty list": (post(json={"inputs": []}), 422),
            "not a text": (post(json={"inputs": ["ok", 3]}), 422),
            "too many items": (post(json={"inputs": ["x"] * 9}), 422),
            "10 MB body": (post(content=b'{"inputs": ["' + b"a" * (10 << 20) + b'"]}'), 413),
            "10 MB body, chunked": (post(content=(b"a" * (1 << 20) for _ in range(10))), 413),
            "GET on /predict": (client.get("/predict"), 405),
        }
        for name, (response, status) in cases.items():
            assert response.status_code == status, (name, response.text[:200])
            if status != 405:
                assert response.json()["error"], name
        print({name: (r.status_code, r.json()["error"][:60] if r.status_code != 405 else "")
               for name, (r, _) in cases.items()})
        assert "inputs[1] must be a text, got int" in cases["not a text"][0].json()["error"]
        ok = post(json={"inputs": ["still here", "and here"]})
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 2
        assert client.get("/health").json()["requests"] == 1


def _png(rgb):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 36, 3), rgb, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_an_image_model_takes_base64_files(tmp_path):
    model = jf.load(tiny_vit(str(tmp_path / "vit")), head=jf.heads.Classifier(2), rng=0)
    spec = Spec({"kind": "image", "image_size": 32, "image_options": {"mean": [0.5] * 3, "std": [0.5] * 3}},
                ("dark", "light"))
    predictor = Predictor.from_model(model, model.variables, spec, batch_sizes=(4,))
    images = [_png((20, 20, 20)), _png((230, 240, 250))]
    with Server(make_app(predictor)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/predict", json={"inputs": images})
        bad = client.post("/predict", json={"inputs": [images[0], "bm90IGFuIGltYWdl"]})
    assert r.status_code == 200
    expected = predictor([base64.b64decode(x) for x in images])["probs"]
    got = np.array([[p["probs"][n] for n in ("dark", "light")] for p in r.json()["predictions"]])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert bad.status_code == 422 and "inputs[1] is not a base64-encoded image file" in bad.json()["error"]
