"""Batched generation that refills: a finished row leaves the batch and the next prompt takes its place.

    answers = generate_refill(model, prompts, config, pad_id, batch_size=32, seed=0)   # [(ids, finished, s)]
    Refill(model, config, pad_id, 16, generator, more=take_jobs, on_token=emit).run()   # the server


Why: `model.generate` on a batch runs until its longest answer ends. On the test rows of
the quick start most answers are 5 to 20 tokens and a few run to the budget, so with 32
rows in one call most of the batch computes padding for most of the steps (measured: 18%
of the row-steps were answer tokens). Here every step feeds only rows that are still
answering; when enough rows have finished (a quarter of the batch, or any once the queue
is empty), they are dropped and waiting prompts are prefilled and joined in.

How the rows share one KV cache (transformers' DynamicCache, [batch, heads, length, dim]
per layer): every row is right-aligned, so each row's newest token sits in the last
column, and the columns before a row's first token are masked out. A joining group is
prefilled on its own, left-padded the same way, and both caches are padded on the left
to the longer one before they are stacked. Positions (rotary) come from each row's own
count of real tokens, never from the column, so padding shifts nothing.

Prompts that begin alike (the chat template's system prompt: 24 of the ~65 tokens of a quick
start test prompt) share that head: a joining group's common head is prefilled once, as one
row, its cache copied to every row, and only each row's own part is prefilled after it (the
padding then sits between the head and the row's own tokens; the mask hides it all the same).
share_prefix=0 turns this off.

The server (serving/engine.py) feeds requests in as they arrive (`more`), each with its
own budget, and reads each row's tokens as they come (`on_token`); a row whose client
left is cancelled (`cancelled`) and leaves at the next refill.

Decoding is the same as model.generate's with zhlora.generation.decoding_settings: greedy
is the argmax of the logits; sampling applies only temperature and top_p (transformers'
own warpers) and draws with a seeded generator. Greedy answers equal those of one prompt
at a time up to floating-point rounding: a different batch shape may sum in a different
order, which can flip an argmax where two tokens are within ~1e-5 (fp32; bf16 ~1e-2).
tests/test_generation.py checks the texts are identical on the tiny test model.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


SHARE_PREFIX = 8  # tokens: a shorter common head costs a model call for too little saved


@dataclass
class _Row:
    key: object  # the caller's name for it: an index into prompts, or a server job
    length: int  # real tokens in the cache for this row (prompt + answer so far)
    budget: int  # max_new_tokens
    new: list[int] = field(default_factory=list)
    done: bool = False
    finished: bool = False  # ended with a stop token
    seconds: float = 0.0  # its share of every step it took part in


def _left_pad(tensor, width: int):
    """Pad a [batch, heads, length, dim] cache tensor (dim -2) or a [batch, length] mask on the left."""
    import torch.nn.functional as F

    missing = width - tensor.shape[-2 if tensor.dim() == 4 else 1]
    if missing <= 0:
        return tensor
    return F.pad(tensor, (0, 0, missing, 0) if tensor.dim() == 4 else (missing, 0))


def left_padded(prompts: list[list[int]], pad_id: int):
    """(input_ids, attention_mask) of prompts padded on the left, so each ends where its answer starts."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def shared_head(prompts: list[list[int]], minimum: int) -> int:
    """How many leading tokens every prompt shares, each keeping at least one of its own (its last
    token's logits choose its first answer token); 0 when under `minimum` or for a single prompt."""
    from os.path import commonprefix

    head = min(len(commonprefix(prompts)), min(len(p) for p in prompts) - 1)
    return head if len(prompts) > 1 and minimum and head >= minimum else 0


def _choose(logits, config, generator):
    """The next token of each row: argmax (greedy), or a draw after temperature and top_p."""
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    if not config.do_sample:
        return logits.argmax(-1)
    logits = TopPLogitsWarper(config.top_p)(None, TemperatureLogitsWarper(config.temperature)(None, logits))
    return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator).squeeze(1)


class Refill:
    """The running rows, their shared cache and mask, and the token each feeds next.

    more(room) -> [(key, prompt ids, max_new_tokens)], called whenever rows can join;
    on_token(key, token) for each new token; cancelled(key) -> True ends a row early;
    on_done(key) once, as soon as a row has ended.
    """

    def __init__(self, model, config, pad_id: int, batch_size: int, generator, more, on_token=None,
                 cancelled=None, on_done=None, share_prefix: int = SHARE_PREFIX):
        self.model, self.config, self.pad_id, self.batch_size = model, config, pad_id, batch_size
        self.share_prefix = share_prefix  # the shortest common head worth its own prefill call (0: off)
        self.generator, self.more, self.on_token = generator, more, on_token
        self.cancelled, self.on_done = cancelled, on_done
        self.stop = set(config.eos_token_id)
        self.device = next(model.parameters()).device
        self.rows: list[_Row] = []
        self.cache = self.mask = self.next = None
        self.group = max(1, batch_size // 4)  # rows leave and join in groups: each costs a cache copy

    def run(self) -> list[_Row]:
        """Decode until `more` has nothing left and every row is done; the rows, in the order they ended."""
        import torch

        ended, exhausted = [], False  # exhausted: the last call to `more` gave fewer rows than asked
        with torch.no_grad():
            while True:
                done = [row for row in self.rows if row.done]
                if done and (exhausted or len(done) >= self.group):
                    ended += done
                    self._drop_done()
                room, joining = self.batch_size - len(self.rows), []
                if room and (room >= self.group or exhausted):
                    joining = self.more(room)
                    exhausted = len(joining) < room
                if joining:
                    self._join(joining)
                elif any(not row.done for row in self.rows):
                    self._step()
                elif not self.rows:  # nothing running, and `more` just had nothing
                    return ended

    def _take(self, rows: list[_Row], tokens, began: float) -> None:
        """Record each row's new token (rows already done only share the time)."""
        share = (time.perf_counter() - began) / len(rows)
        for row, token in zip(rows, tokens.tolist()):
            row.seconds += share
            if row.done:
                continue
            row.new.append(token)
            if self.on_token:
                self.on_token(row.key, token)
            row.finished = token in self.stop
            row.done = row.finished or len(row.new) >= row.budget or bool(self.cancelled and self.cancelled(row.key))
            if row.done and self.on_done:
                self.on_done(row.key)

    def _join(self, joining: list[tuple]) -> None:
        """Prefill the new prompts (left-padded, on their own) and stack them under the running rows."""
        import torch
        from transformers import DynamicCache

        began = time.perf_counter()
        prompts = [prompt for _, prompt, _ in joining]
        head = shared_head(prompts, self.share_prefix)
        cache = self._head_cache(prompts[0][:head], len(prompts)) if head else DynamicCache(config=self.model.config)
        ids, mask = left_padded([prompt[head:] for prompt in prompts], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        mask = torch.cat([torch.ones_like(mask[:, :1]).expand(-1, head), mask], dim=1)  # the head's columns
        # as model.generate makes them for left padding, counting the head's tokens
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, head:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True, logits_to_keep=1)
        rows = [_Row(key, len(prompt), budget) for key, prompt, budget in joining]
        tokens = _choose(out.logits[:, -1], self.config, self.generator)
        self._take(rows, tokens, began)
        if self.cache is None:
            self.rows, self.cache, self.mask, self.next = rows, out.cache, mask, tokens
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.cache = DynamicCache(config=self.model.config, ddp_cache_data=[
            (torch.cat([_left_pad(k1, width), _left_pad(k2, width)]),
             torch.cat([_left_pad(v1, width), _left_pad(v2, width)]))
            for (k1, v1, _), (k2, v2, _) in zip(self.cache, out.cache)])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)])
        self.rows, self.next = self.rows + rows, torch.cat([self.next, tokens])

    def _head_cache(self, head: list[int], rows: int):
        """A cache holding the shared head, prefilled once and copied for each of `rows` rows."""
        import torch
        from transformers import DynamicCache

        out = self.model(input_ids=torch.tensor([head], device=self.device),
                         cache=DynamicCache(config=self.model.config), use_cache=True, logits_to_keep=1)
        return DynamicCache(config=self.model.config, ddp_cache_data=[
            (k.expand(rows, -1, -1, -1).contiguous(), v.expand(rows, -1, -1, -1).contiguous())
            for k, v, _ in out.cache])

    def _step(self) -> None:
        """One decoding step of every row in the batch (rows already done ride along until dropped)."""
        import torch

        began = time.perf_counter()
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        positions = torch.tensor([[row.length] for row in self.rows], device=mask.device)
        out = self.model(input_ids=self.next[:, None], attention_mask=mask, position_ids=positions,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache, self.mask = out.cache, mask
        for row in self.rows:
            row.length += 1
        self.next = _choose(out.logits[:, -1], self.config, self.generator)
        self._take(self.rows, self.next, began)

    def _drop_done(self) -> None:
        """Remove finished rows, then the columns that are padding for every row left."""
        import torch
        from transformers import DynamicCache

        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if not keep:
            self.rows, self.cache, self.mask, self.next = [], None, None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) == 0).cumprod(0).sum())  # leading all-padding columns
        self.mask = mask[:, start:]
        self.cache = DynamicCache(config=self.model.config, ddp_cache_data=[
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v, _ in self.cache])
        self.rows, self.next = [self.rows[i] for i in keep], self.next.index_select(0, index)


def generate_refill(model, prompts: list[list[int]], config, pad_id: int, batch_size: int, seed: int = 0,
                    share_prefix: int = SHARE_PREFIX):
    """(token_ids, finished, seconds) per prompt, in the order given; config is the
    GenerationConfig that zhlora.generation.generation_config makes."""
    import torch

    waiting = deque(sorted(range(len(prompts)), key=lambda i: len(prompts[i])))  # similar lengths join together

    def more(room: int) -> list[tuple]:
        taken = [waiting.popleft() for _ in range(min(room, len(waiting)))]
        return [(i, prompts[i], config.max_new_tokens) for i in taken]

    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    rows = Refill(model, config, pad_id, batch_size, generator, more, share_prefix=share_prefix).run()
    out = {row.key: (row.new, row.finished, row.seconds) for row in rows}
    return [out[i] for i in range(len(prompts))]
