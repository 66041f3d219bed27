"""ib-serve through the official ``openai`` client, on a proof-llama bundle (exported once per
session): the answers equal ib-run's, streaming and not; 16 concurrent questions about
proof-task scenes all answered right; every bad request gets its status and OpenAI error object
and the server answers afterwards; queue full, client disconnect, API key, start-up refusals.
Plus the pieces underneath: the image-embedding cache, batched Q-Former, stopping a generation."""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
import warnings

import numpy as np
import openai
import pytest
import uvicorn

from ib_edge.bench import proof_task
from ib_edge.runtime import Pipeline
from ib_edge.runtime.embed_cache import EmbedCache
from ib_edge.serve.app import create_app
from ib_edge.serve.cli import bind
from ib_edge.serve.engine import Cancelled, pad_qformer
from ib_edge.serve.options import ServeOptions

KEY = "test-key-0123"
MODEL = "proof-llama"
# Scenes with known answers. Fixed seed: proof-llama answers these 16 right (greedy, so the
# same every run); a random seed would fail ~5% of runs at the model's 99.7% accuracy.
SCENE_SEED = 4242


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def messages(prompt, *urls):
    return [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                         {"type": "text", "text": prompt}]}]


def http(method, url, body=None, headers=None):
    """(status, parsed JSON) without the openai client (to send what it will not)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def bundle(proof_bundle):
    return proof_bundle("proof-llama")


@pytest.fixture(scope="module")
def examples():
    return proof_task.make_eval_examples(16, SCENE_SEED)


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    """ib-serve's app under uvicorn on 127.0.0.1, a free port, in this process (so tests can
    hold its LLM). Its loader waits for a gate, so the 503-while-loading answers are certain."""
    allowed = tmp_path_factory.mktemp("allowed")
    gate = threading.Event()

    def load(opts):
        gate.wait(300)
        return Pipeline.load(opts.bundle)

    opts = ServeOptions(bundle=str(bundle), port=0, api_key=KEY, max_queue=16, max_batch=8,
                        allow_files=str(allowed), max_body_mb=1.0)
    app = create_app(opts, load=load)
    sock = bind("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    for _ in range(600):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    loading = {"health": http("GET", base + "/health")}
    try:
        client.chat.completions.create(model=MODEL, messages=messages("hi", "data:,"))
    except openai.APIStatusError as e:
        loading["chat"] = (e.status_code, e.body)
    gate.set()
    for _ in range(1200):
        if http("GET", base + "/health")[0] == 200:
            break
        time.sleep(0.1)
    state = app.state.server
    assert state.phase == "ready", state.error
    yield types.SimpleNamespace(base=base, client=client, state=state, allowed=allowed, loading=loading)
    srv.should_exit = True
    th.join(30)
    assert not th.is_alive(), "the server did not stop"


def ask(client, image_url, prompt, **kw):
    r = client.chat.completions.create(model=MODEL, messages=messages(prompt, image_url), **kw)
    return r


def good_request(server, examples):
    ex = examples[0]
    r = ask(server.client, data_url(ex["image"]), ex["question"])
    assert proof_task.is_correct(r.choices[0].message.content, ex["answer"])


def ib_run(capsys, *argv):
    """ib-run's main in this process (one torch import for the whole module); logging and
    warnings filters it sets are restored."""
    from ib_edge.runtime import cli

    disabled, filters = logging.root.manager.disable, warnings.filters[:]
    try:
        capsys.readouterr()
        rc = cli.main([str(a) for a in argv])
        out = capsys.readouterr()
    finally:
        logging.disable(disabled)
        warnings.filters[:] = filters
    assert rc == 0, out.err
    return out.out


# --- the API --------------------------------------------------------------------------------------
def test_loading_is_503(server):
    status, body = server.loading["health"]
    assert status == 503 and body["status"] == "loading"
    status, body = server.loading["chat"]
    assert status == 503 and body["code"] == "model_loading" and body["type"] == "server_error"


def test_answers_equal_ib_run(server, bundle, examples, tmp_path, capsys):
    ex = examples[1]
    path = server.allowed / "scene.png"
    ex["image"].save(path)
    prompts = [ex["question"], "Describe this image."]
    lines = ib_run(capsys, "--bundle", bundle, path, *prompts, "--json").splitlines()
    ref = [json.loads(line) for line in lines]
    assert [r["prompt"] for r in ref] == prompts  # several prompts, one load: one line each, in order
    assert ib_run(capsys, "--bundle", bundle, path, prompts[0]) == ref[0]["answer"] + "\n"

    c = server.client
    for prompt, want in zip(prompts, ref):
        r = ask(c, data_url(ex["image"]), prompt)
        assert r.choices[0].message.content == want["answer"]
        assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion" and r.model == MODEL
        enc = server.state.pipe.prompts.encode(prompt)
        assert r.usage.prompt_tokens == enc["input_ids"].shape[1] and r.usage.completion_tokens >= 1
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        chunks = list(c.chat.completions.create(model=MODEL, messages=messages(prompt, data_url(ex["image"])),
                                                stream=True, stream_options={"include_usage": True}))
        assert all(ch.object == "chat.completion.chunk" for ch in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == want["answer"]
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # a file:// URL under --allow-files reads the same file ib-run read
    r = ask(c, path.as_uri(), prompts[0])
    assert r.choices[0].message.content == ref[0]["answer"]
    # max_tokens (and max_completion_tokens) bound the answer: "length" when cut
    r = ask(c, data_url(ex["image"]), "Describe this image.", max_completion_tokens=1)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "length"
    # sampling with a seed is repeatable
    a, b = (ask(c, data_url(ex["image"]), "Describe this image.", temperature=1.5, seed=7).choices[0].message.content
            for _ in range(2))
    assert a == b
    models = c.models.list()
    assert [m.id for m in models.data] == [MODEL] and c.models.retrieve(MODEL).id == MODEL


def test_sixteen_concurrent_all_right(server, examples):
    before = server.state.pipe.embed_cache.stats()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futs = [pool.submit(ask, server.client, data_url(ex["image"]), ex["question"]) for ex in examples]
        answers = [f.result().choices[0].message.content for f in futs]
    wrong = [(ex["question"], ex["answer"], a) for ex, a in zip(examples, answers)
             if not proof_task.is_correct(a, ex["answer"])]
    assert not wrong
    after = server.state.pipe.embed_cache.stats()
    assert after["hits"] + after["misses"] - before["hits"] - before["misses"] == 16
    status, health = http("GET", server.base + "/health")
    assert status == 200 and health["cache"]["hits"] == after["hits"] and health["queue"]["in_flight"] == 0


def test_cache_hit_on_second_question(server, examples):
    ex = proof_task.make_eval_examples(1, SCENE_SEED + 1)[0]
    s0 = server.state.pipe.embed_cache.stats()
    ask(server.client, data_url(ex["image"]), "How many shapes are there?")
    s1 = server.state.pipe.embed_cache.stats()
    ask(server.client, data_url(ex["image"]), "Describe this image.")
    s2 = server.state.pipe.embed_cache.stats()
    assert (s1["misses"] - s0["misses"], s1["hits"] - s0["hits"]) == (1, 0)
    assert (s2["misses"] - s1["misses"], s2["hits"] - s1["hits"]) == (0, 1)
    _, health = http("GET", server.base + "/health")
    assert health["cache"]["hits"] == s2["hits"] and health["cache"]["misses"] == s2["misses"]


def _bad_requests(server, image, tmp_path):
    """(name, callable raising openai.APIStatusError or returning (status, body)), status, code."""
    c, url = server.client, data_url(image)
    outside = tmp_path / "outside.png"
    image.save(outside)
    not_image = "data:image/png;base64," + base64.b64encode(b"GIF89a but not really an image").decode()
    huge = ("data:image/png;base64," + "A" * (1 << 20))  # > --max-body-mb 1
    chat = lambda **kw: c.chat.completions.create(**({"model": MODEL, "messages": messages("hi", url)} | kw))
    raw = lambda body, **h: http("POST", server.base + "/v1/chat/completions", body,
                                 {"content-type": "application/json"} | h)
    good = json.dumps({"model": MODEL, "messages": messages("hi", url)}).encode()
    return [
        ("bad base64", lambda: chat(messages=messages("hi", "data:image/png;base64,@@not base64@@")), 400, None),
        ("not an image", lambda: chat(messages=messages("hi", not_image)), 400, None),
        ("http url", lambda: chat(messages=messages("hi", "http://example.com/cat.png")), 400, "url_not_allowed"),
        ("https url", lambda: chat(messages=messages("hi", "https://example.com/cat.png")), 400, "url_not_allowed"),
        ("file outside --allow-files", lambda: chat(messages=messages("hi", outside.as_uri())), 400, "file_not_allowed"),
        ("file escaping by ..", lambda: chat(messages=messages("hi", (server.allowed / ".." / outside.name).as_uri())),
         400, "file_not_allowed"),
        ("two images", lambda: chat(messages=messages("hi", url, url)), 400, None),
        ("no image", lambda: chat(messages=[{"role": "user", "content": "What color is the circle?"}]), 400, None),
        ("empty prompt", lambda: chat(messages=messages("  ", url)), 400, None),
        ("huge prompt", lambda: chat(messages=messages("square " * 300, url)), 400, None),
        ("last message not the user's", lambda: chat(messages=messages("hi", url)
                                                     + [{"role": "assistant", "content": "red"}]), 400, None),
        ("n=2", lambda: chat(n=2), 400, None),
        ("tools", lambda: chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, None),
        ("max_tokens 0", lambda: chat(max_tokens=0), 400, None),
        ("unknown model", lambda: chat(model="gpt-4o"), 404, "model_not_found"),
        ("body too large", lambda: chat(messages=messages("hi", huge)), 413, "request_too_large"),
        ("not JSON", lambda: raw(b"{nope", authorization=f"Bearer {KEY}"), 400, None),
        ("no messages", lambda: raw(b'{"model": "proof-llama"}', authorization=f"Bearer {KEY}"), 400, None),
        ("wrong key", lambda: openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
         .chat.completions.create(model=MODEL, messages=messages("hi", url)), 401, "invalid_api_key"),
        ("missing key", lambda: raw(good), 401, "invalid_api_key"),
        ("missing key, models", lambda: http("GET", server.base + "/v1/models"), 401, "invalid_api_key"),
        ("unknown endpoint", lambda: http("GET", server.base + "/nothing"), 404, "not_found"),
    ]


def test_bad_requests(server, examples, tmp_path):
    """Each bad request: its status, an OpenAI error object (message, type, param, code), no
    traceback; then a good request is still answered."""
    for name, call, status, code in _bad_requests(server, examples[2]["image"], tmp_path):
        try:
            got = call()
        except openai.APIStatusError as e:
            got = (e.status_code, e.body)
        assert isinstance(got, tuple), f"{name}: accepted"
        got_status, body = got
        if "error" in body:
            body = body["error"]
        assert got_status == status, (name, got_status, body)
        assert set(body) == {"message", "type", "param", "code"}, (name, body)
        assert body["message"] and "Traceback" not in body["message"], name
        assert body["type"] == "invalid_request_error", (name, body)
        if code is not None:
            assert body["code"] == code, (name, body)
        good_request(server, examples)


def test_queue_full_then_batched(server, examples):
    """With the LLM held, 16 requests fill --max-queue 16 and the 17th gets 429; released, all 16
    are answered right, and those that waited together shared vision/Q-Former calls."""
    engine = server.state.engine
    llm = server.state.pipe.llm
    gate, entered = threading.Event(), threading.Event()
    orig = llm.generate

    def held(*a, **k):
        entered.set()
        assert gate.wait(120)
        return orig(*a, **k)

    llm.generate = held
    engine.batches.clear()
    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            futs = [pool.submit(ask, server.client, data_url(ex["image"]), ex["question"]) for ex in examples]
            deadline = time.time() + 60
            while engine.stats()["in_flight"] < 16 and time.time() < deadline:
                time.sleep(0.02)
            assert entered.wait(60) and engine.stats()["in_flight"] == 16
            with pytest.raises(openai.RateLimitError) as e:
                ask(server.client, data_url(examples[0]["image"]), examples[0]["question"])
            assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
            gate.set()
            answers = [f.result().choices[0].message.content for f in futs]
    finally:
        gate.set()
        del llm.generate
    assert all(proof_task.is_correct(a, ex["answer"]) for a, ex in zip(answers, examples))
    assert max(engine.batches) > 1, engine.batches  # the 15 that waited were prefilled in batches
    assert sum(n * k for n, k in engine.batches.items()) == 16
    good_request(server, examples)


def test_disconnect_stops_generation(server, examples):
    """A streaming client that goes away stops its generation (an LLM here that would stream
    forever; that the real runtimes stop on the same signal is test_llm_stops_when_told)."""
    engine = server.state.engine
    llm = server.state.pipe.llm
    stopped = threading.Event()

    def endless(*a, on_text, **k):
        try:
            while True:
                time.sleep(0.01)
                on_text(" more")
        finally:
            stopped.set()

    llm.generate = endless
    cancelled = engine.stats()["cancelled"]
    try:
        stream = server.client.chat.completions.create(
            model=MODEL, messages=messages("Describe this image.", data_url(examples[3]["image"])), stream=True)
        for i, _ in zip(range(3), stream):
            pass
        stream.close()
        assert stopped.wait(30), "generation went on after the client left"
    finally:
        del llm.generate
    deadline = time.time() + 10
    while engine.stats()["cancelled"] == cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats()["cancelled"] == cancelled + 1 and engine.stats()["in_flight"] == 0
    good_request(server, examples)


# --- the CLI --------------------------------------------------------------------------------------
def _serve(*args):
    return subprocess.Popen([sys.executable, "-m", "ib_edge.serve.cli", *map(str, args)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_cli_serves_with_api_key(bundle, examples):
    """The real command: binds 127.0.0.1, enforces --api-key (from the first moment: before the
    bundle is even loaded), answers once ready, shuts down on SIGTERM."""
    proc = _serve("--bundle", bundle, "--port", "0", "--api-key", KEY, "--log-level", "warning")
    try:
        line = proc.stderr.readline()
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)/v1", line)
        assert m, line
        base = f"http://127.0.0.1:{m.group(1)}"
        body = json.dumps({"model": MODEL, "messages": messages("hi", data_url(examples[0]["image"]))}).encode()
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": KEY}):
            status, err = http("POST", base + "/v1/chat/completions", body, {"content-type": "application/json"} | headers)
            assert status == 401 and err["error"]["code"] == "invalid_api_key", (headers, status, err)
        ready = proc.stderr.readline()
        assert "ready" in ready, ready
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
        ex = examples[4]
        assert proof_task.is_correct(ask(client, data_url(ex["image"]), ex["question"]).choices[0].message.content,
                                     ex["answer"])
        proc.send_signal(signal.SIGTERM)
        # graceful shutdown, then uvicorn re-raises the signal it caught: status -SIGTERM (143 in a shell)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refusals(tmp_path, bundle):
    """Bad options and bundles: one line, exit 2 (input) or 3 (bundle), before any loading."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [(["--bundle", tmp_path / "nope"], 3, "bundle not found"),
                 (["--bundle", bundle, "--port", port], 2, "cannot listen"),
                 (["--bundle", bundle, "--max-queue", "0"], 2, "--max-queue"),
                 (["--bundle", bundle, "--allow-files", tmp_path / "nodir"], 2, "--allow-files")]
        for args, code, needle in cases:
            proc = _serve(*args)
            out, err = proc.communicate(timeout=120)
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert proc.returncode == code and len(lines) == 1 and needle in lines[0], (args, proc.returncode, err)
            assert lines[0].startswith("ib-serve: error:")


# --- underneath: cache, batching, stopping ----------------------------------------------------------
def test_embed_cache_lru_by_bytes():
    calls = []

    def compute(pv):
        calls.append(len(pv))
        return pv.reshape(len(pv), -1)[:, :4] * 2  # 16 bytes per row

    cache = EmbedCache(max_mb=48 / (1 << 20))  # three rows
    rows = [np.full((1, 2, 2, 2), i, np.float32) for i in range(5)]
    a = cache.embeds(np.concatenate([rows[0], rows[1], rows[0]]), compute)
    assert calls == [2] and cache.stats()["misses"] == 2 and cache.stats()["hits"] == 1  # row 0 computed once
    np.testing.assert_array_equal(a, compute(np.concatenate([rows[0], rows[1], rows[0]])))
    calls.clear()
    cache.embeds(np.concatenate([rows[2], rows[3]]), compute)  # 4 rows > 3: row 0, least recent, goes
    assert calls == [2] and cache.stats()["entries"] == 3 and cache.stats()["bytes"] == 48
    cache.embeds(rows[1], compute)
    assert calls == [2]  # still there
    cache.embeds(rows[0], compute)
    assert calls == [2, 1]  # evicted, recomputed
    stored = next(iter(cache._rows.values()))
    with pytest.raises(ValueError):  # stored rows are read-only: a caller cannot corrupt the cache
        stored[0] = 1.0


def test_pipeline_cache_and_padded_qformer(bundle, examples):
    """Pipeline.embed_cache: the same image_embeds as without, the ViT run for new images only;
    a right-padded Q-Former batch gives each prompt's query_embeds as alone."""
    pipe = Pipeline.load(bundle)
    pv = pipe.pixel_values([ex["image"] for ex in examples[:3]])
    ref = pipe.image_embeds(pv)
    pipe.embed_cache = EmbedCache(max_mb=64)
    seen = []
    vision = pipe.vision
    pipe.vision = lambda **f: (seen.append(f["pixel_values"].shape[0]), vision(**f))[1]
    np.testing.assert_allclose(pipe.image_embeds(pv[:2]), ref[:2], rtol=0, atol=1e-6)
    np.testing.assert_allclose(pipe.image_embeds(pv), ref, rtol=0, atol=1e-6)
    assert seen == [2, 1]
    assert (pipe.embed_cache.hits, pipe.embed_cache.misses) == (2, 3)
    prompts = ["How many shapes are there?", "What color is the circle?", "Describe this image."]
    encs = [pipe.prompts.encode(p) for p in prompts]
    assert len({e["qformer_input_ids"].shape[1] for e in encs}) > 1  # padding really happens
    ids, mask = pad_qformer(encs, int(pipe.manifest.model.get("qformer_pad_token_id", 0)))
    batched = pipe.query_embeds(ref, ids, mask)
    for i, e in enumerate(encs):
        alone = pipe.query_embeds(ref[i:i + 1], e["qformer_input_ids"], e["qformer_attention_mask"])
        np.testing.assert_allclose(batched[i:i + 1], alone, rtol=0, atol=1e-4)


def test_llm_stops_when_told(bundle, examples):
    """The runtimes' decode loop ends when on_text raises: how ib-serve stops a generation."""
    pipe = Pipeline.load(bundle)
    enc = pipe.prompts.encode("Describe this image.", 8)
    q = pipe.query_embeds(pipe.image_embeds(pipe.pixel_values([examples[0]["image"]])),
                          enc["qformer_input_ids"], enc["qformer_attention_mask"])
    pieces = []

    def on_text(t):
        pieces.append(t)
        raise Cancelled("client disconnected")

    with pytest.raises(Cancelled):
        pipe.llm.generate(q, enc["input_ids"], enc["attention_mask"], decode=pipe.prompts.decode,
                          max_new_tokens=8, on_text=on_text)
    assert len(pieces) == 1
    # and the next generation is unaffected
    assert pipe.llm.generate(q, enc["input_ids"], enc["attention_mask"], decode=pipe.prompts.decode,
                             max_new_tokens=8).token_ids == pipe.run(examples[0]["image"], "Describe this image.",
                                                           max_new_tokens=8).token_ids
