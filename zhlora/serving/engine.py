"""The inference engine of `zhlora serve`: one model, one worker thread, requests batched as they come.

    engine = load_engine("outputs", [("math", Path("outputs_math"))])
    engine.submit(Job(prompt_ids, "math", 256, True, 0.7, 0.9, None, emit=print))  # pieces, then DONE

The HTTP side (serving/app.py) turns a request into a Job and reads its pieces back; this
module knows nothing of HTTP. The worker takes the oldest job, then every job queued behind
it that can share its batch (same adapter, same decoding settings, no seed of its own), and
runs them through zhlora/refill.py: a job that arrives while the batch runs joins it, and a
job that ends (stop token, budget, or cancelled) leaves it and gets its DONE at once. A job
that cannot share (another adapter, a seeded sample) waits for the batch in front of it to
end: jobs start in arrival order. How a request is cancelled: zhlora/server.py's docstring.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TextStreamer

from zhlora.formatting import stop_ids
from zhlora.generation import generation_config  # the same decoding settings as the demo
from zhlora.refill import Refill
from zhlora.serving.adapters import answering_as, load_run_with_adapters

BATCH_SIZE = 16  # rows answering at once (zhlora serve --batch_size)


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


def _shares_batch(first: Job, job: Job) -> bool:
    """Whether job can run in first's batch: the same adapter and decoding settings, and no seed
    (a seeded sample repeats only when nothing else draws from its generator)."""
    if job.model != first.model or job.do_sample != first.do_sample:
        return False
    return not job.do_sample or (job.temperature, job.top_p, job.seed, first.seed) == (
        first.temperature, first.top_p, None, None)


class Engine:
    """The one model and the one thread that generates with it, batching the jobs it can."""

    def __init__(self, model, tokenizer, template: str, adapters: list[str], is_lora: bool,
                 batch_size: int = BATCH_SIZE):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.adapters, self.is_lora, self.batch_size = adapters, is_lora, batch_size
        self.context = getattr(model.config, "max_position_embeddings", None)  # prompt + answer must fit
        self.pending = 0  # jobs queued or running (read by /health)
        self._waiting: deque[Job] = deque()
        self._ready = threading.Condition()  # guards _waiting and pending
        threading.Thread(target=self._work, daemon=True, name="zhlora-generate").start()

    def names(self) -> list[str]:
        return (["base"] if self.is_lora else []) + self.adapters

    def submit(self, job: Job) -> None:
        """Queue a job: its pieces arrive through job.emit, then DONE (also when it fails or is cancelled)."""
        with self._ready:
            self.pending += 1
            self._waiting.append(job)
            self._ready.notify()

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._waiting:
                    self._ready.wait()
                first = self._waiting.popleft()
            self._run_batch(first)

    def _end(self, job: Job, streamer: _PieceStreamer | None = None) -> None:
        try:
            if streamer is not None and job.error is None:
                streamer.end()  # the text held back for a whole word
        finally:
            with self._ready:
                self.pending -= 1
            job.emit(DONE)

    def _run_batch(self, first: Job) -> None:
        """first and the jobs that join it, until the batch is empty; every job gets its DONE."""
        streamers: dict[int, tuple[Job, _PieceStreamer]] = {}
        queue = [first]

        def more(room: int) -> list[tuple]:
            with self._ready:
                while len(queue) < room and self._waiting and _shares_batch(first, self._waiting[0]):
                    queue.append(self._waiting.popleft())
            joining, queue[:] = queue[:room], queue[room:]
            rows = []
            for job in joining:
                if job.cancel.is_set():  # the client left while the job waited in line
                    self._end(job)
                    continue
                streamers[id(job)] = (job, _PieceStreamer(self.tokenizer, job))
                streamers[id(job)][1].put(torch.tensor([job.prompt]))  # the prompt: skipped, as generate does
                rows.append((job, job.prompt, job.max_new_tokens))
            return rows

        def on_token(job: Job, token: int) -> None:
            streamers[id(job)][1].put(torch.tensor([token]))

        def on_done(job: Job) -> None:
            self._end(*streamers.pop(id(job)))

        try:
            with answering_as(self.model, first.model) as model:
                config = generation_config(model, self.tokenizer, first.max_new_tokens, first.do_sample,
                                           first.temperature, first.top_p)
                generator = torch.Generator(device=next(model.parameters()).device)
                if first.seed is not None:
                    generator.manual_seed(first.seed)
                else:
                    generator.seed()  # a fresh random seed: unseeded answers vary
                Refill(model, config, self.tokenizer.pad_token_id, self.batch_size, generator, more, on_token,
                       cancelled=lambda job: job.cancel.is_set(), on_done=on_done).run()
        except Exception as err:  # reported to each running job's client; the worker lives on
            for job, streamer in list(streamers.values()):
                job.error = err
            for job in queue:  # taken from the line but not started
                job.error = err
                self._end(job)
        finally:
            for job, streamer in list(streamers.values()):
                self._end(job, streamer)
            streamers.clear()


def load_engine(model_path: str | Path, adapters: list[tuple[str, Path]], batch_size: int = BATCH_SIZE) -> Engine:
    """The run at model_path, with each (name, path) adapter loaded beside its own ("default").

    Each extra adapter gets the safety check load_run gives the run's own (serving/adapters.py): a
    pickle, or an adapter made for another base model (name, shapes, target modules), is an
    AdapterError saying which.
    """
    from peft import PeftModel

    model, tokenizer, cfg = load_run_with_adapters(model_path, adapters)  # on the run's model.device
    names = ["default"] + [name for name, _ in adapters]
    return Engine(model, tokenizer, cfg.model.template, names, isinstance(model, PeftModel), batch_size)
