"""第七步: serve a trained run over an OpenAI-compatible HTTP API, with a chat page.

    zhlora serve --model_path outputs                                   # http://127.0.0.1:8000
    zhlora serve --model_path outputs --adapters math=outputs_math --api_key KEY

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "default", "messages": [{"role": "user", "content": "把1234写成中文数字"}]}'

Any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")`.
Open http://127.0.0.1:8000/ for the chat page (zhlora/web/). The HTTP side, the
request schema and every error are in server_app.py; this file loads the models and
runs generation.

Choices worth knowing:
- Models: "default" is the run's own adapter, each --adapters NAME=PATH another one
  loaded into the same PeftModel, and "base" is that PeftModel with every adapter
  disabled (no second copy in memory). A full fine-tune offers "default" only.
- One generation at a time, in one worker thread, in arrival order (a FIFO queue).
  Selecting the adapter (set_adapter / disable_adapter) and generating happen
  together inside that thread, so a request can never run on another request's
  adapter. We queue rather than batch: a batch would need every row on the same
  adapter (or PEFT's per-row adapter_names), and more memory, for throughput that
  one person or a class trying a model out does not need. Under load a request
  waits its turn (GET /health shows how many are pending).
- A request that is cancelled (its client disconnected, or a stop string was hit)
  sets a flag; a StoppingCriteria reads it after every token, so the worker is free
  within one decoding step. A request still waiting in the queue is skipped. (This is
  why the worker calls model.generate itself rather than generation.stream, whose
  answer cannot be stopped once started.)
- Prompts come from formatting.encode_prompt, the function training used.
- Defaults follow the demo, not OpenAI: temperature 0.7, top_p 0.9, max_tokens 256
  (capped by --max_tokens_limit and by the model's context). temperature 0 = greedy.
- Binds 127.0.0.1 unless --host says otherwise. With --api_key (or ZHLORA_API_KEY,
  which keeps the key out of `ps`), every /v1/ call needs `Authorization: Bearer KEY`;
  the page (GET /, /web/) and GET /health stay open: they hold no data and run no
  model, and the page asks for the key itself.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from zhlora.formatting import stop_ids
from zhlora.generation import generation_config  # the same decoding settings as the demo

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Job:
    """One request's generation: what to generate, where pieces go, and how it ended."""
    prompt: list[int]
    model: str  # "base", "default" or an --adapters name
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    seed: int | None
    emit: object  # thread-safe callable taking a text piece, or DONE
    cancel: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0
    ended_by_eos: bool = False
    finish: str = "stop"  # OpenAI's finish_reason: "stop" (EOS or a stop string) or "length"
    error: BaseException | None = None


DONE = object()  # the last thing a job emits, after its final piece


class _Cancelled(StoppingCriteria):
    """Stop as soon as the job's cancel flag is set (generate checks after every token)."""

    def __init__(self, cancel: threading.Event):
        self.cancel = cancel

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.cancel.is_set(), dtype=torch.bool, device=input_ids.device)


class _PieceStreamer(TextStreamer):
    """Hands decoded pieces to job.emit (TextStreamer waits for whole words) and counts the new tokens."""

    def __init__(self, tokenizer, job: Job):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.job, self.stop = job, set(stop_ids(tokenizer))

    def put(self, value):
        if not self.next_tokens_are_prompt:  # the first put is the prompt itself
            ids = value.reshape(-1).tolist()
            self.job.completion_tokens += len(ids)
            self.job.ended_by_eos = ids[-1] in self.stop
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.job.emit(text)


class Engine:
    """The one model and the one thread that generates with it, in arrival order."""

    def __init__(self, model, tokenizer, template: str, adapters: list[str], is_lora: bool):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.adapters, self.is_lora = adapters, is_lora
        self.context = getattr(model.config, "max_position_embeddings", None)  # prompt + answer must fit
        self.pending = 0  # jobs queued or running (read by /health)
        self._lock = threading.Lock()  # pending changes on the event loop and in the worker
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zhlora-generate")

    def names(self) -> list[str]:
        return (["base"] if self.is_lora else []) + self.adapters

    def submit(self, job: Job) -> None:
        """Queue a job: its pieces arrive through job.emit, then DONE (also when it fails or is cancelled)."""
        with self._lock:
            self.pending += 1
        self._worker.submit(self._run, job)

    @contextmanager
    def _selected(self, name: str):
        if name == "base":
            with self.model.disable_adapter():  # every adapter off: exactly the base weights
                yield self.model
        else:
            if self.is_lora:
                self.model.set_adapter(name)
            yield self.model

    def _run(self, job: Job) -> None:
        try:
            if job.cancel.is_set():  # the client left while the job waited in line
                return
            streamer = _PieceStreamer(self.tokenizer, job)
            device = next(self.model.parameters()).device
            ids = torch.tensor([job.prompt], device=device)
            with self._selected(job.model) as model, torch.no_grad():
                if job.seed is not None:
                    torch.manual_seed(job.seed)  # global RNG: safe, only this thread samples
                config = generation_config(model, self.tokenizer, job.max_new_tokens, job.do_sample,
                                           job.temperature, job.top_p)
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                               streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled(job.cancel)]))
        except Exception as err:  # reported to this request's client; the worker lives on
            job.error = err
        finally:
            with self._lock:
                self.pending -= 1
            job.emit(DONE)


def load_engine(model_path: str | Path, adapters: list[tuple[str, Path]]) -> Engine:
    """The run at model_path, with each (name, path) adapter loaded beside its own.

    Each extra adapter gets the safety check load_run gives the run's own: a pickle, or an adapter
    made for another base model (name, shapes, target modules), is an AdapterError saying which.
    """
    from peft import PeftModel

    from zhlora.chat import ChatError
    from zhlora.generation import load_run
    from zhlora.safety import check_adapter_folder

    model, tokenizer, cfg = load_run(model_path)  # on the run's model.device
    is_lora = isinstance(model, PeftModel)
    if adapters and not is_lora:
        raise ChatError(f"--adapters: {model_path} is a full fine-tune; adapters need a LoRA run")
    for name, path in adapters:
        base = model.get_base_model()
        check_adapter_folder(path, base.config, base_model=base)  # no pickles, fits this base model (safety.py)
        try:
            model.load_adapter(str(path), adapter_name=name)
        except (RuntimeError, ValueError, KeyError, OSError) as err:  # what the check cannot foresee
            raise ChatError(f"--adapters {name}={path}: cannot load it onto this base model: {err}") from err
    return Engine(model.eval(), tokenizer, cfg.model.template, ["default"] + [n for n, _ in adapters], is_lora)


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Serve `app` from a background thread (tests, notebooks); returns (uvicorn.Server, port).

    Stop it with `server.should_exit = True`. port 0 picks a free port.
    """
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))  # bound here, so the port is known before the thread starts
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.02)
    return server, sock.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zhlora serve",
                                     description="第七步: an OpenAI-compatible API and a chat page")
    parser.add_argument("--model_path", default="outputs", help="a run folder (output.dir of training)")
    parser.add_argument("--adapters", nargs="+", default=[], metavar="NAME=PATH",
                        help="more LoRA adapters to serve, e.g. math=outputs_math (request them as model NAME)")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only; 0.0.0.0: the network")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=os.environ.get("ZHLORA_API_KEY"),
                        help="require `Authorization: Bearer KEY` on /v1/ (default: $ZHLORA_API_KEY)")
    parser.add_argument("--max_tokens_limit", type=int, default=1024, help="the largest max_tokens a request may ask")
    parser.add_argument("--max_input_chars", type=int, default=20000,
                        help="refuse conversations longer than this many characters (before tokenising)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from zhlora.chat import ChatError, parse_adapters
    from zhlora.config import ConfigError
    from zhlora.formatting import TemplateError
    from zhlora.models import ModelSourceError
    from zhlora.server_app import Limits, build_app

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_tokens_limit < 1 or args.max_input_chars < 1:
        parser.error("--max_tokens_limit and --max_input_chars must be >= 1")
    try:
        extra = parse_adapters(",".join(args.adapters))  # before the model load: a typo fails in a second
        engine = load_engine(args.model_path, extra)
    except (ChatError, ConfigError, ModelSourceError, OSError, TemplateError) as err:
        print(f"zhlora serve: error: {err}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK and not args.api_key:
        print(f"zhlora serve: warning: listening on {args.host} without --api_key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    import uvicorn

    app = build_app(engine, Limits(args.max_tokens_limit, args.max_input_chars), args.api_key)
    print(f"zhlora serve: http://{args.host}:{args.port}/  (models: {', '.join(engine.names())}; "
          f"API: http://{args.host}:{args.port}/v1{'; API key required' if args.api_key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
