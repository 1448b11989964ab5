"""Data tests for zhlora.tasks: every family against its oracle, recomputed here.

The checks below do not call the generator's helpers: each answer is rebuilt
from the row's input with the library (cn2an, OpenCC, pypinyin) or with exact
arithmetic (int, Fraction, datetime), so a bug in tasks.py cannot hide itself.

    python -m pytest tests/test_tasks.py -q
"""

import ast
import json
import re
from collections import Counter
from datetime import date, timedelta
from fractions import Fraction
from importlib import resources

import cn2an
import pytest
from opencc import OpenCC
from pypinyin import Style, lazy_pinyin

from zhlora.tasks import (
    CHECKABLE_TASKS,
    TASKS,
    check_answer,
    generate_samples,
    load_open_qa,
    normalize_text,
)

FAMILIES = ["num2cn", "cn2num", "rmb_upper", "s2t", "t2s", "pinyin", "arithmetic",
            "date", "unit", "sort", "extreme", "open_qa"]
S2T, T2S = OpenCC("s2t"), OpenCC("t2s")
HAN = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def rows():
    # Each family's round-robin share is then len(open_qa), so every open_qa row is in.
    return generate_samples(len(TASKS) * len(load_open_qa()), seed=7)


def by_task(rows, task):
    selected = [row for row in rows if row["task"] == task]
    assert selected, f"no {task} rows generated"
    return selected


def parse_cn_dates(text):
    return [date(int(y), int(m), int(d)) for y, m, d in re.findall(r"(\d+)年(\d+)月(\d+)日", text)]


# --- one oracle per family ---------------------------------------------------------

def oracle_num2cn(row):
    return cn2an.an2cn(int(row["input"])) == row["output"] \
        and cn2an.cn2an(row["output"], "strict") == int(row["input"])


def oracle_cn2num(row):
    return row["output"].isdigit() and cn2an.cn2an(row["input"], "strict") == int(row["output"])


def oracle_rmb_upper(row):
    amount = row["input"].removesuffix("元")
    whole_yuan = "." not in amount
    return cn2an.an2cn(amount, "rmb") == row["output"] and row["output"].endswith("整") == whole_yuan


def oracle_s2t(row):
    return S2T.convert(row["input"]) == row["output"] != row["input"] \
        and T2S.convert(row["output"]) == row["input"]


def oracle_t2s(row):
    return T2S.convert(row["input"]) == row["output"] != row["input"] \
        and S2T.convert(row["output"]) == row["input"]


def oracle_pinyin(row):
    syllables = row["output"].split(" ")
    expected = lazy_pinyin(row["input"], style=Style.TONE, errors="ignore")
    return syllables == expected and len(syllables) == len(HAN.findall(row["input"]))


# Each word-problem template, solved from its own numbers.
WORD_PROBLEMS = [
    (r"有(\d+)\D+又买了(\d+)", lambda a, b: a + b),
    (r"有(\d+)\D+送给同学(\d+)", lambda a, b: a - b),
    (r"每盒装(\d+)\D+?(\d+)盒", lambda a, b: a * b),
    (r"把(\d+)\D+平均分给(\d+)个", lambda a, b: a // b if a % b == 0 else None),
    (r"带了(\d+)元钱，买了(\d+)本书，每本(\d+)元", lambda a, n, price: a - n * price),
    (r"每小时行(\d+)千米，(\d+)小时", lambda speed, hours: speed * hours),
    (r"原有(\d+)人，到站后下去(\d+)人，又上来(\d+)人", lambda a, off, on: a - off + on),
]


def oracle_arithmetic(row):
    for pattern, solve in WORD_PROBLEMS:
        match = re.search(pattern, row["input"])
        if match:
            answer = solve(*map(int, match.groups()))
            return answer is not None and answer > 0 and row["output"] == str(answer)
    raise AssertionError(f"unknown word problem: {row['input']}")


def oracle_date(row):
    dates = parse_cn_dates(row["input"])
    if row["output"].startswith("星期"):
        return row["output"] == "星期" + "一二三四五六日"[dates[0].isoweekday() - 1]
    if row["output"].endswith("天"):
        return int(row["output"][:-1]) == (dates[1] - dates[0]).days > 0
    n, when = re.search(r"(\d+)天([前后])", row["instruction"]).groups()
    step = timedelta(days=int(n))
    return parse_cn_dates(row["output"]) == [dates[0] + step if when == "后" else dates[0] - step]


UNIT_FACTORS = {("公里", "米"): 1000, ("米", "厘米"): 100, ("厘米", "毫米"): 10,
                ("千克", "克"): 1000, ("吨", "千克"): 1000, ("升", "毫升"): 1000,
                ("小时", "分钟"): 60, ("分钟", "秒"): 60, ("天", "小时"): 24,
                ("公顷", "平方米"): 10000}
# No exponent, no trailing zeros after the point, no float noise: "62.5厘米".
EXACT_QUANTITY = re.compile(r"(0|[1-9]\d*)(\.\d*[1-9])?(\D+)")


def oracle_unit(row):
    src, dst = EXACT_QUANTITY.fullmatch(row["input"]), EXACT_QUANTITY.fullmatch(row["output"])
    if not (src and dst) or dst.group(3) not in row["instruction"]:
        return False
    src_value, dst_value = Fraction(src.group(1) + (src.group(2) or "")), Fraction(dst.group(1) + (dst.group(2) or ""))
    pair = (src.group(3), dst.group(3))
    if pair in UNIT_FACTORS:
        return src_value * UNIT_FACTORS[pair] == dst_value
    return dst_value * UNIT_FACTORS[pair[::-1]] == src_value


def oracle_sort(row):
    descending = "大到小" in row["instruction"] or "降序" in row["instruction"]
    return row["output"] == str(sorted(ast.literal_eval(row["input"]), reverse=descending))


def oracle_extreme(row):
    values = ast.literal_eval(row["input"])
    return row["output"] == str(max(values) if "最大" in row["instruction"] else min(values))


def oracle_digits(row):
    return row["input"].isdigit() and row["output"] == "".join("零一二三四五六七八九"[int(d)] for d in row["input"])


def oracle_self_cognition(row):
    return (not row["input"] and row["instruction"].endswith(("？", "。"))
            and "小知" in row["output"] and "zhlora" in row["output"])


ORACLES = {"num2cn": oracle_num2cn, "digits": oracle_digits, "self_cognition": oracle_self_cognition, "cn2num": oracle_cn2num, "rmb_upper": oracle_rmb_upper,
           "s2t": oracle_s2t, "t2s": oracle_t2s, "pinyin": oracle_pinyin,
           "arithmetic": oracle_arithmetic, "date": oracle_date, "unit": oracle_unit,
           "sort": oracle_sort, "extreme": oracle_extreme}


@pytest.mark.parametrize("task", sorted(CHECKABLE_TASKS))
def test_every_row_matches_its_oracle(rows, task):
    wrong = [row for row in by_task(rows, task) if not ORACLES[task](row)]
    assert not wrong, wrong[:3]


@pytest.mark.parametrize("task", sorted(CHECKABLE_TASKS))
def test_family_has_several_phrasings_and_an_input(rows, task):
    family = by_task(rows, task)
    assert len({row["instruction"] for row in family}) >= 3
    assert all((row["input"] or task == "self_cognition") and row["output"] for row in family)
    assert all(check_answer(task, row["output"] + "。", row["output"]) for row in family)


def test_open_qa_rows_come_from_the_file_and_all_are_included(rows):
    expected = {(r["instruction"], r["input"], r["output"]) for r in load_open_qa()}
    got = {(r["instruction"], r["input"], r["output"]) for r in by_task(rows, "open_qa")}
    assert got == expected


def test_family_names_and_checkable_set():
    assert set(FAMILIES) <= set(TASKS) and len(TASKS) >= 8
    assert CHECKABLE_TASKS == frozenset(TASKS) - {"open_qa"}


# --- generate_samples ------------------------------------------------------------

def test_rows_have_the_four_fields():
    for row in generate_samples(40, seed=3):
        assert set(row) == {"instruction", "input", "output", "task"}
        assert all(isinstance(value, str) for value in row.values())


def test_same_seed_same_rows_and_other_seed_other_rows():
    assert generate_samples(300, seed=1) == generate_samples(300, seed=1)
    assert generate_samples(300, seed=1) != generate_samples(300, seed=2)


def test_no_duplicate_instruction_and_input():
    keys = [normalize_text(f"{r['instruction']} {r['input']}") for r in generate_samples(5000, seed=11)]
    assert len(keys) == len(set(keys)) == 5000


def test_families_are_balanced():
    counts = Counter(row["task"] for row in generate_samples(1200, seed=5))
    assert set(counts) == set(TASKS)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_task_selection_and_errors():
    rows = generate_samples(50, seed=0, tasks=["sort", "date"])
    assert Counter(row["task"] for row in rows) == {"sort": 25, "date": 25}
    with pytest.raises(ValueError, match="unknown tasks"):
        generate_samples(10, tasks=["poetry"])
    with pytest.raises(ValueError, match="distinct rows"):
        generate_samples(len(load_open_qa()) + 1, tasks=["open_qa"])


# --- resources -----------------------------------------------------------------------

def test_open_ended_file():
    rows = load_open_qa()
    assert len(rows) >= 100
    assert all(set(r) == {"instruction", "input", "output", "task"} for r in rows)
    assert all(r["task"] == "open_qa" and r["instruction"].strip() and r["output"].strip() for r in rows)
    assert sum(bool(r["input"]) for r in rows) >= 10
    assert len({normalize_text(r["instruction"] + " " + r["input"]) for r in rows}) == len(rows)


def test_source_phrases():
    path = resources.files("zhlora") / "resources" / "phrases_zh.json"
    phrases = json.loads(path.read_text("utf-8"))
    assert len(phrases) >= 60 and len(set(phrases)) == len(phrases)
    # Every phrase must change under s2t, or s2t/t2s rows would copy their input.
    assert all(S2T.convert(p) != p for p in phrases)


# --- normalisation and checking ------------------------------------------------------

def test_normalize_text():
    assert normalize_text("  ａｂｃ\t\n １２３  ") == "abc 123"
    assert normalize_text("你好\u3000世界") == "你好 世界"


@pytest.mark.parametrize("task, prediction, reference, expected", [
    ("num2cn", "一千二百三十四。", "一千二百三十四", True),
    ("num2cn", "一千二百三十五", "一千二百三十四", False),
    ("cn2num", " １２３４ ", "1234", True),
    ("cn2num", "1235", "1234", False),
    ("rmb_upper", "壹仟元整。", "壹仟元整", True),
    ("rmb_upper", "壹仟元", "壹仟元整", False),
    ("s2t", "我們", "我们", False),
    ("t2s", "我们明天见。", "我们明天见", True),
    ("pinyin", "Wǒ  men ", "wǒ men", True),
    ("pinyin", "wo men", "wǒ men", False),
    ("arithmetic", "42.", "42", True),
    ("arithmetic", "42个", "42", False),
    ("date", "2024年3月5日。", "2024年3月5日", True),
    ("date", "星期二", "星期三", False),
    ("date", "45天", "45", False),
    ("unit", "3500米", "3500米", True),
    ("unit", "3500", "3500米", False),
    ("sort", "1, 3, 9", "[1, 3, 9]", True),
    ("sort", "[3, 1, 9]", "[1, 3, 9]", False),
    ("sort", "[1, 3]", "[1, 3, 9]", False),
    ("extreme", "9。", "9", True),
    ("extreme", "-9", "9", False),
])
def test_check_answer(task, prediction, reference, expected):
    assert check_answer(task, prediction, reference) is expected


def test_check_answer_refuses_open_qa():
    with pytest.raises(ValueError, match="no exact answer"):
        check_answer("open_qa", "a", "a")


def test_heldout_rows_use_only_phrasings_training_never_sees():
    from zhlora.tasks import heldout_rows

    tasks = ["num2cn", "cn2num", "digits", "extreme", "self_cognition"]
    held = heldout_rows(20, tasks, seed=0)
    # self_cognition has no input to vary: one row per held-out question (there are 6)
    assert Counter(r["task"] for r in held) == {**{t: 20 for t in tasks[:-1]}, "self_cognition": 6}
    trained = {r["instruction"] for r in generate_samples(4000, seed=1, tasks=tasks)}
    assert not {r["instruction"] for r in held} & trained
    assert all(ORACLES[r["task"]](r) for r in held)
    assert heldout_rows(20, tasks, seed=0) == held


def test_self_cognition_is_checked_by_name_and_maker():
    assert check_answer("self_cognition", "我叫小知，是 ZhLoRA 做的。", "我是小知，由 zhlora 微调的中文助手。")
    assert not check_answer("self_cognition", "我是小知。", "我是小知，由 zhlora 微调的中文助手。")
    assert not check_answer("self_cognition", "I am SmolLM, made by Hugging Face.", "我是小知，由 zhlora 微调。")


def test_data_tasks_picks_built_in_families_and_keeps_the_users_own_rows():
    from zhlora.tasks import selected

    rows = [{"task": "num2cn"}, {"task": "s2t"}, {"task": "user"}, {"task": "translation"}]
    assert [r["task"] for r in rows if selected(r, ["num2cn"])] == ["num2cn", "user", "translation"]
    assert all(selected(r, []) for r in rows)
