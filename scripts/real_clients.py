"""The gateway's mock and upstream modes, driven by real clients: the
official `openai` Python package and LiteLLM.

Run by scripts/real_clients.sh, which starts the gateway with its embedded
demo config and passes its address in TOLLGATE_BASE (e.g.
http://127.0.0.1:PORT), and the gateway binary in TOLLGATE_GATEWAY_BIN. Each
check runs with keys of its own, added here through the admin routes, so that
one check's throttle never denies another's requests.

With TOLLGATE_GATEWAY_BIN, the checks then run again through a gateway in
upstream mode in front of the first one, and the upstream checks below
through a gateway in front of a vLLM-like backend served from this process.
"""

import asyncio
import http.server
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request

# Before LiteLLM is imported: its bundled price list, no telemetry, nothing
# fetched (scripts/real_clients.sh sets them too).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
os.environ.setdefault("LITELLM_TELEMETRY", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import litellm  # noqa: E402
import openai  # noqa: E402
from openai import AsyncOpenAI, OpenAI  # noqa: E402

litellm.telemetry = False
# No "Provider List" banners for a model LiteLLM has no price for.
litellm.suppress_debug_info = True

# The gateway under test: the mock-mode gateway first, then gateways in
# upstream mode (see `use`).
MOCK_BASE = os.environ["TOLLGATE_BASE"].rstrip("/")
BASE = MOCK_BASE
API = BASE + "/v1"
ADMIN_KEY = os.environ.get("TOLLGATE_ADMIN_KEY", "change-me")
# The demo config's key, plan `free`: 1 request/s and bursts of 2 on the chat
# route. Only the openai client's rate-limit check uses it.
FREE_KEY = os.environ.get("TOLLGATE_FREE_KEY", "demo-free-key")
MODEL = "mock"
PROMPT = "Say hello to the gateway."
MESSAGES = [{"role": "user", "content": PROMPT}]
PROMPT_TOKENS = -(-len(PROMPT) // 4)  # ceil(chars / 4), as the mock counts
MAX_TOKENS = 6
TEXT = "tok " * MAX_TOKENS


def add_key(key_id, value, plan, base=None):
    """Adds a key through the admin routes (POST /admin/keys) of the
    gateway at `base` (the one under test by default)."""
    req = urllib.request.Request(
        (base or BASE) + "/admin/keys",
        data=json.dumps({"id": key_id, "value": value, "plan": plan}).encode(),
        headers={"x-admin-key": ADMIN_KEY, "content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as res:
        assert res.status in (200, 201), res.status


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def eq(got, want, what):
    check(got == want, f"{what}: got {got!r}, want {want!r}")


def check_head(obj, object_name, id_prefix):
    eq(obj.object, object_name, "object")
    check(obj.id.startswith(id_prefix), f"id {obj.id!r} starts with {id_prefix!r}")
    check(isinstance(obj.created, int) and obj.created > 1_600_000_000, f"created {obj.created!r}")
    eq(obj.model, MODEL, "model")


def check_usage(usage, completion_tokens=MAX_TOKENS):
    check(usage is not None, "usage present")
    eq(usage.prompt_tokens, PROMPT_TOKENS, "usage.prompt_tokens")
    eq(usage.completion_tokens, completion_tokens, "usage.completion_tokens")
    eq(usage.total_tokens, PROMPT_TOKENS + completion_tokens, "usage.total_tokens")


# --- the official openai client -------------------------------------------

PRO_KEY = "real-clients-openai"


def client(key=PRO_KEY, max_retries=0):
    return OpenAI(base_url=API, api_key=key, max_retries=max_retries, timeout=30)


def openai_completion():
    c = client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS)
    check_head(c, "text_completion", "cmpl-")
    eq(len(c.choices), 1, "choices")
    eq(c.choices[0].text, TEXT, "text")
    eq(c.choices[0].finish_reason, "length", "finish_reason")
    check_usage(c.usage)
    return PROMPT_TOKENS + MAX_TOKENS


def openai_completion_stop():
    # The mock produced fewer tokens than max_tokens: finish_reason `stop`.
    c = client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, extra_body={"mock_completion_tokens": 2}
    )
    eq(c.choices[0].text, "tok tok ", "text")
    eq(c.choices[0].finish_reason, "stop", "finish_reason")
    check_usage(c.usage, completion_tokens=2)
    return PROMPT_TOKENS + 2


def openai_chat():
    c = client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
    check_head(c, "chat.completion", "chatcmpl-")
    eq(len(c.choices), 1, "choices")
    eq(c.choices[0].index, 0, "index")
    eq(c.choices[0].message.role, "assistant", "role")
    eq(c.choices[0].message.content, TEXT, "content")
    eq(c.choices[0].finish_reason, "length", "finish_reason")
    check_usage(c.usage)
    return PROMPT_TOKENS + MAX_TOKENS


def openai_chat_real_bodies():
    # What newer code sends: max_completion_tokens, content parts, and an
    # assistant turn that only called a tool (content None).
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": PROMPT}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    c = client().chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3)
    eq(c.choices[0].message.content, "tok " * 3, "content")
    eq(c.choices[0].finish_reason, "length", "finish_reason")
    # The assistant's call is prompt text too: its name and arguments.
    chars = len("Be brief.") + len(PROMPT) + len("f") + len("{}") + len("42")
    eq(c.usage.prompt_tokens, -(-chars // 4), "usage.prompt_tokens")
    eq(c.usage.completion_tokens, 3, "usage.completion_tokens")
    return c.usage.prompt_tokens + 3


def chat_stream(include_usage):
    kwargs = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True, **kwargs
    )
    chunks = list(stream)
    for ch in chunks:
        check_head(ch, "chat.completion.chunk", "chatcmpl-")
    eq(len({ch.id for ch in chunks}), 1, "one id on every chunk")
    if include_usage:
        *chunks, last = chunks
        eq(last.choices, [], "the usage chunk's choices")
        check_usage(last.usage)
    for ch in chunks:
        eq(len(ch.choices), 1, "choices of a content chunk")
        check(ch.usage is None, "usage only on the last chunk, and only when asked")
    first, *middle, final = chunks
    eq(first.choices[0].delta.role, "assistant", "the first delta's role")
    check(first.choices[0].finish_reason is None, "no finish_reason on the first chunk")
    eq(len(middle), MAX_TOKENS, "one chunk per token")
    content = (first.choices[0].delta.content or "") + "".join(
        ch.choices[0].delta.content or "" for ch in middle
    )
    eq(content, TEXT, "assembled content")
    for ch in middle:
        check(ch.choices[0].finish_reason is None, "no finish_reason before the last chunk")
    eq(final.choices[0].finish_reason, "length", "finish_reason of the last choice chunk")
    check(not final.choices[0].delta.content, "the finishing chunk carries no content")
    return PROMPT_TOKENS + MAX_TOKENS


def openai_chat_stream():
    return chat_stream(include_usage=False)


def openai_chat_stream_include_usage():
    return chat_stream(include_usage=True)


def openai_async_chat_stream_include_usage():
    async def run():
        async with AsyncOpenAI(base_url=API, api_key=PRO_KEY, max_retries=0, timeout=30) as c:
            stream = await c.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                max_tokens=MAX_TOKENS,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [ch async for ch in stream]

    *chunks, last = asyncio.run(run())
    eq(last.choices, [], "the usage chunk's choices")
    check_usage(last.usage)
    eq("".join(ch.choices[0].delta.content or "" for ch in chunks), TEXT, "assembled content")
    eq(chunks[-1].choices[0].finish_reason, "length", "finish_reason")
    return PROMPT_TOKENS + MAX_TOKENS


def openai_completion_stream_include_usage():
    stream = client().completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *chunks, last = chunks
    eq(last.choices, [], "the usage chunk's choices")
    check_usage(last.usage)
    for ch in chunks:
        check_head(ch, "text_completion", "cmpl-")
    eq("".join(ch.choices[0].text for ch in chunks), TEXT, "assembled text")
    eq(chunks[-1].choices[0].finish_reason, "length", "finish_reason")
    return PROMPT_TOKENS + MAX_TOKENS


def openai_models():
    models = client().models.list()
    ids = [m.id for m in models]
    check(MODEL in ids, f"{MODEL!r} in {ids!r}")
    for m in models:
        eq(m.object, "model", "object")
        check(isinstance(m.created, int), "created")
        check(m.owned_by, "owned_by")
    one = client().models.retrieve(MODEL)
    eq(one.id, MODEL, "retrieved id")
    eq(one.object, "model", "retrieved object")
    try:
        client().models.retrieve("no-such-model")
    except openai.NotFoundError as e:
        eq(e.status_code, 404, "unknown model status")
        eq(e.code, "model_not_found", "unknown model code")
    else:
        check(False, "an unknown model is a NotFoundError")
    return 0


def openai_bad_key():
    try:
        client("not-a-key").chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    except openai.AuthenticationError as e:
        eq(e.status_code, 401, "status")
        eq(e.code, "invalid_api_key", "code")
        return 0
    raise AssertionError("a bad key was served")


def openai_rate_limited():
    free = client(FREE_KEY)
    served = 0
    for _ in range(10):
        try:
            free.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
            served += 1
        except openai.RateLimitError as e:
            eq(e.status_code, 429, "status")
            eq(e.code, "rate_limit_exceeded", "code")
            headers = e.response.headers
            check(int(headers["retry-after-ms"]) > 0, "retry-after-ms")
            check(int(headers["retry-after"]) > 0, "retry-after")
            check(served >= 1, "the burst is served before the limit")
            return served * (PROMPT_TOKENS + 1)
    raise AssertionError(f"{served} requests in a row were served on the free plan")


def openai_retries_after_retry_after_ms():
    # Right after openai_rate_limited the free key is denied again; a client
    # allowed to retry waits what retry-after-ms says and is then served.
    c = client(FREE_KEY, max_retries=3).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=1
    )
    eq(c.status_code, 200, "status after the client's own retries")
    check(c.retries_taken >= 1, f"the client retried ({c.retries_taken} retries)")
    return PROMPT_TOKENS + 1


# --- LiteLLM ----------------------------------------------------------------

LITELLM_KEY = "real-clients-litellm"
LITELLM_FREE_KEY = "real-clients-litellm-free"


def litellm_args(key=LITELLM_KEY):
    return {
        "model": "openai/" + MODEL,
        "api_base": API,
        "api_key": key,
        "messages": MESSAGES,
        "max_tokens": MAX_TOKENS,
        "num_retries": 0,
        "max_retries": 0,
        "timeout": 30,
    }


def litellm_completion():
    r = litellm.completion(**litellm_args())
    eq(r.choices[0].message.content, TEXT, "content")
    eq(r.choices[0].finish_reason, "length", "finish_reason")
    check_usage(r.usage)
    return PROMPT_TOKENS + MAX_TOKENS


def litellm_stream(include_usage, asynchronous=False):
    kwargs = {"stream_options": {"include_usage": True}} if include_usage else {}
    if asynchronous:
        # acompletion streams through LiteLLM's own async transport.
        async def run():
            stream = await litellm.acompletion(**litellm_args(), stream=True, **kwargs)
            return [ch async for ch in stream]

        chunks = asyncio.run(run())
    else:
        chunks = list(litellm.completion(**litellm_args(), stream=True, **kwargs))
    check(chunks, "chunks")
    content = "".join(
        (ch.choices[0].delta.content or "") for ch in chunks if ch.choices
    )
    eq(content, TEXT, "assembled content")
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    eq(reasons, ["length"], "finish_reasons")
    if include_usage:
        usage = [getattr(ch, "usage", None) for ch in chunks]
        usage = [u for u in usage if u is not None]
        check(usage, "a chunk with the usage")
        check_usage(usage[-1])
    built = litellm.stream_chunk_builder(chunks, messages=MESSAGES)
    eq(built.choices[0].message.content, TEXT, "content built from the chunks")
    eq(built.choices[0].finish_reason, "length", "finish_reason built from the chunks")
    return PROMPT_TOKENS + MAX_TOKENS


def litellm_stream_plain():
    return litellm_stream(include_usage=False)


def litellm_stream_include_usage():
    return litellm_stream(include_usage=True)


def litellm_async_stream_plain():
    return litellm_stream(include_usage=False, asynchronous=True)


def litellm_async_stream_include_usage():
    return litellm_stream(include_usage=True, asynchronous=True)


def litellm_bad_key():
    try:
        litellm.completion(**litellm_args("not-a-key"))
    except litellm.AuthenticationError as e:
        eq(e.status_code, 401, "status")
        return 0
    raise AssertionError("a bad key was served")


def litellm_rate_limited():
    served = 0
    for _ in range(10):
        try:
            litellm.completion(**litellm_args(LITELLM_FREE_KEY) | {"max_tokens": 1})
            served += 1
        except litellm.RateLimitError as e:
            eq(e.status_code, 429, "status")
            check(served >= 1, "the burst is served before the limit")
            return served * (PROMPT_TOKENS + 1)
    raise AssertionError(f"{served} requests in a row were served on the free plan")


def prometheus_metrics():
    """`GET /metrics`, after the checks above, is Prometheus text that
    Prometheus's own Python parser reads: the decision counter, with every
    label on every series, the refusals of a bad key counted, and no key
    (value or id) in any label."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(BASE + "/metrics", timeout=10) as res:
        eq(res.status, 200, "status")
        check(res.headers["content-type"].startswith("text/plain"), "content-type")
        text = res.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    decisions = families.get("tollgate_decisions")
    check(decisions is not None, f"tollgate_decisions_total in:\n{text}")
    eq(decisions.type, "counter", "type")
    labels = {"plan", "route", "outcome", "reason", "limit"}
    outcomes = set()
    for sample in decisions.samples:
        eq(set(sample.labels), labels, f"labels of {sample}")
        outcomes.add((sample.labels["outcome"], sample.labels["reason"]))
        for value in sample.labels.values():
            for key in (PRO_KEY, FREE_KEY, LITELLM_KEY, LITELLM_FREE_KEY, UPSTREAM_KEY):
                check(key not in value, f"a key in {sample}")
    for seen in [("allowed", ""), ("rejected", "limited"), ("rejected", "unknown_key")]:
        check(seen in outcomes, f"{seen} counted in:\n{text}")
    return 0


CHECKS = [
    openai_completion,
    openai_completion_stop,
    openai_chat,
    openai_chat_real_bodies,
    openai_chat_stream,
    openai_chat_stream_include_usage,
    openai_async_chat_stream_include_usage,
    openai_completion_stream_include_usage,
    openai_models,
    openai_bad_key,
    openai_rate_limited,
    openai_retries_after_retry_after_ms,
    litellm_completion,
    litellm_stream_plain,
    litellm_stream_include_usage,
    litellm_async_stream_plain,
    litellm_async_stream_include_usage,
    litellm_bad_key,
    litellm_rate_limited,
    prometheus_metrics,
]


# --- upstream mode ------------------------------------------------------------
#
# The same clients against gateways started with `--upstream`: one in front
# of the mock-mode gateway above (every check above runs again through it),
# one in front of a small backend below that answers as vLLM does, errors
# included. Their plans count tokens by the day, so that after each check
# `GET /v1/usage` shows exactly what was settled: what the backend reported,
# never the estimate.

GATEWAY_BIN = os.environ.get("TOLLGATE_GATEWAY_BIN")
# The key the gateways in upstream mode send their backend.
UPSTREAM_KEY = "real-clients-upstream-secret"

FRONT_CONFIG = """
[[plans]]
name = "free"
throttle = { rate = 2.0, burst = 5 }
tokens = { per_day = 1000000 }
[plans.methods]
"/v1/chat/completions/POST" = { rate = 1.0, burst = 2 }

[[plans]]
name = "pro"
throttle = { rate = 50.0, burst = 100 }
tokens = { per_day = 1000000 }

[[keys]]
id = "free-1"
value = "demo-free-key"
plan = "free"

[admin]
key = "change-me"

[response]
style = "openai"
"""


def use(base):
    """Points the checks at the gateway at `base`."""
    global BASE, API
    BASE = base.rstrip("/")
    API = BASE + "/v1"


class Gateway:
    """A tollgate-gateway process on a free loopback port, stopped by `stop`."""

    def __init__(self, *args, env=None):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.config = tempfile.NamedTemporaryFile("w", suffix=".toml")
        self.config.write(FRONT_CONFIG)
        self.config.flush()
        self.proc = subprocess.Popen(
            [GATEWAY_BIN, "--listen", "127.0.0.1:0", "--drain", "1", "--config", self.config.name]
            + list(args),
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=os.environ | (env or {}),
        )
        self.base = None
        # Stopped on any failure to start, or it would outlive this script.
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self):
        ready, _, _ = select.select([self.proc.stdout], [], [], 10)
        line = self.proc.stdout.readline() if ready else ""
        prefix = "tollgate-gateway listening on "
        if not line.startswith(prefix):
            raise RuntimeError(f"the gateway did not start: {line!r}\n{self.logs()}")
        self.base = line[len(prefix):].strip()
        for _ in range(100):
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as res:
                    if res.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"GET {self.base}/health did not answer 200\n{self.logs()}")

    def logs(self):
        self.log.seek(0)
        return self.log.read()[-5000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.config.close()


def tokens_remaining(key):
    """What `GET /v1/usage` says remains of `key`'s token budget."""
    req = urllib.request.Request(API + "/usage", headers={"authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as res:
        body = json.load(res)
    return sum(l["remaining"] for l in body["limits"] if l["family"] == "tokens")


def settled(check_fn):
    """`check_fn`, and then that the gateway charged exactly the tokens it
    returns (what the backend reported) across the clients' keys."""
    keys = [PRO_KEY, FREE_KEY, LITELLM_KEY, LITELLM_FREE_KEY]

    def run():
        before = [tokens_remaining(k) for k in keys]
        want = check_fn()
        # A settlement lands when the gateway sees the answer's end, which
        # a client that stops reading at `[DONE]` may not wait for.
        deadline = time.monotonic() + 2
        while True:
            charged = sum(b - tokens_remaining(k) for b, k in zip(before, keys))
            if charged in (want if isinstance(want, range) else [want]) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if isinstance(want, range):
            check(charged in want, f"tokens charged, as GET /v1/usage shows: {charged} in {want}")
        else:
            eq(charged, want, "tokens charged, as GET /v1/usage shows")

    run.__name__ = check_fn.__name__
    return run


# A backend that answers as vLLM's OpenAI server does; the model named in a
# request picks the answer.
VLLM_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
VLLM_PROMPT_TOKENS = 11  # whatever the prompt, as its tokenizer counted it
VLLM_MESSAGE_400 = (
    "This model's maximum context length is 8192 tokens. However, you requested "
    "9000 tokens (808 in the messages, 8192 in the completion). Please reduce the "
    "length of the messages or completion."
)


class VllmLike(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The credential every request arrived with.
    authorizations = []
    # The paths of GET requests.
    paths = []
    # Requests to the model `busy`: every other one is a 429.
    busy = 0

    def log_message(self, *args):
        pass

    def send_json(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        VllmLike.authorizations.append(self.headers.get("authorization"))
        VllmLike.paths.append(self.path)
        if self.path == "/v1/models":
            model = {"id": VLLM_MODEL, "object": "model", "created": 1700000000,
                     "owned_by": "vllm", "root": VLLM_MODEL, "parent": None,
                     "max_model_len": 8192, "permission": []}
            self.send_json(200, {"object": "list", "data": [model]})
        else:
            # FastAPI's own 404.
            self.send_json(404, {"detail": "Not Found"})

    def do_POST(self):
        VllmLike.authorizations.append(self.headers.get("authorization"))
        req = json.loads(self.rfile.read(int(self.headers["content-length"])))
        model = req.get("model")
        if model == "too-long":
            # vLLM before 0.8: the error object at the top level.
            self.send_json(400, {"object": "error", "message": VLLM_MESSAGE_400,
                                 "type": "BadRequestError", "param": None, "code": 400})
        elif model == "missing":
            self.send_json(404, {"error": {"message": "The model `missing` does not exist.",
                                           "type": "NotFoundError", "param": None, "code": 404}})
        elif model == "crash":
            self.send_json(500, {"error": {"message": "EngineCore encountered an issue.",
                                           "type": "InternalServerError", "param": None,
                                           "code": 500}})
        elif model == "busy" and VllmLike.busy % 2 == 0:
            VllmLike.busy += 1
            self.send_json(429, {"error": {"message": "The server is busy.", "type": "RateLimitError",
                                           "param": None, "code": 429}},
                           headers=[("retry-after", "1"), ("retry-after-ms", "300")])
        else:
            if model == "busy":
                VllmLike.busy += 1
            self.answer(req)

    def answer(self, req):
        chat = self.path == "/v1/chat/completions"
        n = req.get("max_tokens") or req.get("max_completion_tokens") or 16
        usage = {"prompt_tokens": VLLM_PROMPT_TOKENS, "total_tokens": VLLM_PROMPT_TOKENS + n,
                 "completion_tokens": n, "prompt_tokens_details": None}
        head = {"id": ("chatcmpl-" if chat else "cmpl-") + "b1e0c5a3", "created": int(time.time()),
                "model": req["model"]}
        if not req.get("stream"):
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": "tok " * n,
                                                  "tool_calls": [], "reasoning_content": None},
                          "logprobs": None, "finish_reason": "length", "stop_reason": None}
            else:
                choice = {"index": 0, "text": "tok " * n, "logprobs": None,
                          "finish_reason": "length", "stop_reason": None, "prompt_logprobs": None}
            obj = "chat.completion" if chat else "text_completion"
            self.send_json(200, head | {"object": obj, "choices": [choice], "usage": usage,
                                        "prompt_logprobs": None, "kv_transfer_params": None})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(data):
            payload = f"data: {data}\n\n".encode()
            self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            self.wfile.flush()

        options = req.get("stream_options") or {}
        # vLLM's usage on every chunk, asked for beside include_usage.
        continuous = options.get("include_usage") and options.get("continuous_usage_stats")

        def chunk(choice, **extra):
            if continuous and choice:
                extra = {"usage": usage}
            event(json.dumps(head | {"object": obj, "choices": [choice] if choice else []} | extra))

        if chat:
            chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                   "finish_reason": None})
        for i in range(n):
            if req["model"] == "dies" and i == 2:
                # vLLM's answer to an error met mid-stream: an error event.
                event(json.dumps({"error": {"message": "EngineCore died mid-stream.",
                                            "type": "InternalServerError", "param": None,
                                            "code": 500}}))
                event("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                return
            last = i == n - 1
            if chat:
                choice = {"index": 0, "delta": {"content": "tok "}, "logprobs": None,
                          "finish_reason": "length" if last else None}
            else:
                choice = {"index": 0, "text": "tok ", "logprobs": None,
                          "finish_reason": "length" if last else None, "stop_reason": None}
            chunk(choice)
        if options.get("include_usage"):
            chunk(None, usage=usage)
        event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")


def vllm_client(key=PRO_KEY, max_retries=0):
    return OpenAI(base_url=API, api_key=key, max_retries=max_retries, timeout=30)


def vllm_chat(**kwargs):
    return vllm_client().chat.completions.create(
        model=VLLM_MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, **kwargs
    )


def vllm_plain():
    c = vllm_chat()
    eq(c.choices[0].message.content, TEXT, "content")
    eq(c.usage.total_tokens, VLLM_PROMPT_TOKENS + MAX_TOKENS, "usage.total_tokens")
    c = vllm_client().completions.create(model=VLLM_MODEL, prompt=PROMPT, max_tokens=2)
    eq(c.choices[0].text, "tok tok ", "text")
    return 2 * VLLM_PROMPT_TOKENS + MAX_TOKENS + 2


def vllm_streams():
    """The usage chunk the gateway asked for never reaches a client that
    did not ask; one that asked gets it, once; both are settled from it."""
    for options in [None, {"continuous_usage_stats": True}]:
        # vLLM reads `continuous_usage_stats` only beside `include_usage`:
        # without it, no chunk carries a usage.
        kwargs = {"stream_options": options} if options else {}
        chunks = list(vllm_chat(stream=True, **kwargs))
        eq([ch.usage for ch in chunks], [None] * (MAX_TOKENS + 1), f"usage of each chunk, {options}")
        check(all(ch.choices for ch in chunks), "every chunk has a choice")
        eq("".join(ch.choices[0].delta.content or "" for ch in chunks), TEXT, "content")
    *chunks, last = list(vllm_chat(stream=True, stream_options={"include_usage": True}))
    eq(last.choices, [], "the usage chunk's choices")
    eq(last.usage.total_tokens, VLLM_PROMPT_TOKENS + MAX_TOKENS, "usage.total_tokens")
    check(all(ch.usage is None for ch in chunks), "usage on the last chunk only")
    chunks = list(
        vllm_client().completions.create(
            model=VLLM_MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True
        )
    )
    eq(len(chunks), MAX_TOKENS, "completion chunks")
    check(all(ch.usage is None and ch.choices for ch in chunks), "no usage chunk")
    return 4 * (VLLM_PROMPT_TOKENS + MAX_TOKENS)


def expect_error(kind, status, message, call):
    try:
        call()
    except kind as e:
        eq(e.status_code, status, f"{kind.__name__} status")
        check(message in str(e), f"{message!r} in {str(e)!r}")
        return e
    raise AssertionError(f"no {kind.__name__}")


def vllm_errors():
    """The backend's 400, 404 and 500 reach the client as the SDK's own
    exceptions with the backend's message, and cost nothing."""
    for model, kind, status, message in [
        ("too-long", openai.BadRequestError, 400, VLLM_MESSAGE_400),
        ("missing", openai.NotFoundError, 404, "The model `missing` does not exist."),
        ("crash", openai.InternalServerError, 500, "EngineCore encountered an issue."),
    ]:
        for stream in (False, True):
            expect_error(kind, status, message, lambda: vllm_client().chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, stream=stream))

        async def run():
            async with AsyncOpenAI(base_url=API, api_key=PRO_KEY, max_retries=0, timeout=30) as c:
                await c.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS)

        expect_error(kind, status, message, lambda: asyncio.run(run()))
        litellm_kind = {400: litellm.BadRequestError, 404: litellm.NotFoundError,
                        500: litellm.InternalServerError}[status]
        expect_error(litellm_kind, status, message, lambda: litellm.completion(
            **litellm_args(PRO_KEY) | {"model": "openai/" + model}))
    # vLLM serves no `/v1/models/{model}`: the SDK's encoded slash reaches
    # it, and FastAPI's 404 comes back.
    e = expect_error(openai.NotFoundError, 404, "",
                     lambda: vllm_client().models.retrieve(VLLM_MODEL))
    eq(VllmLike.paths[-1], "/v1/models/meta-llama%2FLlama-3.1-8B-Instruct", "the path")
    eq(e.body, {"detail": "Not Found"}, "FastAPI's body")
    eq([m.id for m in vllm_client().models.list()], [VLLM_MODEL], "models")
    return 0


def vllm_backend_429_is_retried():
    """A 429 of the backend's own, with its retry-after-ms, is waited out
    by the SDK's retry; only the answer that came is charged."""
    start = time.monotonic()
    raw = vllm_client(max_retries=2).chat.completions.with_raw_response.create(
        model="busy", messages=MESSAGES, max_tokens=MAX_TOKENS
    )
    waited = time.monotonic() - start
    eq(raw.retries_taken, 1, "retries")
    check(0.3 <= waited < 1, f"waited retry-after-ms (300 ms), not {waited:.2f} s")
    eq(raw.parse().usage.total_tokens, VLLM_PROMPT_TOKENS + MAX_TOKENS, "usage")
    return VLLM_PROMPT_TOKENS + MAX_TOKENS


def vllm_error_mid_stream():
    """vLLM's error event in the middle of a stream is raised by the SDK
    with its message; the tokens streamed before it are charged."""
    got = []
    try:
        for ch in vllm_client().chat.completions.create(
            model="dies", messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True
        ):
            got.append(ch)
    except openai.APIError as e:
        check("EngineCore died mid-stream." in str(e), f"the backend's message in {e}")
    else:
        raise AssertionError("the error event was not raised")
    eq(len(got), 3, "chunks before the error")
    # No usage came: the prompt as estimated, and one token per chunk of text.
    return PROMPT_TOKENS + 2


def vllm_key_never_forwarded():
    want = f"Bearer {UPSTREAM_KEY}"
    check(VllmLike.authorizations, "the backend was asked")
    eq(set(VllmLike.authorizations), {want}, "the credentials the backend saw")
    return 0


def upstream_client_leaves_mid_stream():
    """A client that closes a stream after two chunks of a slow answer is
    charged its prompt and about what was produced, not the estimate."""
    stream = client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=100, stream=True,
        extra_body={"mock_token_ms": 100},
    )
    got = 0
    for ch in stream:
        got += bool(ch.choices and ch.choices[0].delta.content)
        if got == 2:
            break
    stream.close()
    # The chunks on their way when the client left are charged too.
    return range(PROMPT_TOKENS + 2, PROMPT_TOKENS + 8)


def upstream_async_completion():
    async def run():
        async with AsyncOpenAI(base_url=API, api_key=PRO_KEY, max_retries=0, timeout=30) as c:
            plain = await c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS)
            stream = await c.chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, stream=True
            )
            return plain, [ch async for ch in stream]

    plain, chunks = asyncio.run(run())
    check_usage(plain.usage)
    check(all(ch.usage is None and ch.choices for ch in chunks), "no usage chunk")
    eq("".join(ch.choices[0].delta.content or "" for ch in chunks), TEXT, "content")
    return 2 * (PROMPT_TOKENS + MAX_TOKENS)


UPSTREAM_CHECKS = [upstream_client_leaves_mid_stream, upstream_async_completion]

VLLM_CHECKS = [
    vllm_plain,
    vllm_streams,
    vllm_errors,
    vllm_backend_429_is_retried,
    vllm_error_mid_stream,
    vllm_key_never_forwarded,
]


def run_checks(checks, wrap=lambda f: f):
    passed = failed = 0
    for check_fn in checks:
        try:
            wrap(check_fn)()
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            failed += 1
            print(f"FAIL {check_fn.__name__}")
            traceback.print_exc()
        else:
            passed += 1
            print(f"ok   {check_fn.__name__}")
    return passed, failed


def add_client_keys():
    add_key("real-clients-openai", PRO_KEY, "pro")
    add_key("real-clients-litellm", LITELLM_KEY, "pro")
    add_key("real-clients-litellm-free", LITELLM_FREE_KEY, "free")


def main():
    print(f"openai {openai.__version__}, litellm {litellm_version()}, gateway at {BASE}")
    add_client_keys()
    print("-- mock mode")
    passed, failed = run_checks(CHECKS)
    if GATEWAY_BIN:
        # The mock-mode gateway serves the gateway in front of it.
        add_key("real-clients-upstream", UPSTREAM_KEY, "pro", base=MOCK_BASE)
        backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), VllmLike)
        threading.Thread(target=backend.serve_forever, daemon=True).start()
        vllm_base = f"http://127.0.0.1:{backend.server_address[1]}"
        env = {"TOLLGATE_UPSTREAM_KEY": UPSTREAM_KEY}
        for name, upstream, checks in [
            ("upstream mode, in front of the mock", MOCK_BASE + "/v1", CHECKS + UPSTREAM_CHECKS),
            ("upstream mode, in front of a vLLM-like backend", vllm_base, VLLM_CHECKS),
        ]:
            print(f"-- {name}")
            gateway = Gateway("--upstream", upstream, env=env)
            try:
                use(gateway.base)
                add_client_keys()
                p, f = run_checks(checks, settled)
            finally:
                gateway.stop()
            if f:
                print(f"the gateway's log:\n{gateway.logs()}")
            passed += p
            failed += f
        backend.shutdown()
    else:
        print("TOLLGATE_GATEWAY_BIN is not set: upstream mode not checked")
    print(f"clients: {passed} passed, {failed} failed")
    return 1 if failed else 0


def litellm_version():
    from importlib.metadata import version

    return version("litellm")


if __name__ == "__main__":
    # A SIGTERM (a timeout, a CI run stopped) unwinds as an exception does,
    # so that the gateways started here are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
