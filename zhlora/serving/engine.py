"""The inference engine of `zhlora serve`: one model, one worker thread, jobs in arrival order.

    engine = load_engine("outputs", [("math", Path("outputs_math"))])
    engine.submit(Job(prompt_ids, "math", 256, True, 0.7, 0.9, None, emit=print))  # pieces, then DONE

The HTTP side (serving/app.py) turns a request into a Job and reads its pieces back; this
module knows nothing of HTTP. Why one thread and a queue, not batching, and how a request
is cancelled: see zhlora/server.py's docstring.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from zhlora.formatting import stop_ids
from zhlora.generation import generation_config  # the same decoding settings as the demo
from zhlora.serving.adapters import answering_as, load_run_with_adapters


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

    def _run(self, job: Job) -> None:
        try:
            if job.cancel.is_set():  # the client left while the job waited in line
                return
            streamer = _PieceStreamer(self.tokenizer, job)
            device = next(self.model.parameters()).device
            ids = torch.tensor([job.prompt], device=device)
            with answering_as(self.model, job.model) as model, torch.no_grad():
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
    """The run at model_path, with each (name, path) adapter loaded beside its own ("default").

    Each extra adapter gets the safety check load_run gives the run's own (serving/adapters.py): a
    pickle, or an adapter made for another base model (name, shapes, target modules), is an
    AdapterError saying which.
    """
    from peft import PeftModel

    model, tokenizer, cfg = load_run_with_adapters(model_path, adapters)  # on the run's model.device
    names = ["default"] + [name for name, _ in adapters]
    return Engine(model, tokenizer, cfg.model.template, names, isinstance(model, PeftModel))
