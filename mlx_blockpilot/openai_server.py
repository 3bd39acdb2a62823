"""An OpenAI-compatible HTTP server over a bundle (``python -m mlx_blockpilot.server`` runs it).

``POST /v1/chat/completions`` and ``/v1/completions`` (streamed as server-sent events
or not), ``GET /v1/models`` and ``GET /health``. Generations run one at a time, in
arrival order, on one worker thread behind a bounded queue (429 when it is full); a
client that disconnects cancels its generation. Each response carries the speculative
statistics in a ``blockpilot`` field. Built on the standard library's HTTP server.
"""

import json
import queue
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

from .api import chat_prompt, stream_generate
from .cache import make_cache
from .errors import BlockPilotError
from .options import GenerationOptions, OptionError, check_prompt_length
from .target import max_context

MAX_BODY = 16 * 1024 * 1024
DRAIN_BODY = 64 * 1024 * 1024  # a larger body is read (and dropped) up to this before its 413
LISTEN_BACKLOG = 128  # connections the kernel holds while the accept loop hands them to threads
PROBE_EVERY_S = 1.0
_NOTHING = object()
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(Exception):
    """An OpenAI-style error: HTTP status, message, parameter, code."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- request parsing


TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object", list: "array"}


def _field(body: Dict, name: str, kinds, default=None, check=None, why: str = ""):
    """``body[name]`` if it has one of ``kinds`` and passes ``check``; 400 otherwise."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(TYPE_NAMES[k] for k in kinds)
        raise RequestError(400, f"'{name}' must be of type {names}, got {json.dumps(value)[:60]}", name, "invalid_type")
    if check is not None and not check(value):
        raise RequestError(400, f"'{name}' {why}, got {json.dumps(value)[:60]}", name, "invalid_value")
    return value


def _content(message: Dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(400, "only text content parts are supported", f"messages[{i}].content",
                                   "invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(400, f"messages[{i}].content must be a string or a list of text parts",
                       f"messages[{i}].content", "invalid_type")


def _messages(body: Dict) -> List[Dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages",
                           "invalid_type" if "messages" in body else "missing_required_parameter")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        if m.get("role") not in ROLES:
            raise RequestError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role",
                               "invalid_value")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m, i)})
    return out


def _stop(body: Dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= 4):
        raise RequestError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop",
                           "invalid_type")
    return stop


@dataclass
class Request:
    """A validated generation request."""

    chat: bool
    prompt: List[int]
    options: Dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    stop: List[str] = field(default_factory=list)
    model: str = ""


def parse_request(bundle, body: Any, chat: bool, model_name: str) -> Request:
    """Validate an OpenAI request body and tokenize its prompt (raises ``RequestError``)."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    number = (int, float)
    temperature = _field(body, "temperature", number, 1.0, lambda v: 0 <= v <= 2, "must be between 0 and 2")
    top_p = _field(body, "top_p", number, 1.0)
    top_k = _field(body, "top_k", (int,), 0)
    seed = _field(body, "seed", (int,))
    max_tokens_name = "max_completion_tokens" if chat and body.get("max_tokens") is None else "max_tokens"
    max_tokens = _field(body, max_tokens_name, (int,), 256 if chat else 16)
    _field(body, "n", (int,), 1, lambda v: v == 1, "must be 1 (one choice per request)")
    for name in ("presence_penalty", "frequency_penalty"):
        _field(body, name, number, 0, lambda v: v == 0, "is not supported (only 0)")
    if _field(body, "logprobs", (bool, int), False) not in (False, 0):
        raise RequestError(400, "'logprobs' is not supported", "logprobs", "unsupported_parameter")
    stream = _field(body, "stream", (bool,), False)
    stream_options = _field(body, "stream_options", (dict,), {})
    include_usage = _field(stream_options, "include_usage", (bool,), False)
    stop = _stop(body)
    block_size = body.get("block_size")
    params = {"max_tokens": max_tokens_name}
    try:
        options = GenerationOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=seed, block_size=block_size)
        options.resolve(bundle.draft.config.block_size, bundle.policy)
    except OptionError as e:
        raise RequestError(400, f"'{params.get(e.option, e.option)}': {e}", params.get(e.option, e.option),
                           "invalid_value") from None
    _field(body, "model", (str,))

    tok = bundle.tokenizer
    if chat:
        messages = _messages(body)
        if not getattr(tok, "has_chat_template", False):
            raise RequestError(400, "this model has no chat template; use /v1/completions", "messages", "invalid_value")
        try:
            prompt = chat_prompt(bundle, messages)
        except Exception as e:  # the template may reject a conversation (e.g. role order)
            raise RequestError(400, f"the chat template rejected the messages: {e}", "messages",
                               "invalid_value") from None
        param = "messages"
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt = tok.encode(prompt) if prompt else []
        elif not (isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            raise RequestError(400, "'prompt' must be a string or a list of token ids", "prompt",
                               "invalid_type" if "prompt" in body else "missing_required_parameter")
        vocab = bundle.draft.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestError(400, f"'prompt' token ids must be in [0, {vocab})", "prompt", "invalid_value")
        param = "prompt"
    if not prompt:
        raise RequestError(400, "the prompt is empty", param, "invalid_value")
    try:
        check_prompt_length(len(prompt), max_context(bundle.model))
    except OptionError as e:
        raise RequestError(400, str(e), param, "context_length_exceeded") from None
    kwargs = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if block_size is not None:
        kwargs["block_size"] = block_size
    return Request(chat, prompt, kwargs, stream, include_usage, stop, body.get("model") or model_name)


# ---------------------------------------------------------------- the worker


@dataclass
class Job:
    request: Request
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)


class Engine:
    """One worker thread runs the jobs in arrival order; the prompt cache is kept between them."""

    def __init__(self, bundle, max_queue: int = 16):
        self.bundle = bundle
        self.jobs: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=max_queue)
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.busy = False
        self.tokenizer_lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="blockpilot-worker", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> Job:
        job = Job(request)
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            self.counts["rejected"] += 1
            raise RequestError(429, "the server is busy (request queue full); retry later", None, "queue_full",
                               "rate_limit_error") from None
        return job

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _run(self) -> None:
        cache = make_cache(self.bundle.model, self.bundle.draft)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancel.is_set():
                self.counts["cancelled"] += 1
                continue
            self.busy = True
            gen = stream_generate(self.bundle, job.request.prompt, prompt_cache=cache, **job.request.options)
            try:
                for r in gen:
                    if job.cancel.is_set():
                        self.counts["cancelled"] += 1
                        break
                    job.events.put(r)
                else:
                    self.counts["completed"] += 1
            except Exception as e:  # reported to the client; the cache may be half-updated
                self.counts["failed"] += 1
                cache = make_cache(self.bundle.model, self.bundle.draft)
                job.events.put(e)
            finally:
                gen.close()  # closed at a yield point: the cache holds exactly the committed tokens
                self.busy = False
            job.events.put(None)


# ---------------------------------------------------------------- responses


class StopMatcher:
    """Cuts the text at the first stop string; holds back what could start one."""

    def __init__(self, stop: List[str]):
        self.stop, self.pending, self.hit = stop, "", False

    def feed(self, text: str) -> str:
        if not self.stop:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.hit = self.pending[:cut], "", True
            return out
        hold = max(len(s) - 1 for s in self.stop)
        hold = next((k for k in range(min(hold, len(self.pending)), 0, -1)
                     if any(s.startswith(self.pending[-k:]) for s in self.stop)), 0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stats(r) -> Dict[str, Any]:
    return {
        "block_size": r.block_size,
        "mean_acceptance": round(r.mean_acceptance, 4),
        "acceptance_lengths": r.acceptance_lengths,
        "round_widths": r.round_widths,
        "prefill_s": round(r.prefill_s, 4),
        "policy_s": round(r.policy_s, 4),
        "decode_tokens_per_s": round(r.decode_tokens_per_s, 2),
    }


def usage(r) -> Dict[str, int]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generation_tokens,
            "total_tokens": r.prompt_tokens + r.generation_tokens}


def peer_state(sock: socket.socket) -> str:
    """``"open"``, ``"eof"`` (the client will send nothing more: it either closed the
    connection or only its sending side) or ``"gone"`` (the connection is reset)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable and sock.recv(1, socket.MSG_PEEK) == b"":
            return "eof"
        return "open"
    except (OSError, ValueError):
        return "gone"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlx_blockpilot"
    engine: Engine
    model_name: str
    poll_s = 0.05

    def log_message(self, format, *args):  # noqa: A002  (quiet unless --verbose)
        if self.server.verbose:
            super().log_message(format, *args)

    # ----- plumbing

    def _send_json(self, status: int, payload: Dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError) -> None:
        self._send_json(e.status, e.body())

    def _read_json(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411 if length is None else 400, "a Content-Length header is required")
        if int(length) > MAX_BODY:
            self.close_connection = True
            self._drain(min(int(length), DRAIN_BODY))  # so the client reads the 413, not a broken pipe
            raise RequestError(413, f"the request body is larger than {MAX_BODY} bytes")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise RequestError(400, "the request body is nested too deeply") from None

    def _drain(self, n: int) -> None:
        while n > 0:
            chunk = self.rfile.read(min(n, 1 << 20))
            if not chunk:
                return
            n -= len(chunk)

    def _events(self, job: Job, probe: bytes):
        """The job's responses; cancels the job when the client goes away.

        A client that stops sending may have closed the connection or only half-closed it
        (it still waits for the answer). Writing ``probe`` (bytes every client ignores)
        tells them apart: a closed connection answers it with a reset. Without a probe
        (empty) a half-closed client is served to the end.
        """
        checked = probed = time.monotonic() - PROBE_EVERY_S
        while True:
            try:
                item = job.events.get(timeout=self.poll_s)
            except queue.Empty:
                item = _NOTHING
            if time.monotonic() - checked >= self.poll_s:
                checked = time.monotonic()
                state = peer_state(self.connection)
                if state == "eof" and probe and checked - probed >= PROBE_EVERY_S:
                    probed = checked
                    try:
                        self.wfile.write(probe)
                        self.wfile.flush()
                    except OSError:
                        state = "gone"
                if state == "gone":
                    job.cancel.set()
                    return
            if item is _NOTHING:
                continue
            if item is None:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    # ----- routes

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._send_json(200, {"status": "ok", "queued": self.engine.jobs.qsize(), "busy": self.engine.busy,
                                  **self.engine.counts})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": self.server.started, "owned_by": "mlx_blockpilot"}
            ]})
        else:
            self._error(RequestError(404, f"no route GET {path}", code="not_found"))

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        try:
            if path not in ("/v1/chat/completions", "/v1/completions"):
                raise RequestError(404, f"no route POST {path}", code="not_found")
            body = self._read_json()
            with self.engine.tokenizer_lock:  # HF tokenizers are not safe to share between threads
                request = parse_request(self.engine.bundle, body, path.endswith("chat/completions"), self.model_name)
            job = self.engine.submit(request)
        except RequestError as e:
            self._error(e)
            return
        try:
            if request.stream:
                self._stream(job)
            else:
                self._complete(job)
        except (BrokenPipeError, ConnectionResetError):
            job.cancel.set()
            self.close_connection = True
        finally:
            job.cancel.set()  # a no-op when finished; stops the worker if we left early

    def _ids(self, chat: bool) -> Tuple[str, str]:
        prefix = "chatcmpl-" if chat else "cmpl-"
        return prefix + uuid.uuid4().hex[:24], "chat.completion" if chat else "text_completion"

    def _complete(self, job: Job) -> None:
        req = job.request
        matcher, text, r = StopMatcher(req.stop), [], None
        try:
            # an interim 1xx response every HTTP/1.1 client skips; HTTP/1.0 has none, so no probe
            probe = b"HTTP/1.1 100 Continue\r\n\r\n" if self.request_version != "HTTP/1.0" else b""
            for r in self._events(job, probe):
                text.append(matcher.feed(r.text))
                if matcher.hit:
                    break
        except BlockPilotError as e:
            self._error(RequestError(400, str(e)))
            return
        except Exception as e:
            self._error(RequestError(500, f"generation failed: {e}", code="server_error", kind="server_error"))
            return
        if job.cancel.is_set() or r is None:  # the client went away
            self.close_connection = True
            return
        text.append(matcher.flush())
        finish = "stop" if matcher.hit else (r.finish_reason or "length")
        cid, obj = self._ids(req.chat)
        content = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                   "finish_reason": finish} if req.chat else
                  {"index": 0, "text": content, "logprobs": None, "finish_reason": finish})
        self._send_json(200, {"id": cid, "object": obj, "created": int(time.time()), "model": req.model,
                              "choices": [choice], "usage": usage(r), "blockpilot": stats(r)})

    def _stream(self, job: Job) -> None:
        req = job.request
        cid, obj = self._ids(req.chat)
        obj += ".chunk" if req.chat else ""
        created = int(time.time())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(payload) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        def chunk(text: Optional[str], finish: Optional[str] = None, extra: Optional[Dict] = None) -> Dict:
            if req.chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = {"id": cid, "object": obj, "created": created, "model": req.model, "choices": [choice]}
            if req.include_usage:
                out["usage"] = None
            out.update(extra or {})
            return out

        if req.chat:
            first = chunk("")
            first["choices"][0]["delta"]["role"] = "assistant"
            send(first)
        matcher, r = StopMatcher(req.stop), None
        try:
            for r in self._events(job, b": waiting\n\n"):
                piece = matcher.feed(r.text)
                if piece:
                    send(chunk(piece))
                if matcher.hit:
                    break
        except BlockPilotError as e:
            send(RequestError(400, str(e)).body())
            return
        except Exception as e:
            send(RequestError(500, f"generation failed: {e}", code="server_error", kind="server_error").body())
            return
        if job.cancel.is_set() or r is None:
            return
        rest = matcher.flush()
        if rest:
            send(chunk(rest))
        finish = "stop" if matcher.hit else (r.finish_reason or "length")
        send(chunk(None, finish, {"blockpilot": stats(r)}))
        if req.include_usage:
            final = chunk(None, None, {"usage": usage(r), "blockpilot": stats(r)})
            final["choices"] = []
            send(final)
        send("[DONE]")


# ---------------------------------------------------------------- entry points


class Server(ThreadingHTTPServer):
    """The standard threading HTTP server with a deeper listen backlog (a burst beyond the
    queue gets 429s, not connection resets) and one log line for a client that hangs up."""

    request_queue_size = LISTEN_BACKLOG

    def handle_error(self, request, client_address):
        kind, error = sys.exc_info()[:2]
        if isinstance(error, (ConnectionError, TimeoutError)):
            print(f"{client_address[0]}: client hung up ({kind.__name__})", file=sys.stderr, flush=True)
        else:
            super().handle_error(request, client_address)


def make_server(bundle, host: str = "127.0.0.1", port: int = 8080, max_queue: int = 16,
                model_name: Optional[str] = None, verbose: bool = False) -> ThreadingHTTPServer:
    """A ready-to-serve HTTP server (call ``serve_forever``; ``shutdown`` stops it)."""
    engine = Engine(bundle, max_queue)
    name = model_name or (bundle.path.name if bundle.path else "mlx-blockpilot")
    handler = type("BoundHandler", (Handler,), {"engine": engine, "model_name": name})
    server = Server((host, port), handler)
    server.daemon_threads = True
    server.verbose = verbose
    server.started = int(time.time())
    server.engine = engine
    return server
