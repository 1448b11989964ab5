"""第六步: talk to a trained run, interactively or over a file of questions.

    python examples/demo.py --model_path outputs                     # multi-turn chat, streamed
    python examples/demo.py --model_path outputs --compare           # base, then fine-tuned, per question
    python examples/demo.py --model_path outputs --adapters math=outputs_math   # /adapter math switches
    python examples/demo.py --model_path outputs --mode batch        # built-in held-out questions, base vs LoRA
    python examples/demo.py --model_path outputs --mode batch --input questions.jsonl --output answers.jsonl

`zhlora demo ...` is the same command. Every prompt comes from formatting.encode_prompt,
the function training used, so the demo asks exactly what the model learned to answer.

Choices worth knowing:
- Sampling: interactive answers are sampled (temperature 0.7, top_p 0.9) unless --greedy
  or `/set greedy on`; batch answers are greedy (deterministic, comparable between runs)
  unless --temperature or --top_p is given on the command line.
- --compare prints the base answer, then the fine-tuned one, each under its own label,
  rather than in two columns: both stream token by token, and two streaming columns
  need a full-screen terminal UI. The history keeps the fine-tuned answer, so in later
  turns the base model continues the fine-tuned conversation.
- --mode batch with no --input asks a built-in held-out set: HELDOUT_PER_TASK rows of each
  task the run trained on that has held-out phrasings (tasks.heldout_rows: phrasings no
  training row uses, fresh numbers), answered greedily by the base model and the fine-tuned
  one side by side, each checked against its reference; written to
  <model_path>/demo_heldout.jsonl unless --output says otherwise.
- --adapters NAME=PATH (repeat the flag or join with commas, as for serve, evaluate and
  merge-adapters) loads more adapters beside the run's own "default" (serving/adapters.py).
- "base" is the run's own PeftModel with every adapter disabled (no second copy in
  memory). A full fine-tune has no adapter: --compare loads the base model named in
  its config.yaml beside it.
- Ctrl-C stops the demo (status 130): generation runs in a thread that cannot be cut
  short, so going back to the prompt would let two answers run at once.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from zhlora.config import load_config
from zhlora.errors import ZhloraError
from zhlora.files import write_jsonl
from zhlora.formatting import encode_prompt
from zhlora.generation import generate, load_base, stream
from zhlora.readers import decode, read_jsonl
from zhlora.serving.adapters import add_adapters_argument, answering_as, load_run_with_adapters, parse_adapters
from zhlora.tasks import HELDOUT_TASKS, check_answer, heldout_rows

HELP = """命令 (commands):
  /reset                  清空对话历史 (clear the history)
  /adapter NAME           切换 adapter ({names}); base = 关闭 adapter 的基础模型
  /set temperature 0.3    采样设置, 也可 top_p 0.8, max_new_tokens 64, greedy on|off
  /help                   显示本帮助
  /exit                   退出 (Ctrl-D 同样)"""


class ChatError(ZhloraError, ValueError):
    """A demo argument or input zhlora refuses; the message says what to change."""


def _number(key: str, kind, ok, rule: str):
    """A parser for one numeric setting, shared by argparse and `/set`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key} {text}: not a{'n integer' if kind is int else ' number'}") from None
        if not ok(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"{key} {text}: {rule}")
        return value
    return parse


def _on_off(text: str) -> bool:
    if text.lower() not in ("on", "off", "true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"greedy {text}: write on or off")
    return text.lower() in ("on", "true", "1")


SETTINGS = {  # what `/set KEY VALUE` may change
    "temperature": _number("temperature", float, lambda v: 0 < v < float("inf"), "must be > 0 (no sampling: greedy)"),
    "top_p": _number("top_p", float, lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "max_new_tokens": _number("max_new_tokens", int, lambda v: v >= 1, "must be >= 1"),
    "greedy": _on_off,
}


@dataclass
class Sampling:
    """How answers are generated; `/set KEY VALUE` changes one field."""
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    greedy: bool = False

    def kwargs(self) -> dict:
        """The keyword arguments generation.generate and generation.stream share."""
        return {"max_new_tokens": self.max_new_tokens, "do_sample": not self.greedy,
                "temperature": self.temperature, "top_p": self.top_p}

    def describe(self) -> str:
        if self.greedy:
            return f"greedy, max_new_tokens {self.max_new_tokens}"
        return f"temperature {self.temperature}, top_p {self.top_p}, max_new_tokens {self.max_new_tokens}"


@dataclass
class Chat:
    """The models that can answer, which one does, how it samples, and the conversation."""
    model: object  # a PeftModel for a LoRA run, a plain model for a full fine-tune
    tokenizer: object
    template: str  # cfg.model.template, as in training
    sampling: Sampling
    adapters: list[str]  # adapter names in the PeftModel; ["default"] stands for a full fine-tune
    is_lora: bool
    base: object | None = None  # the base model beside a full fine-tune (--compare), else None
    active: str = "default"  # an adapter name, or "base"
    compare: bool = False
    history: list[dict] = field(default_factory=list)

    def names(self) -> list[str]:
        return self.adapters + (["base"] if self.is_lora or self.base is not None else [])


def load_chat(args) -> Chat:
    """The run, its extra adapters (serving/adapters.py), and a base model beside a full fine-tune for --compare."""
    extra = parse_adapters(args.adapters)  # before the model load: a typo fails in a second
    from peft import PeftModel

    model, tokenizer, cfg = load_run_with_adapters(args.model_path, extra, args.allow_pickle)
    is_lora = isinstance(model, PeftModel)
    base = None
    if args.compare and not is_lora:
        base, _ = load_base(load_config(Path(args.model_path) / "config.yaml"))  # model.name = the base
    greedy = args.greedy or (args.mode == "batch" and args.temperature is None and args.top_p is None)
    sampling = Sampling(args.max_new_tokens, 0.7 if args.temperature is None else args.temperature,
                        0.9 if args.top_p is None else args.top_p, greedy)
    return Chat(model, tokenizer, cfg.model.template, sampling, ["default"] + [n for n, _ in extra],
                is_lora, base, compare=args.compare)


# ---- interactive -------------------------------------------------------------------


def stream_answer(chat: Chat, name: str, prompt: list[int]) -> str:
    """Print one answer as it is generated, after a label naming who answers; return its text."""
    label = name if not chat.compare else ("base · 未微调" if name == "base" else f"{name} · 微调后")
    print(f"助手[{label}]> ", end="", flush=True)
    pieces: list[str] = []
    with answering_as(chat.model, name, chat.base) as model:
        for piece in stream(model, chat.tokenizer, prompt, **chat.sampling.kwargs()):
            if not pieces:
                piece = piece.lstrip()  # answers often open with a newline
                if not piece:
                    continue
            pieces.append(piece)
            print(piece, end="", flush=True)
    text = "".join(pieces).strip()
    print("" if text else "(空回答 / empty answer)")
    return text


def ask(chat: Chat, question: str) -> None:
    user = {"role": "user", "content": question}
    prompt = encode_prompt(chat.history + [user], chat.tokenizer, chat.template)
    if chat.compare and chat.active != "base":
        stream_answer(chat, "base", prompt)
    answer = stream_answer(chat, chat.active, prompt)
    chat.history += [user, {"role": "assistant", "content": answer}]


def command(chat: Chat, line: str) -> bool:
    """Run one /command; False means exit."""
    name, *rest = line.split()
    if name in ("/exit", "/quit"):
        return False
    if name == "/help":
        print(HELP.format(names=", ".join(chat.names())))
    elif name == "/reset":
        chat.history.clear()
        print("已清空对话历史 (history cleared)")
    elif name == "/adapter":
        switch_adapter(chat, rest[0] if rest else None)
    elif name == "/set" and len(rest) == 2 and rest[0] in SETTINGS:
        try:
            setattr(chat.sampling, rest[0], SETTINGS[rest[0]](rest[1]))
            print(f"已设置 {rest[0]} = {rest[1]} ({chat.sampling.describe()})")
        except argparse.ArgumentTypeError as err:
            print(f"无效的值 (invalid value): {err}")
    elif name == "/set":
        print(f"用法 (usage): /set KEY VALUE, KEY 是 {', '.join(SETTINGS)}; 当前: {chat.sampling.describe()}")
    else:
        print(f"未知命令 (unknown command) {name}; /help 查看命令")
    return True


def switch_adapter(chat: Chat, name: str | None) -> None:
    names = ", ".join(chat.names())
    if name is None:
        print(f"当前 adapter: {chat.active}; 可用 (available): {names}")
    elif name not in chat.names():
        hint = "" if chat.is_lora else " (全量微调 full fine-tune: 没有 adapter, base 需要 --compare)"
        print(f"未知 adapter: {name}; 可用 (available): {names}{hint}")
    else:
        chat.active = name  # answering_as makes it the active adapter for each answer
        print(f"已切换到 adapter: {name}" + (" (基础模型 base model)" if name == "base" else ""))


def interactive(chat: Chat) -> int:
    """Read questions and /commands from stdin until /exit or end of input."""
    tty = sys.stdin.isatty()
    kind = f"LoRA adapters: {', '.join(chat.adapters)}, base" if chat.is_lora else "full fine-tune"
    print(f"zhlora demo ({kind}); sampling: {chat.sampling.describe()}")
    print("输入问题开始对话; /help 查看命令, /exit 退出。" + (" --compare: 先 base, 后微调模型。" if chat.compare else ""))
    while True:
        try:
            line = input("你> " if tty else "").strip()
        except EOFError:
            print()
            return 0
        if not tty:
            print(f"你> {line}")  # echo piped input, so the transcript reads like the chat
        if line.startswith("/"):
            if not command(chat, line):
                return 0
        elif line:
            ask(chat, line)


# ---- batch ---------------------------------------------------------------------------


def read_questions(path: Path, chat: Chat) -> tuple[list[dict], list[list[int]], list[str]]:
    """Rows of a JSONL file, their prompts, and `PATH:LINE: problem` for each line skipped."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ChatError(f"--input {path}: cannot read: {err.strerror or err}") from err
    text, issue = decode(data, "utf-8")
    if issue:
        return [], [], [f"{path}:{issue.line}: {issue.message}"]
    records, issues = read_jsonl(text)
    problems = [(i.line, i.message) for i in issues]
    rows, prompts = [], []
    for line, row in records:
        if not isinstance(row, dict):
            problems.append((line, 'expected a JSON object such as {"instruction": "...", "input": "..."}'))
        elif not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            problems.append((line, "instruction: missing or empty"))
        elif not isinstance(row.get("input", ""), str):
            problems.append((line, "input: must be a string"))
        else:
            try:
                prompts.append(encode_prompt(row, chat.tokenizer, chat.template))
                rows.append(row)
            except (TypeError, ValueError, KeyError) as err:  # e.g. a malformed `history`
                problems.append((line, f"cannot build the prompt: {err}"))
    return rows, prompts, [f"{path}:{line}: {message}" for line, message in sorted(problems)]


def write_answers(path: Path, rows: list[dict]) -> None:
    try:
        write_jsonl(path, rows)  # atomic: a killed demo never leaves half a file
    except OSError as err:
        raise ChatError(f"--output {path}: cannot write: {err.strerror or err}") from err


def batch(chat: Chat, input_path: Path, output_path: Path, seed: int) -> int:
    """Answer every row of --input (batched generation), write them with `response` to --output."""
    rows, prompts, problems = read_questions(input_path, chat)
    for problem in problems:
        print(problem, file=sys.stderr)
    columns = [("response", chat.active)] + ([("base_response", "base")] if chat.compare else [])
    for column, name in columns:
        with answering_as(chat.model, name, chat.base) as model:
            answers = generate(model, chat.tokenizer, prompts, seed=seed, **chat.sampling.kwargs())
        for row, answer in zip(rows, answers):
            row[column] = answer.text
    write_answers(output_path, rows)
    skipped = f"; 跳过 {len(problems)} 行有问题的输入 (skipped bad lines)" if problems else ""
    print(f"已写入 {len(rows)} 条回答 -> {output_path} ({chat.sampling.describe()}){skipped}")
    return 1 if problems else 0


# ---- command line --------------------------------------------------------------------


HELDOUT_PER_TASK = 6
HELDOUT_MAX_NEW_TOKENS = 64  # the longest self_cognition answer is ~55 tokens; the base would ramble for 256
# All 30 questions in one batch: each decoding step costs little more for 30 rows than for 8 on a CPU,
# and the base model rambles to max_new_tokens, so fewer batches is most of the demo's time.
HELDOUT_BATCH_SIZE = 32


def heldout_tasks(cfg) -> list[str]:
    """The run's tasks that have held-out phrasings (all such tasks for a run on every task)."""
    return [t for t in (cfg.data.tasks or HELDOUT_TASKS) if t in HELDOUT_TASKS]


def heldout_batch(chat: Chat, cfg, output_path: Path) -> int:
    """Answer the built-in held-out questions with the base and the fine-tuned model, side by side."""
    tasks = heldout_tasks(cfg)
    if not tasks:
        raise ChatError(f"the run was trained on data.tasks={cfg.data.tasks}, none of which has held-out "
                        "questions; give your own with --input FILE --output FILE")
    rows = heldout_rows(HELDOUT_PER_TASK, tasks)
    prompts = [encode_prompt(row, chat.tokenizer, chat.template) for row in rows]
    for column, name in (("base_response", "base"), ("response", chat.active)):
        with answering_as(chat.model, name, chat.base) as model:
            answers = generate(model, chat.tokenizer, prompts, batch_size=HELDOUT_BATCH_SIZE,
                               **chat.sampling.kwargs())
        for row, answer in zip(rows, answers):
            row[column] = answer.text
            row[column.replace("response", "correct")] = check_answer(row["task"], answer.text, row["output"])
    for row in rows:
        mark = {True: "✓", False: "✗"}
        print(f"[{row['task']}] {row['instruction']} {row['input']}".rstrip())
        print(f"    参考 reference : {row['output']}")
        print(f"    {mark[row['base_correct']]} 微调前 base : {row['base_response']}")
        print(f"    {mark[row['correct']]} 微调后 LoRA : {row['response']}")
    print(f"\n{'task':<16}{'n':>4}{'base':>8}{'LoRA':>8}   (held-out phrasings, greedy)")
    for task in tasks:
        mine = [row for row in rows if row["task"] == task]
        print(f"{task:<16}{len(mine):>4}{sum(r['base_correct'] for r in mine):>8}{sum(r['correct'] for r in mine):>8}")
    write_answers(output_path, rows)
    print(f"已写入 {len(rows)} 条回答 -> {output_path} ({chat.sampling.describe()})")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_path", default="outputs", help="a run folder (output.dir of training)")
    parser.add_argument("--mode", choices=["interactive", "batch"], default="interactive")
    parser.add_argument("--input", type=Path,
                        help="batch: JSONL of {instruction, input} rows (default: built-in held-out questions, "
                             "base and fine-tuned side by side)")
    parser.add_argument("--output", type=Path, help="batch: the rows with `response` added "
                                                     "(built-in questions: <model_path>/demo_heldout.jsonl)")
    parser.add_argument("--compare", action="store_true",
                        help="answer with the base model too (interactive: printed first; batch: base_response)")
    parser.add_argument("--max_new_tokens", type=SETTINGS["max_new_tokens"], default=None,
                        help=f"default 256 ({HELDOUT_MAX_NEW_TOKENS} for the built-in held-out questions)")
    parser.add_argument("--temperature", type=SETTINGS["temperature"], default=None,
                        help="default 0.7; in batch mode giving it (or --top_p) turns sampling on")
    parser.add_argument("--top_p", type=SETTINGS["top_p"], default=None, help="default 0.9")
    parser.add_argument("--greedy", action="store_true", help="no sampling (batch mode's default)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling (batch default 0)")
    add_adapters_argument(parser, "more LoRA adapters to switch between (/adapter NAME)")
    parser.add_argument("--allow_pickle", action="store_true",
                        help="accept adapter_model.bin (pickle) from an author you trust; read with weights_only=True")


def run(args: argparse.Namespace) -> int:
    builtin = args.mode == "batch" and args.input is None
    if args.max_new_tokens is None:
        args.max_new_tokens = HELDOUT_MAX_NEW_TOKENS if builtin else 256
    if args.mode == "batch" and args.input and not args.output:
        raise ChatError("--mode batch --input FILE needs --output FILE")
    if args.mode == "batch" and args.input and not args.input.is_file():
        raise ChatError(f"--input {args.input}: no such file")  # before the model load, not after
    args.compare = args.compare or builtin  # the built-in set is there to show base vs fine-tuned
    try:
        chat = load_chat(args)
        if builtin:
            cfg = load_config(Path(args.model_path) / "config.yaml")
            return heldout_batch(chat, cfg, args.output or Path(args.model_path) / "demo_heldout.jsonl")
        if args.mode == "batch":
            return batch(chat, args.input, args.output, 0 if args.seed is None else args.seed)
        if args.seed is not None:
            import torch

            torch.manual_seed(args.seed)  # once: the whole session repeats, each answer still varies
        return interactive(chat)
    except KeyboardInterrupt:
        print("\n已中断 (interrupted)", file=sys.stderr)
        return 130
