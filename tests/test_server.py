"""`zhlora serve` (zhlora/server.py, serving/app.py) on the tiny LoRA run, through the official
`openai` client and raw HTTP: answers whole and streamed, adapters, the API key, every refusal
in OpenAI's error shape, 50 requests at once, and clients that hang up mid-answer.

The server runs in a background thread of the test process (uvicorn on a free port of
127.0.0.1), so a test can reach into the model, e.g. to slow generation down.
"""
from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from zhlora.cli import main as cli_main  # noqa: E402
from zhlora.formatting import encode_prompt  # noqa: E402
from zhlora.server import add_arguments  # noqa: E402
from zhlora.serving.app import Limits, build_app, start_in_thread  # noqa: E402
from zhlora.serving.engine import load_engine  # noqa: E402

KEY = "test-key"
QUESTION = "把1234写成中文数字"
MAX_TOKENS = 64  # --max_tokens_limit of the test server
MAX_CHARS = 2000  # --max_input_chars of the test server


@pytest.fixture(scope="module")
def served(tiny_run_dir):
    """(base_url, engine) of a server with the run's adapter, the same adapter again as "math", and a key."""
    engine = load_engine(tiny_run_dir, [("math", tiny_run_dir)])
    server, port = start_in_thread(build_app(engine, Limits(MAX_TOKENS, MAX_CHARS), api_key=KEY))
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key=KEY, max_retries=0, timeout=30)


def ask(client, model="default", **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 12, **kwargs}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], **kwargs)


def post(base_url: str, body: bytes | str | dict, key: str | None = KEY, path="/v1/chat/completions",
         method="POST") -> tuple[int, dict]:
    """Raw HTTP, for requests the openai client would never send; returns (status, JSON body)."""
    if isinstance(body, dict):
        body = json.dumps(body, ensure_ascii=False)
    if isinstance(body, str):
        body = body.encode()
    conn = http.client.HTTPConnection(base_url.removeprefix("http://"), timeout=30)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request(method, path, body=body if method == "POST" else None, headers=headers)
    response = conn.getresponse()
    status, data = response.status, json.loads(response.read())
    conn.close()
    return status, data


def assert_openai_error(data: dict) -> dict:
    assert set(data) == {"error"} and set(data["error"]) == {"message", "type", "param", "code"}
    assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    return data["error"]


def test_plain_completion(client, served):
    engine = served[1]
    answer = ask(client)
    assert answer.object == "chat.completion" and answer.model == "default"
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content.strip()
    assert answer.choices[0].finish_reason in ("stop", "length")
    prompt = encode_prompt([{"role": "user", "content": QUESTION}], engine.tokenizer, engine.template)
    assert answer.usage.prompt_tokens == len(prompt)  # the prompt training would have built
    assert 1 <= answer.usage.completion_tokens <= 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert ask(client).choices[0].message.content == answer.choices[0].message.content  # greedy


def test_streamed_completion(client):
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(pieces) > 1  # arrives piece by piece
    assert "".join(pieces) == ask(client).choices[0].message.content  # the same text as whole
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 12
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_models_and_adapter_selection(client):
    assert [m.id for m in client.models.list().data] == ["base", "default", "math"]
    texts = {name: ask(client, name).choices[0].message.content for name in ("base", "default", "math")}
    assert texts["base"] != texts["default"]  # 30 LoRA steps already move the tiny model's greedy text
    assert texts["math"] == texts["default"]  # "math" is the same adapter file under a second name
    assert ask(client, "default").choices[0].message.content == texts["default"]  # base left no trace


def test_stop_strings_and_seed(client):
    whole = ask(client, max_tokens=20).choices[0].message.content
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    expected = whole[:whole.index(stop)]
    cut = ask(client, max_tokens=20, stop=stop).choices[0]
    assert (cut.message.content, cut.finish_reason) == (expected, "stop")
    streamed = ask(client, max_tokens=20, stop=["\x00never", stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    sampled = [ask(client, temperature=1.0, seed=7, max_tokens=20).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed, the same sample


def test_api_key(served):
    base_url = served[0]
    for key in (None, "wrong-key"):
        status, data = post(base_url, {"messages": [{"role": "user", "content": "你好"}]}, key=key)
        assert status == 401 and assert_openai_error(data)["code"] == "invalid_api_key"
        assert post(base_url, b"", key=key, path="/v1/models", method="GET")[0] == 401
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert post(base_url, b"", path="/v1/models", method="GET")[0] == 200
    # the page and the health check need no key: no data, no model call
    assert post(base_url, b"", key=None, path="/health", method="GET") == (200, {"status": "ok", "pending": 0})
    conn = http.client.HTTPConnection(base_url.removeprefix("http://"), timeout=10)
    conn.request("GET", "/")
    page = conn.getresponse()
    assert page.status == 200 and "default-src 'self'" in page.getheader("Content-Security-Policy")
    assert "<title>zhlora" in page.read().decode()


USER = [{"role": "user", "content": "你好"}]
BAD_REQUESTS = [  # (name, body, status, param, code)
    ("malformed json", b'{"model": "default", "messages": [', 400, None, "invalid_json"),
    ("not an object", b"[]", 400, None, "invalid_type"),
    ("not UTF-8", b'\xff\xfe{"messages": []}', 400, None, "invalid_json"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages", "invalid_value"),
    ("unknown model", {"model": "nope", "messages": USER}, 404, "model", "model_not_found"),
    ("empty messages", {"model": "default", "messages": []}, 400, "messages", "invalid_value"),
    ("missing messages", {"model": "default"}, 400, "messages", "invalid_value"),
    ("over-long message", {"messages": [{"role": "user", "content": "长" * 1_000_000}]}, 400, "messages",
     "context_length_exceeded"),
    ("ends with assistant", {"messages": USER + [{"role": "assistant", "content": "hi"}]}, 400, "messages",
     "invalid_value"),
    ("unknown role", {"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role", "invalid_type"),
    ("max_tokens 0", {"messages": USER, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("max_tokens too large", {"messages": USER, "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens", "invalid_value"),
    ("max_tokens a string", {"messages": USER, "max_tokens": "10"}, 400, "max_tokens", "invalid_type"),
    ("max_tokens a float", {"messages": USER, "max_tokens": 1.5}, 400, "max_tokens", "invalid_type"),
    ("messages a string", {"messages": "你好"}, 400, "messages", "invalid_type"),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content",
     "invalid_type"),
    ("temperature a word", {"messages": USER, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("temperature too high", {"messages": USER, "temperature": 3}, 400, "temperature", "invalid_value"),
    ("top_p 0", {"messages": USER, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("stream a string", {"messages": USER, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("five stop strings", {"messages": USER, "stop": list("abcde")}, 400, "stop", "invalid_value"),
    ("n 2", {"messages": USER, "n": 2}, 400, "n", "invalid_type"),
]


@pytest.mark.parametrize("body,status,param,code", [case[1:] for case in BAD_REQUESTS],
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request(served, body, status, param, code):
    began = time.perf_counter()
    got, data = post(served[0], body)
    error = assert_openai_error(data)
    assert (got, error["param"], error["code"], error["type"]) == (status, param, code, "invalid_request_error")
    assert time.perf_counter() - began < 2  # a 1 MB message included: refused before tokenising


def test_bad_requests_through_the_client_and_odd_routes(client, served):
    with pytest.raises(openai.NotFoundError) as err:
        ask(client, "nope")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        ask(client, max_tokens=0)
    conn = http.client.HTTPConnection(served[0].removeprefix("http://"), timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": USER}), {"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()  # curl -d sends a form, not JSON: told so
    assert response.status == 400 and json.loads(response.read())["error"]["code"] == "invalid_content_type"
    assert post(served[0], b"x" * (Limits(MAX_TOKENS, MAX_CHARS).max_body_bytes + 1))[0] == 413
    status, data = post(served[0], b"", path="/nowhere", method="GET")
    assert status == 404 and assert_openai_error(data)["code"] == "not_found"
    status, data = post(served[0], b"", path="/v1/chat/completions", method="GET")
    assert status == 405 and assert_openai_error(data)
    assert ask(client).choices[0].message.content  # still serving


def test_fifty_concurrent_requests(client):
    models = ["base", "default", "math"]
    expected = {name: ask(client, name, max_tokens=4).choices[0].message.content for name in models}
    jobs = [models[i % 3] for i in range(50)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda name: ask(client, name, max_tokens=4).choices[0].message.content, jobs))
    # every request answered, each by its own adapter: switching never leaks between requests
    assert answers == [expected[name] for name in jobs]


def test_concurrent_requests_share_decoding_steps(client, served):
    """Eight greedy requests at once answer in about as many forward passes as one (they ride in one
    batch), and each answer is the one it gets alone."""
    engine = served[1]
    alone = ask(client, max_tokens=10).choices[0].message.content
    calls = []
    gate = threading.Event()

    def hook(module, inputs, logits):
        gate.wait(5)  # hold the first forward until every request is queued, so they all share it
        calls.append(logits.shape[0])
        return logits

    handle = engine.model.get_output_embeddings().register_forward_hook(hook)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(lambda: ask(client, max_tokens=10).choices[0].message.content) for _ in range(8)]
            while engine.pending < 8:
                time.sleep(0.01)
            gate.set()
            answers = [f.result() for f in futures]
    finally:
        handle.remove()
    assert answers == [alone] * 8
    assert len(calls) <= 2 * 11 and max(calls) == 8  # one-by-one would take 8 x (1 prefill + 9 steps) = 80


@pytest.fixture
def slow_endless_model(served):
    """Make every decoding step take 0.1 s and never end early (EOS masked): MAX_TOKENS take 6.4 s."""
    engine = served[1]
    stop_ids = [engine.tokenizer.eos_token_id, engine.tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def hook(module, inputs, logits):
        time.sleep(0.1)
        logits[..., stop_ids] = float("-inf")
        return logits

    handle = engine.model.get_output_embeddings().register_forward_hook(hook)
    yield engine
    handle.remove()


def wait_idle(engine, seconds: float) -> float:
    began = time.perf_counter()
    while engine.pending and time.perf_counter() - began < seconds:
        time.sleep(0.02)
    return time.perf_counter() - began


def test_disconnect_mid_stream_frees_the_worker(client, slow_endless_model):
    stream = ask(client, max_tokens=MAX_TOKENS, stream=True)
    next(iter(stream))  # the role chunk: the answer is being generated
    stream.close()  # hang up after 1 of 64 tokens (6.4 s of work)
    assert wait_idle(slow_endless_model, 3) < 3  # cancelled within a step or two
    began = time.perf_counter()
    assert ask(client, max_tokens=3).usage.completion_tokens == 3
    assert time.perf_counter() - began < 3


def test_disconnect_while_waiting_for_a_whole_answer(served, slow_endless_model):
    host = served[0].removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=0.5)
    body = json.dumps({"messages": USER, "max_tokens": MAX_TOKENS, "stream": False})
    conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}",
                                                         "Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()  # the answer would take 6.4 s
    conn.close()
    assert wait_idle(slow_endless_model, 3) < 3  # the server saw the hang-up and stopped


def test_cli(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.model_path) == ("127.0.0.1", 8000, "outputs")  # this machine only
    assert cli_main(["serve", "--model_path", str(tmp_path)]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    assert cli_main(["serve", "--model_path", str(tmp_path), "--adapters", "base=x"]) == 2
    assert "the name base is taken" in capsys.readouterr().err
    assert cli_main(["serve", "--model_path", str(tmp_path)]) == 2


def test_extra_adapters_get_the_safety_check(tiny_run_dir, tmp_path, capsys):
    """--adapters NAME=PATH is checked as the run's own adapter is (zhlora/safety.py), before PEFT loads it."""
    import shutil

    import torch
    from safetensors.torch import load_file

    other, pickled = tmp_path / "other", tmp_path / "pickled"
    for run in (other, pickled):
        shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("checkpoints"))
    config = other / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "r": 4}), encoding="utf-8")
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    assert cli_main(["serve", "--model_path", str(tiny_run_dir), "--adapters", f"other={other}"]) == 2
    assert "adapter_config.json says r=4, but" in capsys.readouterr().err
    assert cli_main(["serve", "--model_path", str(tiny_run_dir), "--adapters", f"pickled={pickled}"]) == 2
    assert "the weights are pickle files (adapter_model.bin)" in capsys.readouterr().err


def test_a_generation_error_reaches_the_client(client, served):
    """A failure inside model.generate becomes a 500 (or an error event), and the worker lives on."""
    engine = served[1]

    def hook(module, inputs, logits):
        raise RuntimeError("boom")

    handle = engine.model.get_output_embeddings().register_forward_hook(hook)
    try:
        with pytest.raises(openai.InternalServerError):
            ask(client)
        events = [json.loads(line[6:]) for line in _raw_stream(served[0]) if line.startswith("data: {")]
        assert "boom" in events[-1]["error"]["message"]
    finally:
        handle.remove()
    assert ask(client).choices[0].message.content


def _raw_stream(base_url: str) -> list[str]:
    conn = http.client.HTTPConnection(base_url.removeprefix("http://"), timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": USER, "stream": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    lines = conn.getresponse().read().decode().splitlines()
    conn.close()
    return lines


def test_threads_stay_bounded(client):
    """One generation thread, whatever the load (the queue, not a thread per request)."""
    ask(client)
    assert sum(t.name.startswith("zhlora-generate") for t in threading.enumerate()) == 1


def test_page_fetches_nothing_from_outside():
    """The page's files name no other host: no CDN, no web font (the CSP header enforces it too)."""
    import re

    from zhlora.serving.app import WEB_DIR

    files = {path.name: path.read_text(encoding="utf-8") for path in WEB_DIR.iterdir()}
    assert set(files) == {"index.html", "app.js", "style.css"}
    for name, text in files.items():
        assert not re.search(r"https?:|//[\w.-]+\.[a-z]{2,}/|@import", text), name
