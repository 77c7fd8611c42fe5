"""The OpenAI-compatible server (bstar.serve) on loopback, driven by the official `openai` client: every
endpoint's answers against the engine's own LLM on the same requests and seeds (and echo logprobs against
transformers), streaming equal to non-streaming, OpenAI-shaped 4xx errors, aborts on client disconnect,
and a bounded load test (concurrent streaming clients with random disconnects: free KV blocks back to
their starting count and RSS flat over rounds)."""

import asyncio
import random
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # (the openai client's HTTP library)
uvicorn = pytest.importorskip("uvicorn")

from bstar.engine import LLM, AsyncLLM, SamplingParams  # noqa: E402
from bstar.serve.app import build_app  # noqa: E402
from bstar.testing.model_factory import hf_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = dict(device="cpu", dtype="float32")
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT = {"chat_template": TEMPLATE}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(llama_dir):
    engine = AsyncLLM(str(llama_dir), **CPU, max_num_seqs=64)
    port = _port()
    srv = uvicorn.Server(uvicorn.Config(build_app(engine, "tiny"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    yield SimpleNamespace(base=base, client=client, engine=engine, llm=LLM(str(llama_dir), **CPU), path=llama_dir)
    srv.should_exit = True
    thread.join(timeout=10)
    engine.shutdown()


def _idle(engine, timeout=20.0):
    """The free KV blocks once no request is left, in the server's streams or in the engine."""
    end = time.time() + timeout
    while (engine.get_num_unfinished_requests() or engine.llm_engine.get_num_unfinished_requests()) and (
        time.time() < end
    ):
        time.sleep(0.02)
    return engine.llm_engine.block_manager.num_free


def test_models_health_metrics(server):
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    assert httpx.get(server.base + "/health").status_code == 200
    text = httpx.get(server.base + "/metrics").text
    lines = dict(line.split() for line in text.splitlines())
    assert int(lines["bstar_kv_blocks_total"]) == server.engine.llm_engine.block_manager.num_blocks
    assert "bstar_requests_total" in lines and "bstar_requests_running" in lines


def test_completions_equal_the_engine(server):
    prompt = "the cat sat on"
    kw = dict(temperature=0.9, max_tokens=12, seed=7)
    r = server.client.completions.create(model="tiny", prompt=[prompt, "a dog"], n=2, logprobs=2, **kw)
    ref = server.llm.generate([prompt, "a dog"], SamplingParams(n=2, logprobs=2, **kw), use_tqdm=False)
    assert [c.text for c in r.choices] == [c.text for o in ref for c in o.outputs]
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    want = [lp.logprob for lp in (e[t] for e, t in zip(ref[0].outputs[0].logprobs, ref[0].outputs[0].token_ids))]
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(want, abs=1e-5)
    assert all(len(top) <= 3 for top in r.choices[0].logprobs.top_logprobs)
    assert r.usage.completion_tokens == sum(len(c.token_ids) for o in ref for c in o.outputs)
    # token-id prompts and stop strings
    ids = server.llm.llm_engine.tokenizer.encode(prompt)
    s = server.client.completions.create(model="tiny", prompt=ids, max_tokens=30, temperature=0, stop=["e"])
    full = server.llm.generate([ids], SamplingParams(max_tokens=30, temperature=0), use_tqdm=False)[0].outputs[0].text
    assert "e" in full and s.choices[0].text == full[: full.index("e")] and s.choices[0].finish_reason == "stop"


def test_echo_logprobs_equal_transformers(server):
    """lm-eval local-completions' loglikelihood request: echo=True, max_tokens=0 (or 1), logprobs=1."""
    text = "the quick brown fox jumps"
    r = server.client.completions.create(model="tiny", prompt=text, echo=True, max_tokens=0, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text and lp.token_logprobs[0] is None
    ids = server.llm.llm_engine.tokenizer.encode(text)
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(str(server.path))(torch.tensor([ids])).logits[0].double(), -1)
    want = [ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    r1 = server.client.completions.create(model="tiny", prompt=text, echo=True, max_tokens=1, logprobs=1, temperature=0)
    assert r1.choices[0].logprobs.token_logprobs[: len(ids)] == pytest.approx(lp.token_logprobs[: len(ids)], abs=1e-6)
    assert len(r1.choices[0].logprobs.tokens) == len(ids) + 1


def test_chat_equals_the_engine(server):
    msgs = [{"role": "user", "content": "hello there"}]
    kw = dict(temperature=1.0, max_tokens=10, seed=3)
    r = server.client.chat.completions.create(
        model="tiny", messages=msgs, n=2, logprobs=True, top_logprobs=2, extra_body=CHAT, **kw
    )
    ref = server.llm.chat(msgs, SamplingParams(n=2, logprobs=2, **kw), chat_template=TEMPLATE, use_tqdm=False)[0]
    assert [c.message.content for c in r.choices] == [c.text for c in ref.outputs]
    assert r.choices[0].message.role == "assistant"
    got = [x.logprob for x in r.choices[0].logprobs.content]
    want = [e[t].logprob for e, t in zip(ref.outputs[0].logprobs, ref.outputs[0].token_ids)]
    assert got == pytest.approx(want, abs=1e-5)
    assert all(len(x.top_logprobs) == 2 for x in r.choices[0].logprobs.content)


def test_streaming_equals_non_streaming(server):
    kw = dict(model="tiny", prompt="once upon a", n=2, temperature=1.0, max_tokens=16, seed=11)
    whole = server.client.completions.create(**kw)
    parts, finish = {0: "", 1: ""}, {}
    for chunk in server.client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            parts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert [parts[0], parts[1]] == [c.text for c in whole.choices]
    assert finish == {0: whole.choices[0].finish_reason, 1: whole.choices[1].finish_reason}
    msgs = [{"role": "user", "content": "hi"}]
    ckw = dict(model="tiny", messages=msgs, temperature=1.0, max_tokens=12, seed=5, extra_body=CHAT)
    r = server.client.chat.completions.create(**ckw)
    whole = r.choices[0].message.content
    chunks = list(server.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **ckw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens > 0


def test_errors_are_openai_shaped(server):
    c = server.client
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="tiny", prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="no_such_field"):
        c.completions.create(model="tiny", prompt="x", extra_body={"no_such_field": 1})
    with pytest.raises(openai.BadRequestError, match="max_model_len|longer than the context"):
        c.completions.create(model="tiny", prompt=[5] * 5000, max_tokens=4)
    r = httpx.post(server.base + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400 and "\n" not in err["message"]
    assert server.engine.get_num_unfinished_requests() == 0


def test_client_disconnect_aborts_and_frees_blocks(server):
    start = _idle(server.engine)
    long = dict(model="tiny", prompt="a b c", max_tokens=2000, temperature=1.0, extra_body={"ignore_eos": True})
    stream = server.client.completions.create(stream=True, **long)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert server.engine.get_num_unfinished_requests() == 1
    stream.close()
    assert _idle(server.engine) == start
    with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up while it runs
        body = {"model": "tiny", "prompt": "a b c", "max_tokens": 2000, "ignore_eos": True}
        httpx.post(server.base + "/v1/completions", json=body, timeout=1.0)
    assert _idle(server.engine) == start
    text = httpx.get(server.base + "/metrics").text
    assert int(dict(line.split() for line in text.splitlines())["bstar_requests_aborted_total"]) >= 2


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_load_concurrent_streams_with_random_disconnects(server):
    """ROUNDS rounds of CLIENTS concurrent streaming clients (completions and chat), a third of them
    disconnecting after a random number of chunks; after each round every KV block is free again, and RSS
    stays flat from the second round on."""
    ROUNDS, CLIENTS = 4, 24
    rng = random.Random(0)
    start = _idle(server.engine)
    aclient = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0)
    figures = []

    async def one(i):
        leave = rng.random() < 1 / 3
        after = rng.randint(1, 6)
        kw = dict(model="tiny", temperature=1.0, max_tokens=rng.randint(8, 48), stream=True, seed=i)
        if i % 2:
            s = await aclient.chat.completions.create(
                messages=[{"role": "user", "content": f"q {i}"}], extra_body=CHAT, **kw
            )
        else:
            s = await aclient.completions.create(prompt=f"p {i} " * rng.randint(1, 20), **kw)
        n = 0
        async for _ in s:
            n += 1
            if leave and n == after:
                await s.close()
                return "left"
        return "done"

    async def rounds():
        for r in range(ROUNDS):
            results = await asyncio.gather(*(one(r * CLIENTS + i) for i in range(CLIENTS)))
            free = await asyncio.to_thread(_idle, server.engine)
            figures.append((results.count("done"), results.count("left"), free, round(_rss_mb(), 1)))
        await aclient.close()

    asyncio.run(rounds())
    print(
        f"\nload test: start {start} free blocks; per round (completed, disconnected, free blocks, RSS MB): {figures}"
    )
    assert all(f[2] == start for f in figures)
    assert sum(f[1] for f in figures) > 0
    assert figures[-1][3] - figures[1][3] < 30


def test_serve_command(llama_dir):
    """`bstar-engine serve --model PATH` answers on loopback (a subprocess, as a user runs it)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    port = _port()
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "bstar", "serve", "--model", str(llama_dir), "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd + ["--served-model-name", "m"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        for _ in range(600):
            try:
                assert [m.id for m in client.models.list().data] == ["m"]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        r = client.completions.create(model="m", prompt="hello", max_tokens=4, temperature=0)
        assert len(r.choices[0].text) > 0 and r.usage.completion_tokens == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
