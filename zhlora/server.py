"""第七步: serve a trained run over an OpenAI-compatible HTTP API, with a chat page.

    zhlora serve --model_path outputs                                   # http://127.0.0.1:8000
    zhlora serve --model_path outputs --adapters math=outputs_math --api_key KEY

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "default", "messages": [{"role": "user", "content": "把1234写成中文数字"}]}'

Any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")`.
Open http://127.0.0.1:8000/ for the chat page (zhlora/web/). This file is the command:
its options, loading, and starting uvicorn. The HTTP side is serving/app.py (request schema
and errors: serving/schema.py), the model and its generation thread serving/engine.py,
the adapters serving/adapters.py.

Choices worth knowing:
- Models: "default" is the run's own adapter, each --adapters NAME=PATH (repeat the flag
  or join with commas) another one loaded into the same PeftModel, and "base" is that
  PeftModel with every adapter disabled (no second copy in memory). A full fine-tune
  offers "default" only.
- One worker thread generates, requests start in arrival order (a FIFO queue), and
  up to --batch_size of them (16) answer together: serving/engine.py batches the
  requests that share an adapter and decoding settings, and a request that arrives
  while a batch runs joins it (zhlora/refill.py). Selecting the adapter (set_adapter /
  disable_adapter) and generating happen together inside that thread, so a request
  can never run on another request's adapter: a request for another adapter waits
  for the batch in front of it to end. A seeded sampling request runs alone, so its
  seed gives the same answer whatever else is being asked. Under load a request waits
  its turn (GET /health shows how many are pending).
- A request that is cancelled (its client disconnected, or a stop string was hit)
  sets a flag; the worker reads it after every token, so the row leaves the batch
  within one decoding step. A request still waiting in the queue is skipped.
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

from zhlora.config import ConfigError
from zhlora.serving.adapters import add_adapters_argument, parse_adapters

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", default="outputs", help="a run folder (output.dir of training)")
    add_adapters_argument(parser, "more LoRA adapters to serve, e.g. math=outputs_math (request them as model NAME)")
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only; 0.0.0.0: the network")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=os.environ.get("ZHLORA_API_KEY"),
                        help="require `Authorization: Bearer KEY` on /v1/ (default: $ZHLORA_API_KEY)")
    parser.add_argument("--max_tokens_limit", type=int, default=1024, help="the largest max_tokens a request may ask")
    parser.add_argument("--max_input_chars", type=int, default=20000,
                        help="refuse conversations longer than this many characters (before tokenising)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="requests answered at once (1: strictly one after another)")


def run(args: argparse.Namespace) -> int:
    # the web stack loads when a server starts, not whenever the zhlora command does
    import uvicorn

    from zhlora.serving.app import Limits, build_app
    from zhlora.serving.engine import load_engine

    if min(args.max_tokens_limit, args.max_input_chars, args.batch_size) < 1:
        raise ConfigError("--max_tokens_limit, --max_input_chars and --batch_size must be >= 1")
    extra = parse_adapters(args.adapters)  # before the model load: a typo fails in a second
    engine = load_engine(args.model_path, extra, args.batch_size)
    if args.host not in LOOPBACK and not args.api_key:
        print(f"zhlora serve: warning: listening on {args.host} without --api_key: anyone who can reach this "
              "port can use the model", file=sys.stderr)
    app = build_app(engine, Limits(args.max_tokens_limit, args.max_input_chars), args.api_key)
    print(f"zhlora serve: http://{args.host}:{args.port}/  (models: {', '.join(engine.names())}; "
          f"API: http://{args.host}:{args.port}/v1{'; API key required' if args.api_key else ''})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
