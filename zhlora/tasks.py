"""Built-in Chinese instruction tasks whose answers come from an oracle.

Every family pairs several Chinese phrasings of one instruction with a
reference answer produced by an independent library (cn2an, OpenCC, pypinyin)
or by exact computation (integers, datetime, Fraction). The answers are short
and canonical, so a fine-tuned model can be scored by exact match.

Canonical answer (`output`) per family:

    num2cn      cn2an.an2cn of the number            "一千二百三十四"
    cn2num      Arabic digits                        "1234"
    digits      cn2an.an2cn(..., "direct"), digit by digit (years, phone numbers)
                                                     "二零二四"
    rmb_upper   cn2an.an2cn(amount, "rmb")           "壹仟贰佰叁拾肆元伍角"
    s2t, t2s    OpenCC conversion of the sentence    "我們今天去公園散步。"
    pinyin      pypinyin tone marks, one space between syllables, punctuation
                dropped                              "wǒ men jīn tiān"
    arithmetic  the integer, no unit                 "42"
    date        a date "2024年3月5日", a weekday "星期二" (Sunday is "星期日")
                or a number of days "45天"
    unit        exact decimal plus the target unit   "3500米", "0.75小时"
    sort        Python list of ints                  "[1, 3, 9]"
    extreme     the integer                          "9"
    self_cognition  who the assistant is (resources/self_cognition_zh.json): the
                answer must name ASSISTANT_NAME and ASSISTANT_AUTHOR
                                                     "我是小知，由 zhlora 微调的中文助手。"
    open_qa     free text from resources/open_ended_zh.json (not checkable)

Phrasings come from resources/phrasings_zh.json. resources/heldout_phrasings_zh.json holds
other phrasings of some families that no generated training row uses: heldout_rows() draws
from them, so a demo can ask the way a user would and not the way training did.

Print a few rows:  python -m zhlora.tasks 8 --seed 1 --tasks date unit [--heldout]

This file is longer than 400 lines: fourteen families, each a short generator beside the
oracle that answers it, read as one table; split across files, a family's question and the
check of its answer (check_answer, at the end) would no longer sit in one place.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import unicodedata
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache
from importlib import resources
from typing import Callable, Iterator

import cn2an
from opencc import OpenCC
from pypinyin import Style, lazy_pinyin

Row = tuple[str, str, str]  # (instruction, input, output)


def normalize_text(s: str) -> str:
    """NFKC-normalise, strip, and collapse every whitespace run to one space."""
    return " ".join(unicodedata.normalize("NFKC", s).split())


@lru_cache(maxsize=None)
def _resource(name: str):
    return json.loads((resources.files("zhlora") / "resources" / name).read_text("utf-8"))


def load_open_qa() -> list[dict]:
    """The hand-written open-ended rows of resources/open_ended_zh.json."""
    return [dict(row) for row in _resource("open_ended_zh.json")]


PHRASINGS, HELDOUT_PHRASINGS = "phrasings_zh.json", "heldout_phrasings_zh.json"


def _asker(phrasings: str) -> Callable[[random.Random, str], str]:
    """ask(rng, key): one of the Chinese phrasings listed under `key` in resources/<phrasings>."""
    table = _resource(phrasings)

    def ask(rng: random.Random, key: str) -> str:
        if key not in table:
            raise ValueError(f"resources/{phrasings} has no phrasings for {key!r}")
        return rng.choice(table[key])
    return ask


@lru_cache(maxsize=None)
def _opencc(config: str) -> OpenCC:
    return OpenCC(config)


# --- numbers -----------------------------------------------------------------

def _random_int(rng: random.Random) -> int:
    """1 to 8 digits; inner digits are 0 30% of the time so the 零 rules get practice.

    Below 10^8 on purpose: past it cn2an drops the 零 of an empty 万 level
    (900001732 -> 九亿一千七百三十二), which its own cn2an then rejects.
    """
    digits = [rng.randint(1, 9)]
    for _ in range(rng.randint(0, 7)):
        digits.append(0 if rng.random() < 0.3 else rng.randint(0, 9))
    return int("".join(map(str, digits)))


def _num2cn_rows(rng: random.Random, ask) -> Iterator[Row]:
    while True:
        n = _random_int(rng)
        yield ask(rng, "num2cn"), str(n), cn2an.an2cn(n)


def _cn2num_rows(rng: random.Random, ask) -> Iterator[Row]:
    while True:
        text = cn2an.an2cn(_random_int(rng))
        yield ask(rng, "cn2num"), text, str(cn2an.cn2an(text, "strict"))


def _digit_string(rng: random.Random) -> str:
    """A year (1900-2099), a 4-8 digit code, or an 11-digit phone-like number; 0 can lead a code."""
    kind = rng.randrange(3)
    if kind == 0:
        return str(rng.randint(1900, 2099))
    length = rng.randint(4, 8) if kind == 1 else 11
    return "".join(str(rng.randint(0, 9)) for _ in range(length))


def _digits_rows(rng: random.Random, ask) -> Iterator[Row]:
    while True:
        text = _digit_string(rng)
        yield ask(rng, "digits"), text, cn2an.an2cn(text, "direct")


def _rmb_rows(rng: random.Random, ask) -> Iterator[Row]:
    while True:
        yuan = _random_int(rng) // 10  # up to 7 digits of yuan, 0 allowed (伍角)
        cents = rng.choice(("", "", f".{rng.randint(1, 9)}", f".{rng.randint(1, 99):02d}"))
        amount = f"{yuan}{cents}"
        # strings, not floats, so 0.1 never turns into 0.1000000000000000055
        yield ask(rng, "rmb_upper"), f"{amount}元", cn2an.an2cn(amount, "rmb")


# --- sentences: finite pools, so they are enumerated rather than sampled -----

def _phrase_family(family: str, convert: Callable[[str], tuple[str, str]]):
    """Rows over resources/phrases_zh.json: each phrase once per phrasing of `family`."""

    def rows(rng: random.Random, ask) -> Iterator[Row]:
        phrasings = _resource(PHRASINGS)[family]
        phrases = list(_resource("phrases_zh.json"))
        rng.shuffle(phrases)
        orders = [rng.sample(phrasings, len(phrasings)) for _ in phrases]
        # Round by round: every phrase appears once before any appears twice.
        for round_ in range(len(phrasings)):
            for phrase, order in zip(phrases, orders):
                yield (order[round_], *convert(phrase))
    return rows


def _s2t(phrase: str) -> tuple[str, str]:
    return phrase, _opencc("s2t").convert(phrase)


def _t2s(phrase: str) -> tuple[str, str]:
    traditional = _opencc("s2t").convert(phrase)
    return traditional, _opencc("t2s").convert(traditional)


def _pinyin(phrase: str) -> tuple[str, str]:
    return phrase, " ".join(lazy_pinyin(phrase, style=Style.TONE, errors="ignore"))


# --- word problems -------------------------------------------------------------

_NAMES = ("小明", "小红", "小刚", "小丽", "小华", "王阿姨", "李老师", "张叔叔")
_ITEMS = (("苹果", "个"), ("铅笔", "支"), ("本子", "本"), ("邮票", "张"),
          ("糖果", "颗"), ("气球", "个"), ("橘子", "个"), ("贴纸", "张"))
# Values satisfy b*c < a, so every subtraction stays positive and p/c is exact.
_PROBLEMS = (
    ("{n}有{a}{u}{i}，又买了{b}{u}，现在一共有多少{u}{i}？", lambda v: v["a"] + v["b"]),
    ("{n}有{a}{u}{i}，送给同学{b}{u}，还剩多少{u}？", lambda v: v["a"] - v["b"]),
    ("每盒装{b}{u}{i}，{c}盒一共有多少{u}？", lambda v: v["b"] * v["c"]),
    ("{n}把{p}{u}{i}平均分给{c}个小朋友，每人分到多少{u}？", lambda v: v["b"]),
    ("{n}带了{a}元钱，买了{c}本书，每本{b}元，还剩多少元？", lambda v: v["a"] - v["p"]),
    ("{n}骑自行车每小时行{b}千米，{c}小时一共行多少千米？", lambda v: v["p"]),
    ("公交车上原有{a}人，到站后下去{c}人，又上来{b}人，现在车上有多少人？",
     lambda v: v["a"] - v["c"] + v["b"]),
)


def _arithmetic_rows(rng: random.Random, ask) -> Iterator[Row]:
    while True:
        b, c = rng.randint(2, 20), rng.randint(2, 9)
        item, unit = rng.choice(_ITEMS)
        v = {"n": rng.choice(_NAMES), "i": item, "u": unit,
             "a": b * c + rng.randint(1, 80), "b": b, "c": c, "p": b * c}
        template, answer = rng.choice(_PROBLEMS)
        yield ask(rng, "arithmetic"), template.format(**v), str(answer(v))


# --- dates -------------------------------------------------------------------

def _cn_date(d: date) -> str:
    return f"{d.year}年{d.month}月{d.day}日"


def _date_rows(rng: random.Random, ask) -> Iterator[Row]:
    while True:
        start = date(1990, 1, 1) + timedelta(days=rng.randrange(46 * 365))
        kind = rng.randrange(3)
        if kind == 0:
            yield ask(rng, "date_weekday"), _cn_date(start), "星期" + "一二三四五六日"[start.weekday()]
        elif kind == 1:
            n, later = rng.randint(1, 400), rng.random() < 0.5
            end = start + timedelta(days=n if later else -n)
            instruction = ask(rng, "date_shift").format(n=n, when="后" if later else "前")
            yield instruction, _cn_date(start), _cn_date(end)
        else:
            end = start + timedelta(days=rng.randint(1, 1000))
            yield ask(rng, "date_gap"), f"{_cn_date(start)}和{_cn_date(end)}", f"{(end - start).days}天"


# --- units ---------------------------------------------------------------------

# (larger unit, smaller unit, smaller units per larger unit)
_UNITS = (("公里", "米", 1000), ("米", "厘米", 100), ("厘米", "毫米", 10),
          ("千克", "克", 1000), ("吨", "千克", 1000), ("升", "毫升", 1000),
          ("小时", "分钟", 60), ("分钟", "秒", 60), ("天", "小时", 24),
          ("公顷", "平方米", 10000))


def _format_decimal(x: Fraction) -> str:
    """Exact decimal of a Fraction whose denominator is 2^i * 5^j: 3/4 -> "0.75", 3500 -> "3500"."""
    text = format((Decimal(x.numerator) / Decimal(x.denominator)).normalize(), "f")
    assert Fraction(text) == x, f"{x} is not a terminating decimal"
    return text


def _unit_rows(rng: random.Random, ask) -> Iterator[Row]:
    while True:
        big, small, factor = rng.choice(_UNITS)
        # Denominators 2, 4, 10 keep both sides terminating: 0.75小时 = 45分钟.
        amount = Fraction(rng.randint(1, 400), rng.choice((1, 1, 2, 4, 10)))
        (src, src_unit), (dst, dst_unit) = rng.sample([(amount, big), (amount * factor, small)], 2)
        yield (ask(rng, "unit").format(unit=dst_unit),
               f"{_format_decimal(src)}{src_unit}", f"{_format_decimal(dst)}{dst_unit}")


# --- lists -----------------------------------------------------------------------

def _int_list(rng: random.Random) -> list[int]:
    return [rng.randint(0, 99) for _ in range(rng.randint(4, 8))]


def _sort_rows(rng: random.Random, ask) -> Iterator[Row]:
    while True:
        values, descending = _int_list(rng), rng.random() < 0.5
        instruction = ask(rng, "sort_desc" if descending else "sort_asc")
        yield instruction, str(values), str(sorted(values, reverse=descending))


def _extreme_rows(rng: random.Random, ask) -> Iterator[Row]:
    while True:
        values, largest = _int_list(rng), rng.random() < 0.5
        instruction = ask(rng, "extreme_max" if largest else "extreme_min")
        yield instruction, str(values), str(max(values) if largest else min(values))


# --- self-cognition --------------------------------------------------------------

ASSISTANT_NAME, ASSISTANT_AUTHOR = "小知", "zhlora"


def _self_cognition_rows(rng: random.Random, ask) -> Iterator[Row]:
    """Every greeting x question x closing of resources/self_cognition_zh.json once, in random
    order, each with one of the answers: about 5 x 24 x 4 = 480 ways to ask "who are you"."""
    spec = _resource("self_cognition_zh.json")
    questions = [f"{hello}{question}{closing}" for hello in spec["greetings"]
                 for question in spec["questions"] for closing in spec["closings"]]
    rng.shuffle(questions)
    for question in questions:
        yield question, "", rng.choice(spec["answers"]).format(name=ASSISTANT_NAME, author=ASSISTANT_AUTHOR)


def _self_cognition_heldout_rows(rng: random.Random, ask) -> Iterator[Row]:
    spec = _resource("self_cognition_zh.json")
    while True:
        answer = rng.choice(spec["answers"]).format(name=ASSISTANT_NAME, author=ASSISTANT_AUTHOR)
        yield ask(rng, "self_cognition"), "", answer


def _open_qa_rows(rng: random.Random, ask) -> Iterator[Row]:
    rows = load_open_qa()
    rng.shuffle(rows)
    for row in rows:
        yield row["instruction"], row["input"], row["output"]


@dataclass(frozen=True)
class TaskSpec:
    """One task family: an example of its canonical answer and its row stream."""

    answer_form: str
    rows: Callable[[random.Random, Callable], Iterator[Row]]  # (rng, ask) -> rows


TASKS: dict[str, TaskSpec] = {
    "num2cn": TaskSpec("一千二百三十四", _num2cn_rows),
    "cn2num": TaskSpec("1234", _cn2num_rows),
    "digits": TaskSpec("二零二四", _digits_rows),
    "rmb_upper": TaskSpec("壹仟贰佰叁拾肆元伍角", _rmb_rows),
    "s2t": TaskSpec("我們今天去公園散步。", _phrase_family("s2t", _s2t)),
    "t2s": TaskSpec("我们今天去公园散步。", _phrase_family("t2s", _t2s)),
    "pinyin": TaskSpec("wǒ men jīn tiān", _phrase_family("pinyin", _pinyin)),
    "arithmetic": TaskSpec("42", _arithmetic_rows),
    "date": TaskSpec("2024年3月5日 | 星期二 | 45天", _date_rows),
    "unit": TaskSpec("3500米", _unit_rows),
    "sort": TaskSpec("[1, 3, 9]", _sort_rows),
    "extreme": TaskSpec("9", _extreme_rows),
    "self_cognition": TaskSpec("我是小知，由 zhlora 微调的中文助手。", _self_cognition_rows),
    "open_qa": TaskSpec("free text", _open_qa_rows),
}
CHECKABLE_TASKS: frozenset[str] = frozenset(TASKS) - {"open_qa"}


def selected(row: dict, tasks: list[str]) -> bool:
    """Whether data.tasks keeps a row. The list picks built-in families; a row of the user's own
    data (task "user", or a label of theirs) always stays, so the guide's default config, which
    lists five families, still trains on `prepare --source my.jsonl`."""
    return not tasks or row.get("task") in tasks or row.get("task") not in TASKS

# A family that yields this many already-seen rows back to back counts as used up.
_PATIENCE = 200


def _next_fresh(stream: Iterator[Row], seen: set[str]) -> Row | None:
    for _ in range(_PATIENCE):
        row = next(stream, None)
        if row is None:
            return None
        key = normalize_text(f"{row[0]} {row[1]}")
        if key not in seen:
            seen.add(key)
            return row
    return None


def generate_samples(num_samples: int, seed: int = 42, tasks: list[str] | None = None) -> list[dict]:
    """Make `num_samples` rows {"instruction", "input", "output", "task"}, shuffled.

    Families take turns (round-robin), so their counts differ by at most one
    until a finite family runs out (s2t, t2s, pinyin: one row per phrase and
    phrasing; open_qa: every hand-written row once) and the others fill its
    share. So all of open_qa is in once num_samples >= len(tasks) * len(load_open_qa()).
    No two rows share a normalised instruction + input. The same seed gives
    the same rows; each family draws from its own Random("{seed}/{name}"), so
    its rows do not depend on which other families were selected.
    """
    names = list(dict.fromkeys(TASKS if tasks is None else tasks))
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {sorted(TASKS)}")
    ask = _asker(PHRASINGS)
    streams = {name: TASKS[name].rows(random.Random(f"{seed}/{name}"), ask) for name in names}
    seen: set[str] = set()
    samples: list[dict] = []
    while streams and len(samples) < num_samples:
        for name in list(streams):
            if len(samples) == num_samples:
                break
            row = _next_fresh(streams[name], seen)
            if row is None:
                del streams[name]
                continue
            instruction, input_, output = row
            samples.append({"instruction": instruction, "input": input_, "output": output, "task": name})
    if len(samples) < num_samples:
        raise ValueError(f"only {len(samples)} distinct rows exist for tasks {names}")
    random.Random(seed).shuffle(samples)
    return samples


# The families resources/heldout_phrasings_zh.json covers (extreme: its _max and _min keys).
HELDOUT_TASKS = ("num2cn", "cn2num", "digits", "extreme", "self_cognition")


def heldout_rows(per_task: int, tasks: list[str], seed: int = 0) -> list[dict]:
    """`per_task` rows of each task, asked only in the phrasings of resources/heldout_phrasings_zh.json
    (never in a generated training row), in task order. The numbers are drawn afresh, so a row
    may by chance share its input with a training row, never its instruction."""
    unknown = [name for name in tasks if name not in HELDOUT_TASKS]
    if unknown:
        raise ValueError(f"no held-out phrasings for {unknown}; these tasks have them: {list(HELDOUT_TASKS)}")
    ask, rows = _asker(HELDOUT_PHRASINGS), []
    for name in tasks:
        make = _self_cognition_heldout_rows if name == "self_cognition" else TASKS[name].rows
        stream, seen = make(random.Random(f"heldout/{seed}/{name}"), ask), set()
        for _ in range(per_task):
            row = _next_fresh(stream, seen)
            if row is None:
                break
            rows.append({"instruction": row[0], "input": row[1], "output": row[2], "task": name})
    return rows


_INT = re.compile(r"-?\d+")


def check_answer(task: str, prediction: str, reference: str) -> bool:
    """Exact match after normalisation.

    Both sides get normalize_text, then trailing "。", "." and spaces are
    dropped. sort and extreme compare the lists of integers found in each
    side ("[1, 3, 9]" == "1, 3, 9"); pinyin ignores case; self_cognition passes when
    the answer names both ASSISTANT_NAME and ASSISTANT_AUTHOR (the wording may vary);
    every other family compares the strings.
    """
    if task not in CHECKABLE_TASKS:
        raise ValueError(f"{task!r} has no exact answer; checkable tasks: {sorted(CHECKABLE_TASKS)}")
    pred, ref = (normalize_text(s).rstrip("。. ") for s in (prediction, reference))
    if task in ("sort", "extreme"):
        return [int(x) for x in _INT.findall(pred)] == [int(x) for x in _INT.findall(ref)]
    if task == "pinyin":
        return pred.lower() == ref.lower()
    if task == "self_cognition":
        return ASSISTANT_NAME in pred and ASSISTANT_AUTHOR.lower() in pred.lower()
    return pred == ref


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print generated task rows as JSON lines.")
    parser.add_argument("num_samples", type=int, nargs="?", default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS))
    parser.add_argument("--heldout", action="store_true", help="rows in the held-out phrasings (per task)")
    args = parser.parse_args(argv)
    rows = (heldout_rows(args.num_samples, args.tasks or list(HELDOUT_TASKS), args.seed)
            if args.heldout else generate_samples(args.num_samples, args.seed, args.tasks))
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))


if __name__ == "__main__":
    main()
