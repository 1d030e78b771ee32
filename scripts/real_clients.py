"""The gateway's mock mode, driven by real clients: the official `openai`
Python package and LiteLLM.

Run by scripts/real_clients.sh, which starts the gateway with its embedded
demo config and passes its address in TOLLGATE_BASE (e.g.
http://127.0.0.1:PORT). Each check runs with keys of its own, added here
through the admin routes, so that one check's throttle never denies another's
requests.
"""

import asyncio
import json
import os
import sys
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

BASE = os.environ["TOLLGATE_BASE"].rstrip("/")
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


def add_key(key_id, value, plan):
    """Adds a key through the admin routes (POST /admin/keys)."""
    req = urllib.request.Request(
        BASE + "/admin/keys",
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


def openai_completion_stop():
    # The mock produced fewer tokens than max_tokens: finish_reason `stop`.
    c = client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, extra_body={"mock_completion_tokens": 2}
    )
    eq(c.choices[0].text, "tok tok ", "text")
    eq(c.choices[0].finish_reason, "stop", "finish_reason")
    check_usage(c.usage, completion_tokens=2)


def openai_chat():
    c = client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS)
    check_head(c, "chat.completion", "chatcmpl-")
    eq(len(c.choices), 1, "choices")
    eq(c.choices[0].index, 0, "index")
    eq(c.choices[0].message.role, "assistant", "role")
    eq(c.choices[0].message.content, TEXT, "content")
    eq(c.choices[0].finish_reason, "length", "finish_reason")
    check_usage(c.usage)


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
    chars = len("Be brief.") + len(PROMPT) + len("42")
    eq(c.usage.prompt_tokens, -(-chars // 4), "usage.prompt_tokens")
    eq(c.usage.completion_tokens, 3, "usage.completion_tokens")


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


def openai_chat_stream():
    chat_stream(include_usage=False)


def openai_chat_stream_include_usage():
    chat_stream(include_usage=True)


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


def openai_bad_key():
    try:
        client("not-a-key").chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    except openai.AuthenticationError as e:
        eq(e.status_code, 401, "status")
        eq(e.code, "invalid_api_key", "code")
        return
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
            return
    raise AssertionError(f"{served} requests in a row were served on the free plan")


def openai_retries_after_retry_after_ms():
    # Right after openai_rate_limited the free key is denied again; a client
    # allowed to retry waits what retry-after-ms says and is then served.
    c = client(FREE_KEY, max_retries=3).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=1
    )
    eq(c.status_code, 200, "status after the client's own retries")
    check(c.retries_taken >= 1, f"the client retried ({c.retries_taken} retries)")


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


def litellm_stream_plain():
    litellm_stream(include_usage=False)


def litellm_stream_include_usage():
    litellm_stream(include_usage=True)


def litellm_async_stream_plain():
    litellm_stream(include_usage=False, asynchronous=True)


def litellm_async_stream_include_usage():
    litellm_stream(include_usage=True, asynchronous=True)


def litellm_bad_key():
    try:
        litellm.completion(**litellm_args("not-a-key"))
    except litellm.AuthenticationError as e:
        eq(e.status_code, 401, "status")
        return
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
            return
    raise AssertionError(f"{served} requests in a row were served on the free plan")


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
]


def main():
    print(f"openai {openai.__version__}, litellm {litellm_version()}, gateway at {BASE}")
    add_key("real-clients-openai", PRO_KEY, "pro")
    add_key("real-clients-litellm", LITELLM_KEY, "pro")
    add_key("real-clients-litellm-free", LITELLM_FREE_KEY, "free")
    passed = failed = 0
    for check_fn in CHECKS:
        try:
            check_fn()
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            failed += 1
            print(f"FAIL {check_fn.__name__}")
            traceback.print_exc()
        else:
            passed += 1
            print(f"ok   {check_fn.__name__}")
    print(f"clients: {passed} passed, {failed} failed")
    return 1 if failed else 0


def litellm_version():
    from importlib.metadata import version

    return version("litellm")


if __name__ == "__main__":
    sys.exit(main())
