"""`zhlora serve` under load and abuse, against a server in its own process (so its memory
can be measured) on the tiny LoRA run:

    python -m pytest tests/test_server_load.py -s      # -s prints the figures (test_zz_report)

1. 200 requests from 20 concurrent clients (10 each, on one keep-alive connection, to two
   adapters in turn): every one answered 200, with the answer a lone request gets. The queue is unbounded by design
   (server.py: one generation at a time, a request waits its turn), so there is no 429 or 503.
2. Abuse: a 1 MB message is a 400 before tokenising; a body over the size limit is a 413 and
   a chunked body a 411, both refused unread; the server answers normally right after.
3. A client that reads its stream slowly does not hold the generation worker: its answer is
   generated into its own queue while other requests are answered.
4. A client that hangs up mid-stream (or while waiting in line) frees the worker within a step.
5. The server's RSS after all this is within RSS_GROWTH_MB of its RSS after a warm-up round.

The child process serves the run's adapter as "default" and twice more under other names, so a
test can pick a behaviour per request: "long" never emits EOS (always max_tokens tokens), "slow"
also takes SLOW_STEP seconds per token.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
psutil = pytest.importorskip("psutil")

REPO = Path(__file__).resolve().parents[1]
MAX_TOKENS = 64  # --max_tokens_limit of the test server
MAX_CHARS = 2000  # --max_input_chars
SLOW_STEP = 0.2  # seconds per token of model "slow": 64 tokens = 12.8 s, so a freed worker is plain to see
CLIENTS, PER_CLIENT, LOAD_TOKENS = 20, 10, 6  # 200 requests of <= 6 tokens: ~4 s on 2 busy cores
RSS_GROWTH_MB = 100  # allowed growth from after the warm-up to the end (the tiny model itself is ~1 MB)
QUESTION = [{"role": "user", "content": "把1234写成中文数字"}]
RECORD: dict[str, object] = {}  # the figures, printed by test_zz_report

SERVE = """
import sys, time
from pathlib import Path
from zhlora.serving.app import Limits, build_app, start_in_thread
from zhlora.serving.engine import load_engine

run, slow_step = Path(sys.argv[1]), float(sys.argv[2])
engine = load_engine(run, [("long", run), ("slow", run)])
stop_ids = [engine.tokenizer.eos_token_id, engine.tokenizer.convert_tokens_to_ids("<|im_end|>")]

def hook(module, inputs, logits):  # runs once per decoding step, in the worker, on the selected adapter
    if engine.model.active_adapter in ("long", "slow"):
        logits[..., stop_ids] = float("-inf")
    if engine.model.active_adapter == "slow":
        time.sleep(slow_step)
    return logits

engine.model.get_output_embeddings().register_forward_hook(hook)
server, port = start_in_thread(build_app(engine, Limits(int(sys.argv[3]), int(sys.argv[4]))))
print(port, flush=True)
while True:
    time.sleep(60)
"""


class Server:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def connect(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def pending(self) -> int:
        conn = self.connect(10)
        conn.request("GET", "/health")
        pending = json.loads(conn.getresponse().read())["pending"]
        conn.close()
        return pending

    def wait_idle(self, seconds: float) -> float:
        """Seconds until no job is queued or running (at most `seconds`)."""
        began = time.perf_counter()
        while self.pending() and time.perf_counter() - began < seconds:
            time.sleep(0.02)
        return time.perf_counter() - began


def chat(conn: http.client.HTTPConnection, model: str = "default", max_tokens: int = LOAD_TOKENS,
         **extra) -> tuple[int, dict]:
    """One request on an open (keep-alive) connection: (status, JSON body)."""
    body = json.dumps({"model": model, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0, **extra})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def answer(server: Server, model: str = "default", max_tokens: int = LOAD_TOKENS) -> tuple[str, int]:
    """(text, completion tokens) of one request on its own connection; the tiny model's text may be ""
    (it likes to open with newlines, which the server drops), so the token count is compared too."""
    conn = server.connect()
    status, data = chat(conn, model, max_tokens)
    conn.close()
    assert status == 200, data
    return text_and_tokens(data)


def text_and_tokens(data: dict) -> tuple[str, int]:
    return data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"]


def raw(server: Server, head: str, body: bytes = b"", rcvbuf: int | None = None) -> socket.socket:
    """A socket that has sent `head` (request line and headers) and `body`: for what http.client won't send."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the TCP window
    sock.settimeout(60)
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(f"{head}Host: 127.0.0.1\r\nContent-Type: application/json\r\n\r\n".encode() + body)
    return sock


def stream(server: Server, model: str, max_tokens: int = MAX_TOKENS, rcvbuf: int | None = None) -> socket.socket:
    body = json.dumps({"model": model, "messages": QUESTION, "max_tokens": max_tokens, "stream": True}).encode()
    return raw(server, f"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {len(body)}\r\n", body, rcvbuf)


def read_until(sock: socket.socket, marker: bytes, size: int = 4096, pause: float = 0.0) -> bytes:
    """Read (`size` bytes at a time, `pause` s apart) until `marker` arrives; everything read."""
    got = b""
    while marker not in got:
        piece = sock.recv(size)
        assert piece, f"the server closed the connection before {marker!r}: {got[-500:]!r}"
        got += piece
        time.sleep(pause)
    return got


@pytest.fixture(scope="module")
def server(tiny_run_dir, tmp_path_factory):
    """The server process, after a warm-up round (every path once: lazy allocations are done)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(tiny_run_dir), str(SLOW_STEP), str(MAX_TOKENS),
                             str(MAX_CHARS)], stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env,
                            cwd=REPO)
    line = proc.stdout.readline()  # the port, once the model is loaded and the socket listens
    assert line.strip().isdigit(), f"the server did not start:\n{log.read_text()[-3000:]}"
    served = Server(proc, int(line))
    try:
        for model in ("default", "long", "slow"):
            answer(served, model, 2)
        conn = served.connect()
        for _ in range(10):
            assert chat(conn)[0] == 200
        assert chat(conn, messages=[{"role": "user", "content": "长" * (MAX_CHARS + 1)}])[0] == 400
        conn.close()
        sock = stream(served, "long", 4)
        read_until(sock, b"data: [DONE]")
        sock.close()
        RECORD["rss_mb_after_warm_up"] = round(served.rss_mb(), 1)
        yield served
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def load(server: Server) -> dict:
    """CLIENTS threads send PER_CLIENT requests each, to "default" and "long" in turn (so the adapter
    switches under load); /health is sampled meanwhile."""
    models = ("default", "long")
    expected = {model: answer(server, model) for model in models}
    assert expected["long"][1] == LOAD_TOKENS
    sampled, done = [], threading.Event()

    def watch():
        while not done.is_set():
            sampled.append(server.pending())
            time.sleep(0.05)

    def client(number: int) -> list[tuple[int, bool]]:
        conn = server.connect()
        out = []
        for i in range(PER_CLIENT):
            model = models[(number + i) % 2]
            status, data = chat(conn, model)
            out.append((status, status == 200 and text_and_tokens(data) == expected[model]))
        conn.close()
        return out

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        results = [r for rows in pool.map(client, range(CLIENTS)) for r in rows]
    seconds = time.perf_counter() - began
    done.set()
    watcher.join()
    statuses = {str(s): sum(1 for t, _ in results if t == s) for s, _ in results}
    return {"requests": len(results), "statuses": statuses, "same_as_alone": sum(same for _, same in results),
            "seconds": round(seconds, 1), "requests_per_s": round(len(results) / seconds, 1),
            "max_pending": max(sampled, default=0), "rss_mb_after": round(server.rss_mb(), 1)}


def test_two_hundred_requests_from_twenty_clients_are_all_answered(server):
    figures = load(server)
    RECORD["load"] = figures
    # Unbounded FIFO queue: every request is answered, none refused with 429/503.
    assert figures["statuses"] == {"200": CLIENTS * PER_CLIENT}
    assert figures["same_as_alone"] == CLIENTS * PER_CLIENT  # greedy: the same text as a lone request
    assert figures["max_pending"] <= CLIENTS  # one request in flight per client, no job left behind
    assert server.wait_idle(5) < 5


def test_over_long_and_oversized_requests_are_refused_and_the_server_stays_responsive(server):
    expected = answer(server)
    timings = {}
    for name, content in [("1 MB ascii", "x" * 2**20), ("1 MB chinese", "长" * (2**20 // 3))]:
        conn = server.connect()
        began = time.perf_counter()
        status, data = chat(conn, messages=[{"role": "user", "content": content}])
        timings[name] = round(time.perf_counter() - began, 2)
        conn.close()
        assert (status, data["error"]["code"]) == (400, "context_length_exceeded")
        assert timings[name] < 5  # counted in characters, never tokenised
    RECORD["over_long_refused_in_s"] = timings
    # Refused from the headers alone: the body is never read (none is sent here).
    refusals = {"413": "Content-Length: 1000000000\r\n", "411": "Transfer-Encoding: chunked\r\n",
                "411 ": "Content-Length: 10\r\nTransfer-Encoding: chunked\r\n"}  # TE would win over CL
    for status, headers in refusals.items():
        sock = raw(server, f"POST /v1/chat/completions HTTP/1.1\r\n{headers}")
        reply = read_until(sock, b"\r\n\r\n")
        sock.close()
        assert reply.startswith(f"HTTP/1.1 {status.strip()} ".encode()), reply
    assert answer(server) == expected


def test_a_slow_reader_does_not_hold_the_worker(server):
    expected = answer(server)
    slow = stream(server, "long", rcvbuf=4096)  # a small TCP window: the server cannot push far ahead
    read_until(slow, b'"role": "assistant"', size=64)  # the answer has started; now it stops reading
    others = []
    for _ in range(5):
        began = time.perf_counter()
        assert answer(server) == expected
        others.append(round(time.perf_counter() - began, 2))
    idle = server.wait_idle(5)  # the 64 tokens were generated into the slow reader's queue
    assert idle < 5 and max(others) < 5, (idle, others)
    rest = read_until(slow, b"data: [DONE]", size=256, pause=0.01)  # all of it, at 25 kB/s at most
    slow.close()
    assert b'"finish_reason": "length"' in rest  # nothing was lost while it waited
    RECORD["slow_reader"] = {"others_answered_in_s": others, "worker_idle_after_s": round(idle, 2)}


def started(sock: socket.socket) -> None:
    """Wait for the role chunk (sent just before the job is queued), then two steps of model "slow"."""
    read_until(sock, b'"role": "assistant"', size=64)
    time.sleep(2 * SLOW_STEP)


def test_a_client_that_hangs_up_frees_the_worker(server):
    freed = []
    for _ in range(3):
        sock = stream(server, "slow")  # 64 tokens at SLOW_STEP s each: 12.8 s of work
        started(sock)
        assert server.pending() == 1  # generating
        sock.close()  # hang up
        freed.append(round(server.wait_idle(6), 2))
    # One waiting in line: its job is skipped, not run, once the one ahead of it is gone too.
    first, queued = stream(server, "slow"), stream(server, "slow")
    started(first)
    started(queued)
    assert server.pending() == 2
    queued.close()
    first.close()
    freed.append(round(server.wait_idle(6), 2))
    began = time.perf_counter()
    assert answer(server, "long", 3)[1] == 3
    RECORD["hang_up"] = {"worker_free_after_s": freed, "next_answer_s": round(time.perf_counter() - began, 2)}
    assert max(freed) < 6  # within a step or two, not the 12.8 s the answers would take
    assert time.perf_counter() - began < 5


def test_memory_returns_near_its_starting_level(server):
    """RSS after everything above is within RSS_GROWTH_MB of RSS after the warm-up."""
    if "load" not in RECORD:  # run alone (-k): make the load here
        RECORD["load"] = load(server)
    assert server.wait_idle(10) < 10
    time.sleep(0.5)
    end = server.rss_mb()
    RECORD["rss_mb_end"] = round(end, 1)
    RECORD["rss_mb_growth"] = round(end - RECORD["rss_mb_after_warm_up"], 1)
    assert RECORD["rss_mb_growth"] < RSS_GROWTH_MB, RECORD


def test_zz_report(capsys):
    """Runs last: the figures (paste them in a note); -s shows them."""
    with capsys.disabled():
        print(f"\n[serve load] {json.dumps(RECORD, ensure_ascii=False)}")
