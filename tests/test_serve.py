"""``sqc serve`` against a live server on 127.0.0.1: the official openai client, streams, concurrency, and every
fault answered the way OpenAI's API answers it, with all slots free afterwards."""
import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

import sqc
from sqc.serve import create_app

sys.path.insert(0, os.path.dirname(__file__))
from conftest import char_tokenizer, tiny_llama  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A uvicorn server on a thread, serving ``app``."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = app.state.sqc

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def idle(self, timeout: float = 20) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            h = httpx.get(self.url + "/health").json()
            if h["active_sequences"] == 0 and h["queue_depth"] == 0:
                return True
            time.sleep(0.05)
        return False


@pytest.fixture(scope="module")
def model():
    m = tiny_llama()
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    return sqc.compile(m, (ids,), config="w4", tune=False)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def live(model, tok):
    srv = Live(create_app(model.model, tok, name="tiny", max_batch=8, ctx=96, compile_step=False))
    yield srv
    srv.close()


@pytest.mark.slow
def test_openai_client_completion_chat_and_stream(live):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    c = client.completions.create(model="tiny", prompt="Once upon", max_tokens=8, temperature=0)
    assert c.object == "text_completion" and c.choices[0].finish_reason in ("stop", "length")
    assert c.usage.prompt_tokens == 9 and c.usage.completion_tokens <= 8
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, temperature=0, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == chat.choices[0].message.content and finish == chat.choices[0].finish_reason
    assert live.idle()


def test_greedy_output_equals_compiled_generate(live, model, tok):
    prompt = "The cat sat on"
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=20, min_new_tokens=20)[0, ids.shape[1]:].tolist()
    eos = model.model.generation_config.eos_token_id
    want = tok.decode(out[:out.index(eos)] if eos in out else out, skip_special_tokens=True)
    r = httpx.post(live.url + "/v1/completions", json={"prompt": prompt, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want


def stream_text(url: str, body: dict) -> tuple[str, list[dict]]:
    events = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks


def test_concurrent_seeded_streams_equal_each_alone(live):
    bodies = [{"prompt": f"Story {i}:", "max_tokens": 24, "temperature": 1.1, "top_p": 0.95, "seed": i,
               "min_p": 0.02} for i in range(8)]
    alone = [stream_text(live.url, b)[0] for b in bodies]
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: stream_text(live.url, b)[0], bodies))
    assert together == alone
    assert len(set(alone)) > 1  # the seeds do differ
    assert live.idle()


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"prompt": "x" * 96}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 96}, "max_tokens"),
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_k": -1}, "top_k"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 2, 500]}, "prompt"),
    ({}, "prompt"),
])
def test_bad_requests_get_400_naming_the_field(live, body, param):
    r = httpx.post(live.url + "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_malformed_json_and_bad_messages(live):
    r = httpx.post(live.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert live.idle()


def test_stop_strings_cut_the_text(live):
    full, _ = stream_text(live.url, {"prompt": "abc", "max_tokens": 30, "temperature": 0})
    stop = full[6:8]
    cut = full[:full.index(stop)]
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "abc", "max_tokens": 30, "temperature": 0,
                                                       "stop": [stop]}).json()
    assert r["choices"][0]["text"] == cut and r["choices"][0]["finish_reason"] == "stop"
    streamed, chunks = stream_text(live.url, {"prompt": "abc", "max_tokens": 30, "temperature": 0, "stop": stop})
    assert streamed == cut and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert live.idle()


def test_a_client_that_disconnects_frees_its_slot(live):
    with httpx.stream("POST", live.url + "/v1/completions",
                      json={"prompt": "abc", "max_tokens": 90, "temperature": 1, "stream": True}) as r:
        lines = r.iter_lines()
        next(lines)
    assert live.idle()
    m = httpx.get(live.url + "/metrics").text
    assert 'sqc_requests_total{outcome="cancelled"}' in m


def test_a_failing_request_fails_alone(live):
    eng = live.state.engine
    orig = eng._prefill_chunk

    def broken(seq):
        if int(seq.prompt[0]) == 5:  # prompts starting with a space: a "kernel error"
            raise RuntimeError("kernel error")
        return orig(seq)

    eng._prefill_chunk = broken
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            bad = pool.submit(httpx.post, live.url + "/v1/completions", json={"prompt": " x", "max_tokens": 4})
            good = pool.submit(httpx.post, live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4})
            bad, good = bad.result(), good.result()
    finally:
        del eng._prefill_chunk
    assert bad.status_code == 500 and "kernel error" in bad.json()["error"]["message"]
    assert good.status_code == 200
    assert live.idle()


def test_metrics_health_models(live):
    httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3})
    m = httpx.get(live.url + "/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for name in ("sqc_requests_total", "sqc_prompt_tokens_total", "sqc_generated_tokens_total", "sqc_queue_depth",
                 "sqc_active_sequences", "sqc_step_seconds_bucket", "sqc_step_seconds_count"):
        assert name in m.text
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    assert httpx.get(live.url + "/v1/models").json()["data"][0]["id"] == "tiny"


def test_a_full_queue_gets_429_with_retry_after(model, tok):
    srv = Live(create_app(model.model, tok, name="tiny", max_batch=1, ctx=96, max_queue=1, compile_step=False))
    try:
        eng = srv.state.engine
        gate = threading.Event()
        orig = eng._decode
        eng._decode = lambda rows: (gate.wait(20), orig(rows))  # hold the one slot busy
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 3},
                                timeout=60)
            while not eng.active:
                time.sleep(0.01)
            second = pool.submit(httpx.post, srv.url + "/v1/completions", json={"prompt": "b", "max_tokens": 3},
                                 timeout=60)
            while srv.state.worker.queue_depth < 1:
                time.sleep(0.01)
            third = httpx.post(srv.url + "/v1/completions", json={"prompt": "c", "max_tokens": 3})
            gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        assert third.status_code == 429 and third.headers["retry-after"] == "1"
        assert third.json()["error"]["type"] == "rate_limit_error"
        assert srv.idle()
    finally:
        srv.close()


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight(model, tok, tmp_path):
    art = str(tmp_path / "tiny")
    sqc.save(model, art, tokenizer=tok)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sqc", "serve", art, "--port", str(port), "--no-compile"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "sqc serve did not come up"
            time.sleep(0.2)
        events = []
        with httpx.stream("POST", url + "/v1/completions",
                          json={"prompt": "abc", "max_tokens": 60, "stream": True, "temperature": 1, "seed": 1,
                                "model": "tiny"}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    if not events:
                        proc.send_signal(signal.SIGTERM)
                    events.append(line[6:])
        assert events[-1] == "[DONE]" and len(events) > 3  # it went on after the signal, to its end
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_load_served_reads_artifacts_and_hf_folders(model, tok, tmp_path):
    from sqc.serve import load_served

    ids = tok("abc", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
    art = tmp_path / "art"
    sqc.save(model, art, tokenizer=tok)
    m, t, name = load_served(str(art))
    assert name == "art" and t("abc", add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(m(ids).logits, want)
    hf = tmp_path / "hf"
    model.save_pretrained(hf, tokenizer=tok)
    m, t, name = load_served(str(hf))
    with torch.no_grad():
        assert name == "hf" and torch.equal(m(ids).logits, want)
    bare = tmp_path / "bare"
    sqc.save(model, bare)
    with pytest.raises(ValueError, match=r"sqc.save\(compiled, path, tokenizer=tokenizer\)"):
        load_served(str(bare))
    with pytest.raises(FileNotFoundError, match="neither manifest.json"):
        load_served(str(tmp_path))
