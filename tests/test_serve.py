"""The HTTP server on 127.0.0.1: answers equal the offline models', bad requests answer 422,
concurrent requests share decoder calls, backpressure, deadlines, disconnects, SIGTERM."""

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from tfjax import continuous, generate, pipelines, serve
from tfjax.serve.app import MAX_BODY_BYTES
from tfjax.translator import Translator

SENTENCES = ["ein mann fährt fahrrad", "zwei kinder spielen im park", "eine frau liest ein buch"]


@contextlib.contextmanager
def serving(server: serve.Server):
    """Runs `server` with uvicorn in a thread on 127.0.0.1; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # clients may connect before the loop starts; they wait in the backlog
    runner = uvicorn.Server(uvicorn.Config(serve.create_app(server), log_level="warning"))
    thread = threading.Thread(target=runner.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        runner.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "the server did not stop"


def make_server(uninterrupted, **config) -> serve.Server:
    return serve.Server(
        [serve.load("tiny", str(uninterrupted), max_batch=8)], serve.ServerConfig(**config)
    )


@pytest.fixture(scope="module")
def offline(uninterrupted) -> Translator:
    return Translator.from_workdir(uninterrupted, max_batch=8)


@pytest.fixture(scope="module")
def server(uninterrupted):
    """(base URL, Server) batching up to 8 sentences, waiting up to 20 ms for company."""
    s = make_server(uninterrupted, max_batch=8, max_wait_ms=20)
    with serving(s) as url:
        yield url, s


def post(url: str, path: str, body, **kwargs) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=data, timeout=60, **kwargs)


def metric(url: str, name: str, **labels) -> float:
    """The value of one Prometheus sample (0 when absent)."""
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_translations_equal_the_offline_translators(server, offline):
    url, _ = server
    for beam in (1, 3):
        got = post(url, "/v1/translate", dict(text=SENTENCES, beam=beam, num_top=3))
        assert got.status_code == 200, got.text
        want = offline.translate(SENTENCES, beam_size=beam, num_top=3)
        for g, w in zip(got.json()["translations"], want, strict=True):
            assert g["text"] == w.text and g["pieces"] == w.pieces
            np.testing.assert_allclose(g["probs"], np.exp(w.log_probs), rtol=1e-5)
            assert [[a["piece"] for a in step] for step in g["alternatives"]] == [
                [p for p, _ in step] for step in w.alternatives
            ]
    one = post(url, "/v1/translate", dict(text=SENTENCES[0])).json()["translations"]
    assert len(one) == 1 and one[0]["text"] == offline.translate(SENTENCES[:1])[0].text


def test_attention_is_returned_when_asked(server, offline):
    url, _ = server
    got = post(url, "/v1/translate", dict(text=SENTENCES[:2], attention=True)).json()
    want = offline.translate(SENTENCES[:2], attention=True)
    for g, w in zip(got["translations"], want, strict=True):
        cross = np.array(g["attention"]["cross"])  # [layers, heads, T, S]
        assert cross.shape == w.attention.cross.shape
        assert cross.shape[2:] == (len(g["pieces"]), len(g["attention"]["source_pieces"]))
        np.testing.assert_allclose(cross, w.attention.cross, atol=1e-4)
        np.testing.assert_allclose(cross.sum(-1), 1, atol=1e-3)
    plain = post(url, "/v1/translate", dict(text=SENTENCES[0])).json()["translations"][0]
    assert "attention" not in plain


BAD = [
    (b"not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    ({"text": ""}, "empty"),
    ({"text": "   "}, "empty"),
    ({"text": []}, "non-empty list"),
    ({"text": 3}, "string"),
    ({"text": ["ok", 3]}, "not a string"),
    ({}, '"text"'),
    ({"text": "ein mann", "beam": 0}, '"beam" must be in [1'),
    ({"text": "ein mann", "beam": "2"}, '"beam" must be an integer'),
    ({"text": "ein mann", "beam": True}, '"beam" must be an integer'),
    ({"text": "ein mann", "num_top": -1}, '"num_top"'),
    ({"text": "ein mann", "alpha": "x"}, '"alpha" must be a number'),
    ({"text": "ein mann", "attention": 1}, '"attention" must be true or false'),
    ({"text": "ein mann", "max_length": 10_000}, '"max_length"'),
    ({"text": "ein mann", "bem": 2}, "unknown field(s) ['bem']"),
    ({"text": "ein mann " * 40}, "pieces long"),
    ({"text": ["ein"] * 65}, "at most 64"),
    ({"text": "ein mann", "model": "nope"}, "is not served"),
    ({"text": "ein mann", "timeout": 0}, '"timeout"'),
]


@pytest.mark.parametrize("body, message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_answer_422_with_a_message(server, body, message):
    url, _ = server
    got = post(url, "/v1/translate", body)
    assert got.status_code == 422, got.text
    assert message in got.json()["error"]


ODD = [
    b'{"text": "ein mann", "alpha": NaN}',
    b'{"text": "ein mann", "beam": 1e308}',
    b'{"text": "\\ud800"}',
    b'{"text": "\\u0000 ein"}',
    b'{"text": {"nested": ["x"]}}',
    b'{"text": null, "model": null}',
    b'{"text": "ein mann", "timeout": -1}',
    b'{"text": "ein mann", "max_length": null}',
    b"\xff\xfe",
    b"",
]


@pytest.mark.parametrize("body", ODD, ids=[str(i) for i in range(len(ODD))])
def test_odd_input_never_fails_the_server(server, body):
    url, _ = server
    got = post(url, "/v1/translate", body)
    assert got.status_code in (200, 422), got.text
    assert "Traceback" not in got.text and (got.status_code == 200 or got.json()["error"])


def test_a_body_over_the_limit_is_refused_with_413(server):
    url, _ = server
    big = json.dumps({"text": "ein mann " * (MAX_BODY_BYTES // 8)}).encode()
    assert post(url, "/v1/translate", big).status_code == 413  # declared length
    # Chunked, no length declared: counted as it arrives.
    got = httpx.post(url + "/v1/translate", content=iter([big[:1000], big[1000:]]), timeout=60)
    assert got.status_code == 413 and str(MAX_BODY_BYTES) in got.json()["error"]
    assert post(url, "/v1/translate", {"text": "ein mann"}).status_code == 200


def test_other_routes_refuse_cleanly(server):
    url, _ = server
    assert post(url, "/v1/pipeline/nope", {"inputs": "x"}).status_code == 404
    got = post(url, "/v1/pipeline/fill-mask", {"inputs": "x <mask>"})
    assert got.status_code == 422 and "no masked_lm model" in got.json()["error"]
    assert httpx.get(url + "/v1/translate").status_code == 405


def test_concurrent_requests_share_one_decoder_call(uninterrupted, offline):
    # Whole-batch calls (continuous batching off), waiting up to 5 min for company (a
    # starved VM can take many seconds to send 8 requests): 8 one-sentence requests fill one
    # 8-sentence call, which starts as soon as the eighth arrives, so exactly one decoder
    # call serves them all.
    s = make_server(uninterrupted, max_batch=8, max_wait_ms=300_000, continuous=False)
    texts = [f"{a} {b}" for a in ("ein", "zwei") for b in ("mann", "frau", "buch", "park")]
    with serving(s) as url, concurrent.futures.ThreadPoolExecutor(8) as pool:
        before = s.batchers["tiny", "translate"].calls
        answers = list(pool.map(lambda t: post(url, "/v1/translate", {"text": t}), texts))
        assert s.batchers["tiny", "translate"].calls - before == 1
        assert metric(url, "tfjax_requests_per_call_sum", model="tiny") == 8
    want = [t.text for t in offline.translate(texts)]
    assert [a.json()["translations"][0]["text"] for a in answers] == want


def test_greedy_requests_join_the_running_rows(uninterrupted, offline):
    # Continuous batching: the first request's (two sentences) first decoder step is held
    # until 6 more requests queue; they all join the running rows at the next step, beside
    # the first two. Rows per step are counted by wrapping the engine's step; answers equal
    # offline.
    s = make_server(uninterrupted, max_batch=8)
    batcher = s.batchers["tiny", "translate"]
    engine, release, rows = batcher._engine, threading.Event(), []

    def held_step():
        release.wait(timeout=300)  # a bound, not a wait: the test sets it
        rows.append(engine.decoder.running + engine.decoder.waiting)
        return type(engine).step(engine)

    engine.step = held_step
    texts = [f"{a} {b}" for a in ("ein", "zwei") for b in ("mann", "frau", "buch", "park")]
    with serving(s) as url, concurrent.futures.ThreadPoolExecutor(8) as pool:
        first = pool.submit(post, url, "/v1/translate", {"text": texts[:2]})
        while not engine.busy:
            pass
        rest = [pool.submit(post, url, "/v1/translate", {"text": t}) for t in texts[2:]]
        while httpx.get(url + "/health").json()["queued"] < 6:
            pass
        release.set()
        answers = [first.result()] + [r.result() for r in rest]
    want = [t.text for t in offline.translate(texts)]
    got = [t["text"] for a in answers for t in a.json()["translations"]]
    assert got == want
    assert rows[0] == 2 and rows[1] == 8
    assert len(rows) < sum(len(t.pieces) for t in offline.translate(texts))


def test_a_bad_request_never_disturbs_its_batch(uninterrupted, offline):
    s = make_server(uninterrupted, max_batch=4, max_wait_ms=30_000)
    bodies = [{"text": "ein mann"}, {"text": ""}, {"text": "eine frau"}, {"text": "x", "beam": 0},
              {"text": "zwei kinder"}, {"text": "ein buch"}]  # fmt: skip
    with serving(s) as url, concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: post(url, "/v1/translate", b), bodies))
    assert [a.status_code for a in answers] == [200, 422, 200, 422, 200, 200]
    good = [b["text"] for b, a in zip(bodies, answers, strict=True) if a.status_code == 200]
    got = [a.json()["translations"][0]["text"] for a in answers if a.status_code == 200]
    assert got == [t.text for t in offline.translate(good)]


def test_full_queue_answers_429_and_deadlines_504(uninterrupted):
    # With whole-batch calls, two queued requests wait for company (max_wait 30 s) with 2 s
    # deadlines; a third finds the queue full. The two then pass their deadline: 504, and
    # their work is dropped.
    s = make_server(uninterrupted, max_batch=8, max_wait_ms=30_000, continuous=False, max_queue=2)
    with serving(s) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
        queued = [
            pool.submit(post, url, "/v1/translate", {"text": t, "timeout": 2})
            for t in ("ein mann", "eine frau")
        ]
        while httpx.get(url + "/health").json()["queued"] < 2:
            pass
        full = post(url, "/v1/translate", {"text": "ein buch"})
        assert full.status_code == 429 and full.headers["Retry-After"] == "1"
        assert [q.result().status_code for q in queued] == [504, 504]
        assert "deadline" in queued[0].result().json()["error"]
        assert metric(url, "tfjax_rejected_requests_total", reason="queue_full") == 1
        assert metric(url, "tfjax_rejected_requests_total", reason="deadline") == 2
        # Nothing is left behind: a new request is served.
        s.batchers["tiny", "translate"].max_wait = 0.0
        assert post(url, "/v1/translate", {"text": "ein buch"}).status_code == 200


def test_a_client_that_leaves_has_its_queued_work_dropped(uninterrupted):
    s = make_server(uninterrupted, max_batch=2, max_wait_ms=30_000, continuous=False)
    with serving(s) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"text": "ein mann"}).encode()
        with socket.create_connection((host, int(port))) as raw:
            raw.sendall(
                b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            while httpx.get(url + "/health").json()["queued"] < 1:
                pass
        while metric(url, "tfjax_rejected_requests_total", reason="disconnected") < 1:
            pass
        assert httpx.get(url + "/health").json()["queued"] == 0
        calls = s.batchers["tiny", "translate"].calls
        s.batchers["tiny", "translate"].max_wait = 0.0
        assert post(url, "/v1/translate", {"text": "eine frau"}).status_code == 200
        assert s.batchers["tiny", "translate"].calls == calls + 1
        assert metric(url, "tfjax_batch_size_sum", model="tiny") == 1  # the dropped one never ran


def test_health_answers_while_requests_wait(uninterrupted, offline):
    # Three requests wait for a fourth to fill the call; the event loop answers meanwhile.
    s = make_server(uninterrupted, max_batch=4, max_wait_ms=30_000, continuous=False)
    texts = [*SENTENCES, "ein buch"]
    with serving(s) as url, concurrent.futures.ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(post, url, "/v1/translate", {"text": t}) for t in texts[:3]]
        while (health := httpx.get(url + "/health").json())["queued"] < 3:
            pass
        assert health["status"] == "ok" and health["models"] == ["tiny"]
        assert metric(url, "tfjax_queue_length", model="tiny") == 3
        last = post(url, "/v1/translate", {"text": texts[3]})
        answers = [w.result() for w in waiting] + [last]
    got = [a.json()["translations"][0]["text"] for a in answers]
    assert got == [t.text for t in offline.translate(texts)]


def test_metrics_are_prometheus_text(server):
    url, _ = server
    post(url, "/v1/translate", {"text": SENTENCES})
    names = {f.name for f in text_string_to_metric_families(httpx.get(url + "/metrics").text)}
    assert {
        "tfjax_queue_length", "tfjax_batch_size", "tfjax_queue_wait_seconds",
        "tfjax_request_latency_seconds", "tfjax_generated_tokens",
        "tfjax_generated_tokens_per_second", "tfjax_rejected_requests",
    } <= names  # fmt: skip
    assert metric(url, "tfjax_generated_tokens_total", model="tiny") > 0
    assert metric(url, "tfjax_responses_total", route="translate", status="200") >= 1


def test_pipelines_are_served_as_offline(uninterrupted, mlm_workdir, classifier_workdir):
    served = [
        serve.load("mt", str(uninterrupted), max_batch=8),
        serve.load("mlm", str(mlm_workdir), max_batch=8),
        serve.load("cls", str(classifier_workdir), max_batch=8),
    ]
    texts = ["the film was <mask> .", "a <mask> story"]
    with serving(serve.Server(served, serve.ServerConfig(max_wait_ms=1))) as url:
        fill = post(url, "/v1/pipeline/fill-mask", dict(inputs=texts, parameters=dict(top_k=3)))
        assert fill.status_code == 200, fill.text
        assert fill.json()["outputs"] == pipelines.pipeline("fill-mask", mlm_workdir)(
            texts, top_k=3
        )
        sentiment = post(url, "/v1/pipeline/sentiment-analysis", dict(inputs=texts, model="cls"))
        want = pipelines.pipeline("sentiment-analysis", classifier_workdir)(texts)
        assert sentiment.json()["outputs"] == want
        translated = post(url, "/v1/pipeline/translation", dict(inputs="ein mann")).json()
        assert (
            translated["outputs"][0]["translation_text"]
            == pipelines.pipeline("translation", uninterrupted)("ein mann")[0]["translation_text"]
        )
        no_mask = post(url, "/v1/pipeline/fill-mask", dict(inputs="no mask here"))
        assert no_mask.status_code == 422 and "<mask>" in no_mask.json()["error"]
        bad = post(url, "/v1/pipeline/fill-mask", dict(inputs=texts, parameters=dict(top_k=0)))
        assert bad.status_code == 422
        models = httpx.get(url + "/v1/models").json()["models"]
        assert [m["task"] for m in models] == ["translation", "masked_lm", "classification"]


def test_sigterm_answers_what_is_in_flight_then_exits_0(uninterrupted, offline):
    command = [
        sys.executable, "-m", "tfjax", "serve", f"--model=tiny={uninterrupted}", "--port=0",
        "--max_batch=8", "--max_wait_ms=2000",
    ]  # fmt: skip
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )
    try:
        for line in process.stderr:
            if line.startswith("serving on "):
                url = line.split()[-1]
                break
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            # Beam requests wait for company (greedy ones would join the running rows at once).
            body = {"beam": 2}
            flying = [
                pool.submit(post, url, "/v1/translate", {"text": t, **body}) for t in SENTENCES
            ]
            while httpx.get(url + "/health").json()["queued"] < 3:
                pass
            process.send_signal(signal.SIGTERM)
            answers = [f.result() for f in flying]
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        process.kill()
    want = [t.text for t in offline.translate(SENTENCES, beam_size=2)]
    assert [a.json()["translations"][0]["text"] for a in answers] == want
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


def test_serve_refuses_bad_arguments():
    for args, message in (
        (["--model=nodir"], "expected NAME=DIR"),
        ([], "nothing to serve"),
        (["--workdir=/nonexistent/tfjax"], "does not exist"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "tfjax", "serve", *args], capture_output=True, text=True,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )  # fmt: skip
        assert out.returncode != 0 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_warm_up_compiles_every_bucket_a_request_can_need(offline):
    shapes = offline.warm_up()
    assert shapes == 4 * 2  # rows 1, 2, 4, 8 by lengths 16, 24 (max_source_len)
    before = generate.translate_greedy._cache_size()
    rng = np.random.default_rng(0)
    for rows in (1, 3, 5, 8, 2):
        texts = [
            " ".join(rng.choice(SENTENCES[2].split(), rng.integers(1, 12))) for _ in range(rows)
        ]
        offline.translate(texts)
    assert generate.translate_greedy._cache_size() == before


def test_continuous_warm_up_compiles_every_program_a_request_can_need(offline):
    jitted = (generate.rolling_rows, generate.rolling_steps, continuous.take_rows,
              continuous.put_rows, continuous.empty_rows)  # fmt: skip
    earlier = sum(f._cache_size() for f in jitted)  # other tests may have compiled some
    programs = offline.warm_up_continuous()
    before = [f._cache_size() for f in jitted]
    assert earlier < sum(before) <= earlier + programs
    rng = np.random.default_rng(0)
    decoder = offline.continuous()
    for k, arrivals in enumerate((1, 3, 8, 0, 0, 5, 2, 0, 0, 0, 0, 1)):
        for _ in range(arrivals):
            words = rng.choice(SENTENCES[2].split(), rng.integers(1, 12))
            decoder.add(offline.source_ids([" ".join(words)])[0], k, limit=8)
        decoder.step()
    assert [f._cache_size() for f in jitted] == before


class FakeEngine:
    """Upper-cases items, one step per item; refuses "bad" items and fails on "boom"."""

    def __init__(self):
        self.items = []

    def accepts(self, key):
        return key == "fast"

    def add(self, key, items, tag):
        if "bad" in items:
            raise ValueError("bad item")
        self.items += [((tag, i), x) for i, x in enumerate(items)]

    def step(self):
        tag, x = self.items.pop(0)
        if x == "boom":
            raise RuntimeError("step failed")
        return [(tag, x.upper())]

    def drop(self):
        tags, self.items = [t for t, _ in self.items], []
        return tags

    @property
    def busy(self):
        return len(self.items)


def test_continuous_batcher_isolates_failures_and_runs_other_keys_as_calls():
    batcher = serve.ContinuousBatcher(
        lambda key, items: [x * 2 for x in items], FakeEngine(), max_items=4, max_wait=0.0
    )

    def submit(key, items):
        return batcher.submit(serve.Job(key, items, 1, deadline=time.monotonic() + 60))

    assert submit("fast", ["a", "b"]).result(timeout=30) == ["A", "B"]
    assert submit("slow", ["a"]).result(timeout=30) == ["aa"]  # another key: a whole call
    assert submit("fast", ["a"]).result(timeout=30) == ["aa"]  # alone: a call of its own
    with pytest.raises(ValueError, match="bad item"):
        submit("fast", ["bad", "y"]).result(timeout=30)
    with pytest.raises(RuntimeError, match="step failed"):
        submit("fast", ["boom", "x"]).result(timeout=30)
    assert submit("fast", ["c", "d"]).result(timeout=30) == ["C", "D"]  # the engine goes on
    batcher.stop()


def test_batcher_isolates_a_failing_job():
    def run(key, items):
        if "bad" in items:
            raise RuntimeError("cannot")
        return [x.upper() for x in items]

    batcher = serve.Batcher(run, max_items=3, max_wait=30.0)
    jobs = [serve.Job(None, [x], 1, deadline=time.monotonic() + 60) for x in ("a", "bad", "c")]
    futures = [batcher.submit(job) for job in jobs]
    assert futures[0].result(timeout=30) == ["A"] and futures[2].result() == ["C"]
    with pytest.raises(RuntimeError, match="cannot"):
        futures[1].result()
    assert batcher.calls == 4  # the shared call, then each job alone
    batcher.stop()
