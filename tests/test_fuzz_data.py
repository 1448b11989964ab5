"""Fuzzed data files (hypothesis): the loaders and `zhlora validate` never crash and never lose a valid row.

    python -m pytest tests/test_fuzz_data.py -s                              # CI: 1300 cases, fixed seeds
    ZHLORA_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz_data.py -s   # nightly: about 20000, new seeds

The last test prints how many cases ran (with -s it reaches the terminal). The CI profile is
derandomized (the same cases every run, so CI never flakes); the nightly profile draws new
cases each time and its max_examples are the CI ones scaled to ZHLORA_FUZZ_EXAMPLES in total.
A failure prints the smallest file hypothesis found; paste it into tests/test_data.py.

Two properties, over generated alpaca and sharegpt files (JSON arrays, JSONL, CSV, Parquet;
UTF-8, UTF-8 with a BOM, GBK, GB18030; LF or CRLF; wrong types, missing, null and extra
fields, empty and 150 000-character strings, control characters, lone surrogates, full-width
and half-width punctuation, 5000-digit numbers, deep nesting, truncated JSON, bad JSONL
lines, CSV quotes, newlines and wrong cell counts):
1. Whatever the bytes, load_file returns canonical rows plus `PATH:LINE: FIELD: problem`
   lines (or raises DataError), and validate_paths prints only those and its summary.
2. In files that mix known-valid rows with planted defects, every valid row comes back,
   exactly (control characters stripped, as data.py documents) and in order, except a later
   duplicate of an earlier one (the documented duplicate policy, across a folder's files
   too); every problem sits on a planted defect's line, and every dropped_* counter equals
   the number of defects planted for it.

Long for a test file (~800 lines) because the generators have to know every policy of
data.py to plant a defect it must refuse; they sit next to the properties they feed.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zhlora import data, readers

# ---- settings: CI (fixed) and nightly (ZHLORA_FUZZ_EXAMPLES) ------------------------------

NIGHTLY = int(os.environ.get("ZHLORA_FUZZ_EXAMPLES", "0") or 0)
CI_EXAMPLES = {"bytes": 200, "mutated": 250, "json_values": 200, "planted": 500, "folder": 100, "parquet": 50}
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
          HealthCheck.filter_too_much]
settings.register_profile("zhlora-fuzz-ci", deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET)
settings.register_profile("zhlora-fuzz-nightly", deadline=None, database=None, suppress_health_check=_QUIET)
PROFILE = settings.get_profile("zhlora-fuzz-nightly" if NIGHTLY else "zhlora-fuzz-ci")
CASES: Counter = Counter()  # test name -> cases run (printed by the last test)


def fuzz(name: str):
    """This test's share of the cases: its CI count, or scaled to ZHLORA_FUZZ_EXAMPLES."""
    share = CI_EXAMPLES[name]
    n = round(NIGHTLY * share / sum(CI_EXAMPLES.values())) if NIGHTLY else share
    return settings(PROFILE, max_examples=max(1, n))


# ---- what a loader may return ----------------------------------------------------------------

# PATH:LINE: FIELD: problem; FIELD is a name, maybe indexed: conversations[3].from, history[0][1]
PROBLEM = re.compile(r"^(?P<path>.+):(?P<line>\d+): (?P<field>[A-Za-z_]\w*(?:\[\d+\])*(?:\.\w+)?): (?P<message>\S.*)$")
SUMMARY = re.compile(r"^(rows loaded: \d+|  [a-z_]+: \d+|\d+ problem\(s\)|no problems|\.\.\. and \d+ more problems)$")
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\ud800-\udfff]")  # what data.py strips (cleaned_control)
CANONICAL_KEYS = {"instruction", "input", "output", "task", "system", "history"}


def check_result(result: data.LoadResult, path: str) -> None:
    """Rows are canonical and writable as UTF-8; problems are well-formed; counters add up."""
    for row in result.rows:
        assert CANONICAL_KEYS >= set(row) >= {"instruction", "input", "output", "task"}, row
        texts = [row["instruction"], row["input"], row["output"], row["task"], row.get("system", "")]
        texts += [t for pair in row.get("history", []) for t in pair]
        assert all(isinstance(t, str) and not CONTROL.search(t) for t in texts), row
        assert row["instruction"].strip() and row["output"].strip() and row["task"].strip()
        assert all(isinstance(p, list) and len(p) == 2 and p[0].strip() and p[1].strip()
                   for p in row.get("history", []))
        json.dumps(row, ensure_ascii=False).encode("utf-8")  # train.json can hold it
    for problem in result.problems:
        match = PROBLEM.match(str(problem))
        assert match and match["path"] == path and "\n" not in str(problem), str(problem)
    assert result.counts["loaded"] == len(result.rows)
    assert sum(n for k, n in result.counts.items() if k not in ("loaded", "cleaned_control")) == len(result.problems)


def check_validate(paths: list[str], encoding: str, columns=None) -> str:
    """validate_paths prints only problem lines and its summary, and says 0 iff no problems."""
    out = io.StringIO()
    code = data.validate_paths(paths, columns=columns, encoding=encoding, out=out)
    lines = out.getvalue().rstrip("\n").split("\n")
    for line in lines:
        assert PROBLEM.match(line) or SUMMARY.match(line), line
    assert code == (0 if lines[-1] == "no problems" else 1)
    return out.getvalue()


def check_no_crash(path: Path, encoding: str) -> None:
    try:
        result = data.load_file(path, encoding=encoding)
    except data.DataError as err:
        assert str(path) in str(err)
    else:
        check_result(result, str(path))
    check_validate([str(path)], encoding)


# ---- text ------------------------------------------------------------------------------------

CJK = "你好世界中文数据训练模型问题回答今天天气怎么样谢谢再见一二三四五六七八九十百千万亿零两繁體字"
PUNCT = "，。！？：；（）【】“”‘’、《》～％＃＠＆＊＋－＝／｜,.!?:;()[]\"'~%#@&*+-=/\\|<>{}"
SPACES = " \t\n\u3000\xa0\u2028\u200b\x0c"
CONTROLS = "\x00\x01\x07\x08\x0b\x0e\x1b\x1c\x1f\r\x7f"
EXOTIC = "😀é\u0301ﬁ①Ⅻ\ufeffÅ"  # emoji, combining accent, ligature, circled digit (NFKC changes them)
VISIBLE = CJK + "abcXYZ019"
SURROGATES = "\ud83d\ude00\udfff"
ENCODINGS = ["utf-8", "utf-8-sig", "gbk", "gb18030"]  # utf-8-sig: written with a BOM, read as utf-8


def encodable(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
        return True
    except UnicodeEncodeError:
        return False


@dataclass(frozen=True)
class Medium:
    """How a file is written: its format, encoding, and whether JSON escapes non-ASCII."""
    fmt: str  # json | jsonl | csv
    encoding: str
    escaped: bool  # json.dumps(ensure_ascii=True): any character survives, lone surrogates too
    crlf: bool

    # Strategies are cached per medium: hypothesis checks each new strategy object, and
    # building them afresh for every draw took most of the run time.
    @functools.lru_cache(maxsize=None)
    def chars(self):
        base = [c for c in VISIBLE + PUNCT + SPACES + CONTROLS + EXOTIC if self.escaped or encodable(c, self.encoding)]
        choices = [st.sampled_from(base)]
        if self.escaped or self.encoding != "gbk":
            choices.append(st.characters(exclude_categories=["Cs"]))
        if self.escaped:
            choices.append(st.sampled_from(SURROGATES))
        return st.one_of(*choices)

    @functools.lru_cache(maxsize=None)
    def text(self, max_size=12):
        return st.text(self.chars(), max_size=max_size)

    @functools.lru_cache(maxsize=None)
    def blank(self):
        """Text that is empty once control characters are stripped and whitespace trimmed."""
        chars = [c for c in " \t\n\u3000\x00\x1b\r" if self.escaped or encodable(c, self.encoding)]
        return st.text(st.sampled_from(chars), max_size=4)

    @functools.lru_cache(maxsize=None)
    def json_values(self):
        return st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | self.text(5),
                            lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(self.text(3), inner, max_size=3), max_leaves=8)


@st.composite
def visible_text(draw, medium: Medium, huge: bool = False):
    """Text with at least one visible character (it survives stripping and trimming)."""
    text = draw(medium.text()) + draw(st.sampled_from(VISIBLE))
    if huge and draw(st.integers(0, 199)) == 123:  # hypothesis favours 0 and 199, so a middle value is rare
        text += "长" * 140_000  # above csv's default 128 KiB cell limit
    return text


# ---- rows ------------------------------------------------------------------------------------

@dataclass
class Sample:
    """A valid row, before it is written in one layout (raw strings, not yet cleaned)."""
    instruction: str
    output: str
    input: str = ""
    system: str = ""  # "" or visible text (a blank system turn is refused in sharegpt)
    history: list = field(default_factory=list)
    task: str | None = None

    def expected(self) -> dict:
        """The row data.py must return: control characters stripped, nothing else changed."""
        clean = lambda text: CONTROL.sub("", text)  # noqa: E731
        row = {"instruction": clean(self.instruction), "input": clean(self.input),
               "output": clean(self.output), "task": clean(self.task or "").strip() or "user"}
        if clean(self.system):
            row["system"] = clean(self.system)
        if self.history:
            row["history"] = [[clean(u), clean(a)] for u, a in self.history]
        return row

    def key(self) -> tuple:
        """The duplicate key as data.py documents it: NFKC, whitespace collapsed."""
        row = self.expected()
        texts = [row.get("system", ""), *(t for pair in row.get("history", []) for t in pair),
                 row["instruction"], row["input"], row["output"]]
        return tuple(" ".join(unicodedata.normalize("NFKC", t).split()) for t in texts)


FULL_WIDTH = {c: chr(ord(c) + 0xFEE0) for c in "!?,.:;()"}


@st.composite
def variant(draw, text: str, medium: Medium) -> str:
    """The same text after NFKC and whitespace collapsing: padded, full/half-width swapped,
    spaces doubled, control characters inserted."""
    if draw(st.booleans()):
        text = "".join(FULL_WIDTH.get(c, c) for c in text)
    if draw(st.booleans()):
        text = "".join(c + " " if c.isspace() else c for c in text)
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["\x00", "\x1b", "\x07"])) + text[at:]
    pads = [p for p in [" ", "\u3000", "\t", "\n"] if medium.escaped or encodable(p, medium.encoding)]
    return draw(st.sampled_from(pads)) + text + draw(st.sampled_from(pads))


@st.composite
def samples(draw, medium: Medium, number: int) -> Sample:
    history = [] if medium.fmt == "csv" else draw(st.lists(
        st.tuples(visible_text(medium), visible_text(medium)), max_size=2))
    system = draw(st.one_of(st.just(""), visible_text(medium)))
    return Sample(instruction=draw(medium.text()) + f"[{number}]", output=draw(visible_text(medium, huge=True)),
                  input=draw(medium.text()), system=system, history=history,
                  task=draw(st.one_of(st.none(), medium.text(6))))


@st.composite
def duplicate_of(draw, original: Sample, medium: Medium) -> Sample:
    history = [(draw(variant(u, medium)), draw(variant(a, medium))) for u, a in original.history]
    return Sample(instruction=draw(variant(original.instruction, medium)),
                  output=draw(variant(original.output, medium)),
                  input=draw(variant(original.input, medium)) if original.input.strip() else original.input,
                  system=draw(variant(original.system, medium)) if original.system else "",
                  history=history, task=draw(st.one_of(st.none(), medium.text(6))))


EXTRA_NAMES = ["id", "source", "评分", "lang", "__index__", "meta"]
BIG_NUMBER = "__BIG_NUMBER__"  # written as 5000 digits (more than int() reads by default)



def nested(depth: int):
    value: object = "底"
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def extras(draw, medium: Medium) -> dict:
    """Fields zhlora ignores; a valid row stays valid with them."""
    names = draw(st.lists(st.sampled_from(EXTRA_NAMES), max_size=2, unique=True))
    if medium.fmt == "csv":
        return {name: draw(medium.text()) for name in names}
    values = st.one_of(medium.json_values(), st.just(BIG_NUMBER), st.builds(nested, st.integers(10, 60)))
    found = {name: draw(values) for name in names}
    if draw(st.integers(0, 5)) == 0:
        found["tools"] = draw(st.sampled_from([[], "", "[]", " [] "]))  # no tools: still a plain row
    return found


@st.composite
def alpaca_raw(draw, s: Sample, medium: Medium) -> dict:
    raw = {"instruction": s.instruction, "output": s.output}
    if s.input or draw(st.booleans()):
        raw["input"] = s.input
    elif draw(st.booleans()):
        raw["input"] = None  # null counts as absent
    if s.system or draw(st.booleans()):
        raw["system"] = s.system or draw(st.sampled_from(["", None]))
    if s.history or draw(st.booleans()):
        raw["history"] = [list(pair) for pair in s.history]
    if s.task is not None:
        raw["task"] = s.task
    raw.update(draw(extras(medium)))
    keys = draw(st.permutations(list(raw)))
    return {k: raw[k] for k in keys}


ROLE_NAMES = {"user": ["human", "user"], "assistant": ["gpt", "assistant"], "system": ["system"]}


@st.composite
def sharegpt_raw(draw, s: Sample) -> dict:
    messages = draw(st.booleans())
    key, role_key, text_key = ("messages", "role", "content") if messages else ("conversations", "from", "value")
    turns = [("system", s.system)] if s.system else []
    for user, assistant in [*s.history, (s.instruction, s.output)]:
        turns += [("user", user), ("assistant", assistant)]
    written = []
    for role, text in turns:
        turn = {role_key: draw(st.sampled_from(ROLE_NAMES[role])), text_key: text}
        if draw(st.integers(0, 4)) == 0:  # Parquet-style: both key styles, the other one null
            turn.update({("from" if messages else "role"): None, ("value" if messages else "content"): None})
        if draw(st.integers(0, 4)) == 0:
            turn["loss"] = draw(st.booleans())
        written.append(turn)
    raw = {key: written}
    if s.task is not None:
        raw["task"] = s.task
    return raw


@st.composite
def valid_raw(draw, s: Sample, medium: Medium):
    """A Sample in one of the layouts data.py reads (sharegpt has no `input`)."""
    if medium.fmt == "csv":
        return {"instruction": s.instruction, "input": s.input, "output": s.output, "system": s.system,
                "task": s.task or "", **draw(extras(medium))}
    if not s.input and draw(st.booleans()):
        return draw(sharegpt_raw(s))
    return draw(alpaca_raw(s, medium))


NOT_STRINGS = st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(),
                        st.lists(st.integers(), max_size=2), st.dictionaries(st.sampled_from("ab"), st.integers(),
                                                                             max_size=1))


ALPACA_DEFECTS = ["not_object", "missing", "type", "history", "empty", "tools", "task"]
SHAREGPT_DEFECTS = ["turns_type", "turn", "role", "tool_role", "text", "blank_turn", "order"]


@st.composite
def defect(draw, medium: Medium, number: int) -> tuple[object, str]:
    """A row data.py must refuse, and the counter it must count it under (one fault per row)."""
    s = draw(samples(medium, number))
    if medium.fmt == "csv":  # every cell is a string: only blank required cells are possible
        raw = draw(valid_raw(s, medium))
        raw[draw(st.sampled_from(["instruction", "output"]))] = draw(medium.blank())
        return raw, "dropped_empty"
    kind = draw(st.sampled_from(ALPACA_DEFECTS + SHAREGPT_DEFECTS))
    if kind in ALPACA_DEFECTS:
        return draw(alpaca_defect(kind, s, medium))
    s.input = ""
    return draw(sharegpt_defect(kind, s, medium))


@st.composite
def alpaca_defect(draw, kind: str, s: Sample, medium: Medium) -> tuple[object, str]:
    if kind == "not_object":
        return draw(st.one_of(st.integers(), medium.text(5), st.booleans(), st.none(),
                              st.lists(st.integers(), max_size=2))), "dropped_not_object"
    raw = draw(alpaca_raw(s, medium))
    raw.pop("tools", None)
    if kind == "missing":
        name = draw(st.sampled_from(["instruction", "output"]))
        if draw(st.booleans()):
            raw.pop(name)
        else:
            raw[name] = None  # null counts as absent
        return raw, "dropped_missing"
    if kind == "type":
        raw[draw(st.sampled_from(["instruction", "input", "output", "system"]))] = draw(NOT_STRINGS)
        return raw, "dropped_type"
    if kind == "history":
        raw["history"] = draw(st.sampled_from([5, "a", {"a": 1}, ["a", "b"], [["a"]], [["a", 1]],
                                               [["a", "b", "c"]], [[None, "b"]]]))
        return raw, "dropped_type"
    if kind == "empty":
        if draw(st.booleans()):
            raw[draw(st.sampled_from(["instruction", "output"]))] = draw(medium.blank())
        else:
            raw["history"] = [[draw(medium.blank()), "答"]]
        return raw, "dropped_empty"
    if kind == "tools":
        raw["tools"] = draw(st.sampled_from([[{"name": "search"}], '[{"name": "search"}]', "search"]))
        return raw, "dropped_unsupported"
    raw["task"] = draw(NOT_STRINGS)
    return raw, "dropped_type"


@st.composite
def sharegpt_defect(draw, kind: str, s: Sample, medium: Medium) -> tuple[object, str]:
    raw = draw(sharegpt_raw(s))
    key = next(iter(raw))
    turns = raw[key]
    role_key, text_key = ("role", "content") if key == "messages" else ("from", "value")
    i = draw(st.integers(0, len(turns) - 1))
    if kind == "turns_type":
        raw[key] = draw(st.sampled_from([[], "你好", {"from": "human"}, 5]))
        return raw, "dropped_type"
    if kind == "turn":
        turns[i] = draw(st.sampled_from(["你好", 5, ["human", "你好"], None]))
        return raw, "dropped_type"
    if kind == "role":  # a list or dict role once crashed readers.from_sharegpt (unhashable)
        turns[i] = {role_key: draw(st.sampled_from(["bot", "", "Human ", 5, ["user"], {"r": 1}])), text_key: "x"}
        return raw, "dropped_bad_turns"
    if kind == "tool_role":
        turns[i][role_key] = draw(st.sampled_from(sorted(readers.TOOL_ROLES)))
        return raw, "dropped_unsupported"
    if kind == "text":
        turns[i][text_key] = draw(st.sampled_from([5, ["a"], {"a": 1}, None, True]))
        return raw, "dropped_type"
    if kind == "blank_turn":
        turns[i][text_key] = draw(medium.blank())
        return raw, "dropped_empty"
    dialogue = 1 if turns[0][role_key] == "system" else 0  # kind == "order"
    how = draw(st.sampled_from(["assistant_first", "no_reply", "system_later", "two_users"]))
    if how == "assistant_first":
        turns[dialogue], turns[dialogue + 1] = turns[dialogue + 1], turns[dialogue]
    elif how == "no_reply":
        turns.pop()
    elif how == "system_later":
        turns.insert(draw(st.integers(dialogue + 1, len(turns))), {role_key: "system", text_key: "系统"})
    else:
        turns.insert(dialogue + 1, {role_key: "user", text_key: "又问"})
    return raw, "dropped_bad_turns"


# ---- files -----------------------------------------------------------------------------------

@dataclass
class Entry:
    line: int
    kind: str  # valid | defect | syntax
    counter: str | None = None
    sample: Sample | None = None
    raw: object = None


@dataclass
class FileCase:
    medium: Medium
    text: str
    entries: list[Entry]
    tail_line: int | None  # a problem at or after this line is the planted tail's
    columns: dict | None = None

    @property
    def bytes(self) -> bytes:
        return self.text.encode(self.medium.encoding)

    @property
    def empty(self) -> bool:
        return not self.entries and self.tail_line is None


def dumps(value, medium: Medium) -> str:
    text = json.dumps(value, ensure_ascii=medium.escaped)
    return text.replace(json.dumps(BIG_NUMBER), "9" * 5000)


def _newlines(text: str, fmt: str) -> int:
    # The csv module counts \r, \n and \r\n as line ends; the JSON readers count \n.
    return len(re.findall(r"\r\n|\r|\n", text)) if fmt == "csv" else text.count("\n")


def json_garbage(medium: Medium):
    """One line that is not JSON (for JSONL)."""
    fixed = ["{", "}", "[1, 2", "{'instruction': '单引号'}", "instruction,output", "\x00", "NaN NaN",
             '{"a": 1} {"b": 2}', '{"instruction": "x", "output": "y",}', "{}\ufeff", "[" * 3000,
             '{"a": ' + "[" * 3000, '"unterminated', "tru", '{"instruction": "x" "output": "y"}']
    fixed = [g for g in fixed if encodable(g, medium.encoding)]

    def not_json(text):  # as readers.py decodes a line: raw tabs and controls inside strings are fine
        try:
            json.JSONDecoder(strict=False).decode(text)
        except (ValueError, RecursionError):
            return True
        return False

    raw_text = Medium(medium.fmt, medium.encoding, False, medium.crlf).text()  # written as is, not escaped
    # Not starting with a BOM: on a file's first line decode() drops it, and "\ufeff5" would read.
    random = raw_text.filter(lambda t: "\n" not in t and t.strip() and not t.startswith("\ufeff") and not_json(t))
    return st.one_of(st.sampled_from(fixed), random)


@st.composite
def file_case(draw, medium: Medium, pool: list[Sample], numbers, columns: dict | None = None) -> FileCase:
    """A file mixing valid rows, duplicates of earlier ones (from `pool`), defects, bad lines,
    and for JSON arrays and CSV maybe a planted tail (a truncation...) that ends the reading."""
    kinds = draw(st.lists(st.sampled_from(["valid", "valid", "valid", "duplicate", "defect", "syntax"]),
                          max_size=10))
    items: list[tuple[object, Entry]] = []  # (what to write: a raw row, or a bad line's text), its entry
    for kind in kinds:
        if kind == "duplicate":
            usable = [s for s in pool if medium.fmt != "csv" or not s.history]
            if usable:
                sample = draw(duplicate_of(draw(st.sampled_from(usable)), medium))
                items.append(_valid_item(draw(valid_raw(sample, medium)), sample, pool))
        elif kind == "valid":
            sample = draw(samples(medium, next(numbers)))
            items.append(_valid_item(draw(valid_raw(sample, medium)), sample, pool))
        elif kind == "defect":
            raw, counter = draw(defect(medium, next(numbers)))
            items.append((raw, Entry(0, "defect", counter, raw=raw)))
        elif medium.fmt == "jsonl":
            items.append((draw(json_garbage(medium)), Entry(0, "syntax", "syntax_errors")))
        elif medium.fmt == "csv":  # a record with the wrong number of cells
            items.append((None, Entry(0, "syntax", "syntax_errors")))
    if columns:  # the file names instruction and output in its own words
        theirs = {ours: name for name, ours in columns.items()}
        for raw, _ in items:
            if isinstance(raw, dict) and ("instruction" in raw or "output" in raw):
                renamed = {theirs.get(k, k): v for k, v in raw.items()}
                raw.clear()
                raw.update(renamed)
    build = {"json": _json_file, "jsonl": _jsonl_file, "csv": _csv_file}[medium.fmt]
    return build(draw, medium, items, columns)


def _valid_item(raw, sample: Sample, pool: list[Sample]) -> tuple[object, Entry]:
    pool.append(sample)
    return raw, Entry(0, "valid", sample=sample, raw=raw)


def _jsonl_file(draw, medium: Medium, items, columns) -> FileCase:
    nl = "\r\n" if medium.crlf else "\n"
    text = ""
    for raw, entry in items:
        text += draw(st.sampled_from(["", nl, "  " + nl, "\u3000" + nl]))  # blank lines are skipped
        entry.line = _newlines(text, "jsonl") + 1
        text += (raw if entry.kind == "syntax" else dumps(raw, medium)) + nl
    return FileCase(medium, text, [entry for _, entry in items], None, columns)


JSON_TAILS = ["none", "none", "extra", "truncated", "garbage", "missing_comma", "trailing_comma", "deep", "eof"]


def _json_file(draw, medium: Medium, items, columns) -> FileCase:
    nl = "\r\n" if medium.crlf else "\n"
    text = "["
    for n, (raw, entry) in enumerate(items):
        text += ("," if n else "") + draw(st.sampled_from(["", " ", nl, nl + "  "]))
        entry.line = _newlines(text, "json") + 1
        if draw(st.booleans()):
            text += dumps(raw, medium)
        else:  # pretty-printed: the row spans lines, its LINE is where it starts
            pretty = json.dumps(raw, ensure_ascii=medium.escaped, indent=draw(st.sampled_from([1, 2])))
            text += pretty.replace(json.dumps(BIG_NUMBER), "9" * 5000).replace("\n", nl)
    tail = draw(st.sampled_from(JSON_TAILS))
    if tail == "missing_comma" and not items:
        tail = "eof"
    tail_line = None if tail == "none" else _newlines(text, "json") + 1
    sep = "," if items else ""
    if tail == "none":
        text += draw(st.sampled_from(["]", "]" + nl, nl + "]" + nl]))
    elif tail == "extra":
        text += "]" + draw(st.sampled_from(["x", nl + "[]", " ]", nl + '{"instruction": "不算"}']))
    elif tail == "truncated":
        whole = dumps({"instruction": draw(medium.text()), "output": "半截"}, medium)
        text += sep + whole[:draw(st.integers(1, len(whole) - 1))]
    elif tail == "garbage":
        text += sep + draw(st.sampled_from(["}", "x", "'单引号'", ":", "{,}"]))
    elif tail == "missing_comma":
        text += " " + dumps({"instruction": "缺逗号", "output": "x"}, medium) + "]"
    elif tail == "trailing_comma":
        text += ",]"
    elif tail == "deep":
        text += sep + "[" * 3000
    return FileCase(medium, text, [entry for _, entry in items], tail_line, columns)


def _csv_file(draw, medium: Medium, items, columns) -> FileCase:
    nl = "\r\n" if medium.crlf else "\n"
    names = ["instruction", "input", "output", "system", "task"]
    rename = {ours: theirs for theirs, ours in (columns or {}).items()}
    extra = sorted({k for raw, _ in items if raw for k in raw} - {rename.get(n, n) for n in names})
    header = [rename.get(n, n) for n in names] + extra
    header = draw(st.permutations(header))
    buffer = io.StringIO()
    # Minimal quoting quotes a cell holding a character of the line terminator only: with "\n"
    # line ends a bare "\r" would go out unquoted (and break the record), so such files quote all.
    writer = csv.writer(buffer, lineterminator=nl, quoting=csv.QUOTE_MINIMAL if medium.crlf else csv.QUOTE_ALL)
    writer.writerow(header)
    for raw, entry in items:
        if draw(st.integers(0, 5)) == 0:
            buffer.write(nl)  # a blank line between records is skipped
        entry.line = _newlines(buffer.getvalue(), "csv") + 1
        if raw is None:
            count = draw(st.integers(1, len(header) + 2).filter(lambda n: n != len(header)))
            writer.writerow([draw(medium.text(4)) for _ in range(count)])
        else:
            writer.writerow([raw.get(name, "") for name in header])
    text = buffer.getvalue()
    tail_line = None
    if draw(st.integers(0, 4)) == 0:  # an unclosed quote: the rest of the file is not read
        tail_line = _newlines(text, "csv") + 1
        text += '"' + draw(medium.text(6)).replace('"', "")
    return FileCase(medium, text, [entry for _, entry in items], tail_line, columns)


mediums = st.builds(Medium, fmt=st.sampled_from(["json", "jsonl", "csv"]), encoding=st.sampled_from(ENCODINGS),
                    escaped=st.booleans(), crlf=st.booleans()).map(
    lambda m: Medium(m.fmt, m.encoding, m.escaped and m.fmt != "csv", m.crlf))


def write(path: Path, case: FileCase) -> str:
    """Write the file; returns the encoding to read it with (a BOM file is read as utf-8)."""
    path.write_bytes(case.bytes)
    return "utf-8" if case.medium.encoding == "utf-8-sig" else case.medium.encoding


def has_controls(raw: dict, columns: dict | None) -> bool:
    """Whether data.py strips something from this valid row (cleaned_control): any string in
    its known fields, down to the depth of a turn's text."""
    known = {(columns or {}).get(k, k): v for k, v in raw.items()}
    return any(_deep_controls(v) for k, v in known.items() if k in data.KNOWN_FIELDS)


def _deep_controls(value, depth=1) -> bool:
    if isinstance(value, str):
        return bool(CONTROL.search(value))
    if isinstance(value, (list, dict)) and depth < 3:
        items = value.values() if isinstance(value, dict) else value
        return any(_deep_controls(v, depth + 1) for v in items)
    return False


def check_planted(files: list[tuple[Path, FileCase]], result: data.LoadResult) -> None:
    """Property 2: exactly the valid rows come back, and every problem is a planted one."""
    seen: set = set()
    rows, counts, allowed = [], Counter(), {}
    for path, case in files:
        lines = allowed.setdefault(str(path), set())
        if case.empty:
            counts["empty_files"] += 1
            lines.add(0)
        if case.tail_line is not None:
            counts["syntax_errors"] += 1
        for entry in case.entries:
            if entry.kind != "valid":
                counts[entry.counter] += 1
                lines.add(entry.line)
            elif entry.sample.key() in seen:
                counts["dropped_duplicate"] += 1
                lines.add(entry.line)
            else:
                seen.add(entry.sample.key())
                rows.append(entry.sample.expected())
                counts["cleaned_control"] += has_controls(entry.raw, case.columns)
    assert result.rows == rows
    dropped = {k: n for k, n in result.counts.items() if k != "loaded" and n}
    assert dropped == {k: n for k, n in counts.items() if n}
    tails = {str(path): case.tail_line for path, case in files}
    for problem in result.problems:
        tail = tails[problem.path]
        assert problem.line in allowed[problem.path] or (tail is not None and problem.line >= tail), str(problem)


# ---- the tests -------------------------------------------------------------------------------

@fuzz("planted")
@given(st.data())
def test_every_valid_row_survives_planted_defects(tmp_path_factory, data_):
    medium = data_.draw(mediums)
    columns = {"问题": "instruction", "回答": "output"} if data_.draw(st.integers(0, 5)) == 0 else None
    case = data_.draw(file_case(medium, [], iter(range(10**6)), columns))
    path = tmp_path_factory.mktemp("planted") / f"rows.{medium.fmt}"
    encoding = write(path, case)
    result = data.load_file(path, columns=columns, encoding=encoding)
    check_result(result, str(path))
    check_planted([(path, case)], result)
    printed = check_validate([str(path)], encoding, columns)
    assert f"rows loaded: {len(result.rows)}" in printed
    CASES["planted"] += 1


@fuzz("folder")
@given(st.data())
def test_a_folder_keeps_every_valid_row_and_finds_duplicates_across_files(tmp_path_factory, data_):
    """Files load sorted (subfolders too), hidden ones and other suffixes are skipped, and a
    row repeated in a later file is that file's duplicate."""
    folder = tmp_path_factory.mktemp("folder") / "我的 数据"
    names = data_.draw(st.lists(st.sampled_from(["a.json", "b 乙.jsonl", "数据.csv", "sub/c.jsonl", "Z.json"]),
                                min_size=1, max_size=3, unique=True))
    paths = sorted(folder / name for name in names)
    pool, numbers, files = [], iter(range(10**6)), []
    for path in paths:
        fmt = path.suffix[1:]
        medium = data_.draw(mediums.map(lambda m, f=fmt: Medium(f, "utf-8", m.escaped and f != "csv", m.crlf)))
        case = data_.draw(file_case(medium, pool, numbers))
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path, case)
        files.append((path, case))
    hidden = dumps({"instruction": "隐藏", "output": "不读"}, Medium("jsonl", "utf-8", False, False))
    (folder / ".hidden.jsonl").write_text(hidden + "\n", encoding="utf-8")
    (folder / ".git").mkdir(exist_ok=True)
    (folder / ".git" / "x.json").write_text("[" + hidden + "]", encoding="utf-8")
    (folder / "notes.txt").write_text("not data", encoding="utf-8")
    result = data.load_source(str(folder))
    assert not any("隐藏" in row["instruction"] for row in result.rows)
    check_planted(files, result)
    for problem in result.problems:
        assert PROBLEM.match(str(problem)), str(problem)
    check_validate([str(folder)], "utf-8")
    CASES["folder"] += 1


@fuzz("bytes")
@given(st.sampled_from([".json", ".jsonl", ".csv", ".parquet"]),
       st.sampled_from(["utf-8", "gbk", "gb18030", "utf-16", "latin-1", "no-such-codec"]),
       st.sampled_from([b"", b"\xef\xbb\xbf", b"[", b'{"instruction": ', b"instruction,output\n", b"PAR1",
                        b"[" * 3000, b"[" + b"9" * 5000, b'{"a": ' + b"[" * 3000]),
       st.binary(max_size=400))
def test_random_bytes_never_crash(tmp_path_factory, suffix, encoding, prefix, body):
    path = tmp_path_factory.mktemp("bytes") / f"x{suffix}"
    path.write_bytes(prefix + body)
    check_no_crash(path, encoding)
    CASES["bytes"] += 1


@fuzz("mutated")
@given(st.data())
def test_damaged_files_never_crash(tmp_path_factory, data_):
    """A planted file cut short, with bytes inserted, flipped or repeated, or read with the
    wrong encoding (GBK read as UTF-8 and the reverse)."""
    medium = data_.draw(mediums)
    raw = bytearray(data_.draw(file_case(medium, [], iter(range(10**6)))).bytes)
    for _ in range(data_.draw(st.integers(1, 3))):
        how = data_.draw(st.sampled_from(["cut", "insert", "flip", "repeat"]))
        at = data_.draw(st.integers(0, len(raw)))
        if how == "cut":
            del raw[at:]
        elif how == "insert":
            raw[at:at] = data_.draw(st.sampled_from([b"\xff", b"\x80\x80", b"\xc3", b"\x00", b'"', b"\n", b"\r",
                                                     b",", b"\xa3\xac", b"]", b"{", b"\xe4\xbd"]))
        elif how == "flip" and at < len(raw):
            raw[at] ^= data_.draw(st.integers(1, 255))
        elif how == "repeat":
            raw[at:at] = raw[max(0, at - 20):at]
    path = tmp_path_factory.mktemp("mutated") / f"x.{medium.fmt}"
    path.write_bytes(bytes(raw))
    encoding = data_.draw(st.sampled_from(["utf-8", "gbk", "gb18030", medium.encoding.replace("-sig", "")]))
    check_no_crash(path, encoding)
    CASES["mutated"] += 1


KEYS = st.sampled_from([*data.KNOWN_FIELDS, "from", "value", "role", "content", "问题", "x"])
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
           | st.sampled_from(["human", "gpt", "user", "assistant", "system", "tool", "", "\x00", "\u3000"]))
shaped_json = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(KEYS, inner, max_size=5), max_leaves=20)
any_turn = st.dictionaries(st.sampled_from(["from", "value", "role", "content", "loss"]), shaped_json, max_size=3)
sharegpt_shaped = st.dictionaries(st.sampled_from(["conversations", "messages", "tools", "task", "system"]),
                                  st.one_of(st.lists(st.one_of(any_turn, shaped_json), max_size=4), shaped_json),
                                  min_size=1, max_size=3)


@fuzz("json_values")
@given(st.sampled_from(["json", "jsonl"]), st.lists(st.one_of(shaped_json, sharegpt_shaped), max_size=5),
       st.sampled_from([None, {"问题": "instruction"}, {"value": "output", "x": "conversations"}]))
def test_rows_of_any_json_shape_never_crash(tmp_path_factory, fmt, rows, columns):
    """Random JSON values under the field names data.py looks at (roles that are lists,
    turns that are numbers, NaN, nested histories...)."""
    path = tmp_path_factory.mktemp("shapes") / f"x.{fmt}"
    text = json.dumps(rows) if fmt == "json" else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    result = data.load_file(path, columns=columns)
    check_result(result, str(path))
    check_validate([str(path)], "utf-8", columns)
    CASES["json_values"] += 1


@fuzz("parquet")
@given(st.data())
def test_parquet_rows_with_nulls_and_wrong_types(tmp_path_factory, data_):
    """Parquet columns are typed: a row that lacks a field holds null there (= absent)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    medium = Medium("parquet", "utf-8", False, False)
    n = data_.draw(st.integers(0, 8))
    expected, columns = [], {}
    for name in ["instruction", "input", "output", "system", "task"]:
        if data_.draw(st.integers(0, 6)) == 0:
            columns[name] = pa.array(data_.draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=n, max_size=n)),
                                     pa.int64())
        else:
            values = data_.draw(st.lists(st.one_of(st.none(), medium.text(), visible_text(medium)),
                                         min_size=n, max_size=n))
            columns[name] = pa.array(values, pa.string())
    table = pa.table(columns)
    path = tmp_path_factory.mktemp("parquet") / "x.parquet"
    pq.write_table(table, path)
    for row in table.to_pylist():
        present = {k: v for k, v in row.items() if v is not None}
        if all(isinstance(v, str) for v in present.values()) and all(
                CONTROL.sub("", present.get(k, "")).strip() for k in ("instruction", "output")):
            sample = Sample(present["instruction"], present["output"], present.get("input", ""),
                            present.get("system", ""), [], present.get("task"))
            if sample.key() not in {Sample(**r).key() for r in expected}:
                expected.append(vars(sample))
    result = data.load_file(path)
    check_result(result, str(path))
    assert result.rows == [Sample(**r).expected() for r in expected]
    check_validate([str(path)], "utf-8")
    CASES["parquet"] += 1


def test_odd_paths_are_problems_not_tracebacks(tmp_path):
    """Too long a name, a NUL byte, a folder we may not enter, a folder named like a file."""
    (tmp_path / "folder.json").mkdir()
    for spec in ["a" * 300 + ".json", "x\x00y.json", str(tmp_path / "folder.json"), str(tmp_path / "missing.csv"),
                 str(tmp_path / "空 文件夹")]:
        printed = check_validate([spec], "utf-8")
        assert "unreadable_sources: 1" in printed, printed
    CASES["paths"] += 1


def test_case_count(capsys):
    """Runs last: how many generated cases ran to the end, all checks passed (paste it in a
    note); -s shows it."""
    total = sum(CASES.values())
    with capsys.disabled():
        print(f"\n[fuzz] {total} generated cases ({dict(CASES)}); profile "
              f"{'nightly, ZHLORA_FUZZ_EXAMPLES=' + str(NIGHTLY) if NIGHTLY else 'CI (derandomized)'}")
    if len(CASES) >= len(CI_EXAMPLES) and not NIGHTLY:
        assert total >= 1000
