"""The OpenAI-compatible server, started for real on a free localhost port.

The official ``openai`` client gets exactly mlx-lm's greedy answers (streamed and not);
malformed requests get OpenAI-style 400s; a full queue gets 429; a client that goes away
cancels its generation; a bounded load test checks every answer and the server's memory.
"""

import http.client
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import openai
import pytest
from mlx_lm.generate import generate_step

PROMPTS = [
    "hello",
    "what is the capital of france?",
    "the quick brown fox",
    "speculative decoding",
    "tiny tokenizer for tests",
    "paris is the capital",
    "0123456789",
    "jumps over the lazy dog",
]


def greedy(fx, ids, max_tokens):
    """mlx-lm greedy decoding of ``ids``: (text as mlx-lm's detokenizer streams it, token count)."""
    detok = fx.tokenizer.detokenizer
    detok.reset()
    n = 0
    for tok, _ in generate_step(mx.array(ids), fx.model, max_tokens=max_tokens):
        n += 1
        if tok in fx.tokenizer.eos_token_ids:
            break
        detok.add_token(tok)
    detok.finalize()
    return detok.text, n


def chat_ids(fx, text):
    return fx.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


class Server:
    def __init__(self, fx, *extra):
        cmd = [sys.executable, "-m", "mlx_blockpilot.server", "--target", str(fx.target_dir),
               "--draft", str(fx.draft_dir), "--port", "0", *map(str, extra)]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.log = []
        line = self.proc.stderr.readline()
        match = re.search(r"http://([\d.]+):(\d+)/v1", line)
        assert match, f"server did not start: {line}"
        self.host, self.port = match.group(1), int(match.group(2))
        self.base = f"http://{self.host}:{self.port}/v1"
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()  # keep it drained

    def client(self):
        return openai.OpenAI(base_url=self.base, api_key="none", max_retries=0, timeout=120)

    def request(self, method, path, body=None, raw=None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        return resp.status, json.loads(payload) if payload else None

    def health(self):
        return self.request("GET", "/health")[1]

    def rss_kb(self):
        status = open(f"/proc/{self.proc.pid}/status").read()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def wait_idle(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.health()
            if not h["busy"] and h["queued"] == 0:
                return h
            time.sleep(0.05)
        raise AssertionError(f"server still busy: {h}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(llama):
    s = Server(llama, "--max-queue", "2")
    yield s
    s.stop()


def open_stream(server, path, body):
    """Start a streamed request on a raw socket; returns (socket, first bytes of the body)."""
    sock = socket.create_connection((server.host, server.port), timeout=60)
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while b"data: " not in got.split(b"\r\n\r\n", 1)[-1]:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    return sock, got


def test_openai_client_chat_and_completions(server, llama):
    client = server.client()
    for prompt in PROMPTS[:3]:
        want, n = greedy(llama, chat_ids(llama, prompt), 24)
        r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=24, temperature=0)
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason == ("length" if n == 24 else "stop")
        assert r.usage.prompt_tokens == len(chat_ids(llama, prompt)) and r.usage.completion_tokens == n
        ext = r.model_extra["blockpilot"]
        assert ext["block_size"] == llama.draft.config.block_size
        assert sum(ext["acceptance_lengths"]) == n - 1 and ext["mean_acceptance"] >= 1
        assert len(ext["round_widths"]) == len(ext["acceptance_lengths"])
        assert max(ext["round_widths"]) <= llama.draft.config.block_size

        stream = client.chat.completions.create(model="any", messages=[{"role": "user", "content": prompt}],
                                                max_tokens=24, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
        assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
        assert chunks[-2].model_extra["blockpilot"]["acceptance_lengths"] == ext["acceptance_lengths"]

    ids = llama.tokenizer.encode("the quick brown")
    want, n = greedy(llama, ids, 20)
    r = client.completions.create(model="any", prompt="the quick brown", max_tokens=20, temperature=0,
                                  extra_body={"block_size": 4})
    assert r.choices[0].text == want and r.model_extra["blockpilot"]["block_size"] == 4
    r = client.completions.create(model="any", prompt=ids, max_tokens=20, temperature=0)  # token ids
    assert r.choices[0].text == want
    stream = client.completions.create(model="any", prompt="the quick brown", max_tokens=20, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == want


def test_models_health_seed_and_stop(server, llama):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [llama.target_dir.name]
    assert server.health()["status"] == "ok"
    sampled = [client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=16, temperature=1.0, seed=5).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    want, _ = greedy(llama, chat_ids(llama, "hello"), 24)
    stop = want[5:8]
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hello"}], max_tokens=24,
                                       temperature=0, stop=[stop])
    assert r.choices[0].message.content == want[: want.index(stop)] and r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want[: want.index(stop)]


CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        (CHAT, b'{"messages": [', 400, None),
        (CHAT, b"\xff\xfe", 400, None),
        (CHAT, b"[" * 100000, 400, None),
        (CHAT, {"messages": MSG, "temperature": float("nan")}, 400, "temperature"),
        (CHAT, {"messages": MSG, "seed": -1}, 400, "seed"),
        (CHAT, {"messages": MSG, "seed": 2**70}, 400, "seed"),
        (CHAT, [1, 2], 400, None),
        (CHAT, {"messages": "hi"}, 400, "messages"),
        (CHAT, {}, 400, "messages"),
        (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        (CHAT, {"messages": MSG, "max_tokens": "8"}, 400, "max_tokens"),
        (CHAT, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
        (CHAT, {"messages": MSG, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
        (CHAT, {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
        (CHAT, {"messages": MSG, "temperature": -0.1}, 400, "temperature"),
        (CHAT, {"messages": MSG, "temperature": 2.5}, 400, "temperature"),
        (CHAT, {"messages": MSG, "top_p": 0}, 400, "top_p"),
        (CHAT, {"messages": MSG, "top_p": 1.5}, 400, "top_p"),
        (CHAT, {"messages": MSG, "top_k": -1}, 400, "top_k"),
        (CHAT, {"messages": MSG, "seed": 1.5}, 400, "seed"),
        (CHAT, {"messages": MSG, "stream": "yes"}, 400, "stream"),
        (CHAT, {"messages": MSG, "stream_options": {"include_usage": 1}}, 400, "include_usage"),
        (CHAT, {"messages": MSG, "n": 3}, 400, "n"),
        (CHAT, {"messages": MSG, "stop": 7}, 400, "stop"),
        (CHAT, {"messages": MSG, "block_size": 0}, 400, "block_size"),
        (CHAT, {"messages": MSG, "block_size": "auto"}, 400, "block_size"),
        (CHAT, {"messages": MSG, "model": 3}, 400, "model"),
        (CHAT, {"messages": [{"role": "user", "content": "fox " * 3000}]}, 400, "messages"),
        ("/v1/completions", {"prompt": 5}, 400, "prompt"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
        ("/v1/completions", {"prompt": list(range(5, 305)) * 8}, 400, "prompt"),
        ("/v1/nothing", {}, 404, None),
    ],
)
def test_malformed_requests(server, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    got, payload = server.request("POST", path, body=None if raw else body, raw=raw)
    assert got == status
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    assert err["type"] == "invalid_request_error"
    if param == "messages" and "fox" in json.dumps(body):
        assert err["code"] == "context_length_exceeded"


def test_full_queue_gets_429_and_disconnects_cancel(server, llama):
    server.wait_idle()
    before = server.health()
    long = {"messages": MSG, "max_tokens": 1500, "temperature": 0}
    running, _ = open_stream(server, CHAT, long)  # runs
    waiting = [open_stream_later(server, long) for _ in range(2)]  # fill the queue (size 2)
    deadline = time.monotonic() + 30
    while server.health()["queued"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    status, payload = server.request("POST", CHAT, long)
    assert status == 429 and payload["error"]["code"] == "queue_full"
    for sock in [running, *waiting]:
        sock.close()
    h = server.wait_idle()
    assert h["cancelled"] - before["cancelled"] == 3 and h["rejected"] - before["rejected"] == 1
    assert h["completed"] == before["completed"]

    # A non-streamed request whose client goes away is cancelled too.
    sock = socket.create_connection((server.host, server.port))
    data = json.dumps(long).encode()
    sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    deadline = time.monotonic() + 30
    while not server.health()["busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    sock.close()
    assert server.wait_idle()["cancelled"] - before["cancelled"] == 4

    # The prompt cache survived the cancellations: answers are still exact.
    want, _ = greedy(llama, chat_ids(llama, "hi"), 24)
    assert server.client().chat.completions.create(model="x", messages=MSG, max_tokens=24,
                                                   temperature=0).choices[0].message.content == want


def open_stream_later(server, body):
    """Send a streamed request without waiting for its first event (it sits in the queue)."""
    sock = socket.create_connection((server.host, server.port), timeout=60)
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_load_every_answer_exact_and_memory_flat(llama):
    server = Server(llama, "--max-queue", "64")
    try:
        max_tokens = 6
        want = {p: greedy(llama, chat_ids(llama, p), max_tokens)[0] for p in PROMPTS}
        want_raw = {p: greedy(llama, llama.tokenizer.encode(p), max_tokens)[0] for p in PROMPTS}
        client = server.client()
        rng = random.Random(0)
        plan = [(rng.choice(PROMPTS), rng.random()) for _ in range(240)]

        def one(item):
            prompt, u = item
            if u < 0.1:  # cancelled mid-stream
                sock, got = open_stream(server, CHAT, {"messages": [{"role": "user", "content": prompt}],
                                                       "max_tokens": 1000, "temperature": 0})
                sock.close()
                return "cancelled"
            if u < 0.4:
                stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": prompt}],
                                                        max_tokens=max_tokens, temperature=0, stream=True)
                return "".join(c.choices[0].delta.content or "" for c in stream) == want[prompt]
            if u < 0.7:
                r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=max_tokens, temperature=0)
                return r.choices[0].message.content == want[prompt]
            r = client.completions.create(model="x", prompt=prompt, max_tokens=max_tokens, temperature=0)
            return r.choices[0].text == want_raw[prompt]

        with ThreadPoolExecutor(4) as pool:
            warm = list(pool.map(one, plan[:40]))
            server.wait_idle()
            rss_before = server.rss_kb()
            rest = list(pool.map(one, plan[40:]))
        h = server.wait_idle()
        rss_after = server.rss_kb()
        results = warm + rest
        cancelled = results.count("cancelled")
        assert cancelled >= 10 and all(r is True for r in results if r != "cancelled")
        assert h["completed"] + h["cancelled"] == len(results) and h["cancelled"] >= 1
        assert h["rejected"] == h["failed"] == 0
        print(f"RSS {rss_before / 1024:.1f} MB -> {rss_after / 1024:.1f} MB after {len(rest)} requests")
        assert rss_after - rss_before < 30 * 1024, (rss_before, rss_after)
    finally:
        server.stop()


def _status_of(sock) -> int:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    lines = [line for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ") and not line.startswith(b"HTTP/1.1 100")]
    return int(lines[0].split()[1]) if lines else 0


def test_hostile_clients_get_answers_not_resets(server, llama):
    server.wait_idle()
    small = {"messages": MSG, "max_tokens": 4, "temperature": 0}

    # a burst far beyond the queue: every request gets an HTTP answer (200 or 429), none a reset
    def post(_):
        try:
            return server.request("POST", CHAT, small)[0]
        except OSError as e:
            return type(e).__name__
    with ThreadPoolExecutor(26) as pool:
        statuses = list(pool.map(post, range(26)))
    assert set(statuses) <= {200, 429} and 200 in statuses, statuses

    # a client that half-closes after its request still gets the whole answer
    server.wait_idle()
    sock = socket.create_connection((server.host, server.port), timeout=60)
    data = json.dumps(small).encode()
    sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    sock.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    sock.close()
    body = reply.split(b"\r\n\r\n")[-1]
    assert b" 200 OK" in reply and json.loads(body)["choices"][0]["message"]["content"] == greedy(llama, chat_ids(llama, "hi"), 4)[0]

    # a 20 MB body: the client reads the 413 instead of a broken pipe
    sock = socket.create_connection((server.host, server.port), timeout=60)
    big = b"x" * (20 * 1024 * 1024)
    sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(big)}\r\n\r\n".encode() + big)
    assert _status_of(sock) == 413
    sock.close()

    # clients that hang up in the middle of their headers leave one log line each, no traceback
    before = len(server.log)
    for linger in (False, True):
        sock = socket.create_connection((server.host, server.port), timeout=60)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        if linger:  # a reset rather than an orderly close
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    time.sleep(1.0)
    new = "".join(server.log[before:])
    assert "Traceback" not in new, new
    assert server.health()["busy"] is False


@pytest.mark.parametrize("argv, match", [(["--port", "99999"], "--port must be in 0..65535"),
                                         (["--port", "-1"], "--port must be in 0..65535"),
                                         (["--max-queue", "0"], "--max-queue must be >= 1")])
def test_bad_server_arguments(llama, capsys, argv, match):
    from mlx_blockpilot.cli.server import main

    code = main(["--target", str(llama.target_dir), "--draft", str(llama.draft_dir), *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1
