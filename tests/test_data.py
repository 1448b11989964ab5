"""Data tests for zhlora/data.py and zhlora/readers.py: small fixtures written per test,
Chinese text included, plus the real LLaMA-Factory demo files from ../shared/datasets.

Run: python -m pytest tests/test_data.py -q
"""
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zhlora import data
from zhlora.data import DataError, LoadResult, Problem

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def row(instruction="把这句话翻译成英文", output="Translate this.", **extra):
    return {"instruction": instruction, "output": output, **extra}


def write(tmp_path, name, content):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def jsonl(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                   for r in rows)


def where(result):
    """(line, field) of every problem, the part of a report that tests pin down."""
    return [(p.line, p.field) for p in result.problems]


# ---------------------------------------------------------------- formats

def test_problem_str_is_path_line_field_message():
    assert str(Problem("a.json", 7, "output", "empty")) == "a.json:7: output: empty"


def test_json_array_rows_become_canonical_with_start_lines(tmp_path):
    rows = [row(), row("写一首诗", "床前明月光", input="", task="poem"), row("问", "", input="x")]
    path = write(tmp_path, "d.json", json.dumps(rows, ensure_ascii=False, indent=2))
    result = data.load_file(path)
    assert result.rows == [
        {"instruction": "把这句话翻译成英文", "input": "", "output": "Translate this.", "task": "user"},
        {"instruction": "写一首诗", "input": "", "output": "床前明月光", "task": "poem"}]
    # indent=2: "[" is line 1, then the rows take 4 and 6 lines; the third's "{" is line 12
    assert where(result) == [(12, "output")]
    assert result.counts == Counter(loaded=2, dropped_empty=1)


def test_truncated_json_keeps_rows_before_the_error(tmp_path):
    text = json.dumps([row("一"), row("二"), row("三")], ensure_ascii=False, indent=2)
    path = write(tmp_path, "cut.json", text[: text.index("三") + 3])
    result = data.load_file(path)
    assert [r["instruction"] for r in result.rows] == ["一", "二"]
    assert len(result.problems) == 1
    problem = result.problems[0]
    assert (problem.line, problem.field) == (text[: text.index("三")].count("\n") + 1, "json")
    assert "rest of the file was not read" in problem.message
    assert result.counts["syntax_errors"] == 1


@pytest.mark.parametrize("text, line", [("", 1), ('{"instruction": "a"}', 1),
                                        ('[\n{"instruction": "a", "output": "b"}\n{}]', 3),
                                        ('[{"instruction": "a", "output": "b"}]\n]', 2)])
def test_json_that_is_not_one_array_is_a_syntax_problem(tmp_path, text, line):
    result = data.load_file(write(tmp_path, "x.json", text))
    assert [(p.line, p.field) for p in result.problems] == [(line, "json")]


def test_jsonl_bad_line_is_reported_and_later_lines_still_read(tmp_path):
    text = jsonl(row("一"), '{"instruction": "二", "output": ', row("三")) + "\n" + jsonl(row("五"))
    result = data.load_file(write(tmp_path, "d.jsonl", text))
    assert [r["instruction"] for r in result.rows] == ["一", "三", "五"]
    assert where(result) == [(2, "json")]


def test_jsonl_line_numbers_ignore_unicode_line_separators(tmp_path):
    # U+2028 inside a string is valid JSON; str.splitlines would count it as a new line
    text = jsonl(row("甲\u2028乙"), row("丙", 42))
    assert where(data.load_file(write(tmp_path, "d.jsonl", text))) == [(2, "output")]


def test_csv_records_with_quoted_newlines_report_their_first_line(tmp_path):
    text = ('instruction,input,output\n'
            '"写一首诗,\n关于秋天",,"落叶\n满地"\n'    # lines 2-4
            '"问题二",,\n'                            # line 5: empty output
            'only,two\n'                              # line 6: a cell short
            '翻译,你好,hello\n')
    result = data.load_file(write(tmp_path, "d.csv", text))
    assert result.rows[0] == {"instruction": "写一首诗,\n关于秋天", "input": "",
                              "output": "落叶\n满地", "task": "user"}
    assert result.rows[1]["input"] == "你好"
    assert where(result) == [(5, "output"), (6, "csv")]


def test_csv_unclosed_quote_is_a_syntax_problem(tmp_path):
    result = data.load_file(write(tmp_path, "d.csv", 'instruction,output\na,b\n"c,d\ne,f\n'))
    assert len(result.rows) == 1 and result.counts["syntax_errors"] == 1


def test_parquet_rows_use_row_numbers_and_null_means_absent(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_pylist([row("一", input="上下文"), row("二", None),
                                  {"instruction": "三", "input": None, "output": "好"}])
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    result = data.load_file(path)
    assert [(r["instruction"], r["input"]) for r in result.rows] == [("一", "上下文"), ("三", "")]
    assert where(result) == [(2, "output")]
    assert result.counts["dropped_missing"] == 1


def test_parquet_sharegpt_with_both_key_styles(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    # One file, two key styles: Parquet stores every turn with all four keys, two null.
    table = pa.Table.from_pylist([
        {"conversations": [{"from": "human", "value": "问"}, {"from": "gpt", "value": "答"}]},
        {"conversations": [{"role": "user", "content": "问二"},
                           {"role": "observation", "content": "{}"}]}])
    path = tmp_path / "s.parquet"
    pq.write_table(table, path)
    result = data.load_file(path)
    assert result.rows == [{"instruction": "问", "input": "", "output": "答", "task": "user"}]
    assert where(result) == [(2, "conversations[1].role")]


def test_corrupt_parquet_is_a_problem_not_a_crash(tmp_path):
    pytest.importorskip("pyarrow")
    result = data.load_file(write(tmp_path, "bad.parquet", b"not parquet at all"))
    assert where(result) == [(0, "parquet")]


def test_folder_loads_supported_files_sorted_and_finds_duplicates_across_files(tmp_path):
    write(tmp_path, "b.jsonl", jsonl(row("二"), row("一")))
    write(tmp_path, "a.json", json.dumps([row("一")], ensure_ascii=False))
    write(tmp_path, "sub/c.csv", "instruction,output\n三,好\n")
    write(tmp_path, "README.md", "# not data")
    write(tmp_path, ".cache/d.jsonl", "garbage")
    result = data.load_source(str(tmp_path))
    assert [r["instruction"] for r in result.rows] == ["一", "二", "三"]
    assert [str(p) for p in result.problems] == [
        f"{tmp_path / 'b.jsonl'}:2: row: duplicate of {tmp_path / 'a.json'}:1"]


def test_empty_files_and_folders(tmp_path):
    assert where(data.load_file(write(tmp_path, "e.jsonl", "\n"))) == [(0, "file")]
    with pytest.raises(DataError, match="no .* file in this folder"):
        data.load_source(str(write(tmp_path, "sub/notes.txt", "x").parent))


# ---------------------------------------------------------------- row layouts

def test_sharegpt_from_value_with_system_and_history(tmp_path):
    conversation = {"conversations": [
        {"from": "system", "value": "你是一个助手。"},
        {"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
        {"from": "human", "value": "今天星期几？"}, {"from": "gpt", "value": "星期三。"}]}
    result = data.load_file(write(tmp_path, "s.jsonl", jsonl(conversation)))
    assert result.rows == [{"instruction": "今天星期几？", "input": "", "output": "星期三。",
                            "system": "你是一个助手。", "history": [["你好", "你好！"]],
                            "task": "user"}]


def test_sharegpt_role_content_under_messages(tmp_path):
    messages = {"messages": [{"role": "user", "content": "一加一"},
                             {"role": "assistant", "content": "二"}], "task": "math"}
    result = data.load_file(write(tmp_path, "m.jsonl", jsonl(messages)))
    assert result.rows == [{"instruction": "一加一", "input": "", "output": "二", "task": "math"}]


def turns(*roles):
    return {"conversations": [{"from": r, "value": f"第{i}句"} for i, r in enumerate(roles)]}


@pytest.mark.parametrize("conversation, field, counter", [
    (turns("human", "gpt", "gpt", "human"), "conversations[2].from", "dropped_bad_turns"),
    (turns("human", "gpt", "human", "human"), "conversations[3].from", "dropped_bad_turns"),
    (turns("human", "system", "gpt"), "conversations[1].from", "dropped_bad_turns"),
    (turns("human", "gpt", "human"), "conversations[2].from", "dropped_bad_turns"),
    (turns("human", "bot"), "conversations[1].from", "dropped_bad_turns"),
    (turns("system"), "conversations[0].from", "dropped_bad_turns"),
    ({"conversations": []}, "conversations", "dropped_type"),
    ({"conversations": [{"from": "human", "value": 1}, {"from": "gpt", "value": "a"}]},
     "conversations[0].value", "dropped_type"),
    ({"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": " "}]},
     "messages[1].content", "dropped_empty"),
])
def test_sharegpt_bad_conversations_name_the_turn(tmp_path, conversation, field, counter):
    result = data.load_file(write(tmp_path, "s.jsonl", jsonl(conversation)))
    assert result.rows == [] and where(result) == [(1, field)]
    assert result.counts == Counter({counter: 1})


@pytest.mark.parametrize("role", ["function_call", "observation", "tool", "function"])
def test_tool_roles_are_refused_as_unsupported(tmp_path, role):
    conversation = turns("human", "gpt", "gpt", "human", "gpt")  # also out of order...
    conversation["conversations"][2]["from"] = role
    conversation["tools"] = '[{"name": "search"}]'
    result = data.load_file(write(tmp_path, "s.jsonl", jsonl(conversation)))
    # ...but the unsupported role is what gets reported, and `tools` is not reported again
    assert [str(p) for p in result.problems] == [
        f"{tmp_path / 's.jsonl'}:1: conversations[2].from: role '{role}': "
        "tool-calling conversations are not supported"]
    assert result.counts == Counter(dropped_unsupported=1)


@pytest.mark.parametrize("tools, loaded", [("", 1), ("[]", 1), ([], 1),
                                           ('[{"name": "search_events"}]', 0),
                                           ([{"name": "search_events"}], 0)])
def test_tool_definitions_refuse_an_otherwise_plain_chat(tmp_path, tools, loaded):
    result = data.load_file(write(tmp_path, "s.jsonl", jsonl({**turns("human", "gpt"),
                                                              "tools": tools})))
    assert result.counts["loaded"] == loaded
    assert where(result) == ([] if loaded else [(1, "tools")])


def test_alpaca_history_is_checked(tmp_path):
    good = row(history=[["你好", "你好！"]], system="你是助手")
    text = jsonl(good, row("二", history=[["只有一句"]]), row("三", history="不是列表"))
    result = data.load_file(write(tmp_path, "h.jsonl", text))
    assert result.rows == [{**good, "input": "", "task": "user"}]
    assert where(result) == [(2, "history[0]"), (3, "history")]


def test_columns_map_user_fields_to_ours(tmp_path):
    text = jsonl({"question": "天空为什么是蓝的？", "answer": "瑞利散射。", "instruction": "旧"},
                 {"question": "没有答案"})
    result = data.load_file(write(tmp_path, "q.jsonl", text),
                            columns={"question": "instruction", "answer": "output"})
    assert result.rows == [{"instruction": "天空为什么是蓝的？", "input": "",
                            "output": "瑞利散射。", "task": "user"}]
    assert where(result) == [(2, "output")]
    with pytest.raises(DataError, match="instrution"):
        data.load_file(write(tmp_path, "q.jsonl", text), columns={"question": "instrution"})


def test_control_characters_are_stripped_but_punctuation_kept(tmp_path):
    noisy = row("你好，世界！\x00", "第一行\r\n第二行\t制表\x1b[0m", input="Ｈｅｌｌｏ,world")
    result = data.load_file(write(tmp_path, "c.jsonl", jsonl(noisy, row("\x00\x07", "空"))))
    assert result.rows == [{"instruction": "你好，世界！", "input": "Ｈｅｌｌｏ,world",
                            "output": "第一行\n第二行\t制表[0m", "task": "user"}]
    assert result.counts == Counter(loaded=1, cleaned_control=1, dropped_empty=1)


@pytest.mark.parametrize("fifth", ["bad_json", "unsupported_role"])
def test_five_planted_defects_are_exactly_the_five_reported(tmp_path, fifth):
    fifth_line = ('{"instruction": "坏", "output": "行"' if fifth == "bad_json"
                  else turns("human", "function_call", "observation", "gpt"))
    text = jsonl(row("一", "好"),                      # 1 ok
                 row("二", 42),                        # 2 wrong type: numbers are not coerced
                 row("三", "好"),                      # 3 ok
                 {"instruction": "四"},                # 4 missing output
                 row("五", " \n "),                    # 5 empty output
                 row("六", "好", input="上下文"),       # 6 ok
                 row(" 一 ", "好"),                     # 7 duplicate of line 1 after normalising
                 fifth_line,                           # 8 bad JSON / unsupported role
                 row("九", "好"))                      # 9 ok
    result = data.load_file(write(tmp_path, "planted.jsonl", text))
    fifth_field = "json" if fifth == "bad_json" else "conversations[1].from"
    assert where(result) == [(2, "output"), (4, "output"), (5, "output"), (7, "row"),
                             (8, fifth_field)]
    assert result.problems[3].message == "duplicate of line 1"
    assert [r["instruction"] for r in result.rows] == ["一", "三", "六", "九"]


def test_duplicates_compare_nfkc_and_collapsed_whitespace(tmp_path):
    text = jsonl(row("你好!", "答 案"), row("你好！", "答\n\n案"), row("你好！", "答案"))
    result = data.load_file(write(tmp_path, "d.jsonl", text))
    assert where(result) == [(2, "row")]
    assert result.counts == Counter(loaded=2, dropped_duplicate=1)


@pytest.mark.parametrize("bad, field, counter", [
    ([1, 2], "row", "dropped_not_object"), ('"文本"', "row", "dropped_not_object"),
    ({"output": "答"}, "instruction", "dropped_missing"),
    (row(input=3), "input", "dropped_type"), (row(system=["s"]), "system", "dropped_type"),
    (row(task=7), "task", "dropped_type"), (row(" \t"), "instruction", "dropped_empty"),
])
def test_each_refusal_has_its_field_and_counter(tmp_path, bad, field, counter):
    result = data.load_file(write(tmp_path, "r.jsonl", jsonl(row(), bad)))
    assert where(result) == [(2, field)]
    assert result.counts == Counter({"loaded": 1, counter: 1})


# ---------------------------------------------------------------- encodings and errors

def test_utf8_bom_is_accepted(tmp_path):
    bom = "\ufeff".encode("utf-8")
    csv_path = write(tmp_path, "b.csv", bom + "instruction,output\n问,答\n".encode("utf-8"))
    json_path = write(tmp_path, "b.json", bom + json.dumps([row()]).encode("utf-8"))
    assert data.load_file(csv_path).rows[0]["instruction"] == "问"
    assert data.load_file(json_path).counts == Counter(loaded=1)


def test_gbk_file_gives_the_line_of_the_first_bad_byte_and_a_hint(tmp_path):
    text = '[\n{"instruction": "ok", "output": "fine"},\n{"instruction": "中文", "output": "好"}\n]'
    path = write(tmp_path, "gbk.json", text.encode("gbk"))
    result = data.load_file(path)
    assert result.rows == [] and where(result) == [(3, "encoding")]
    assert "try --encoding gbk" in result.problems[0].message
    assert result.counts == Counter(encoding_errors=1)
    assert data.load_file(path, encoding="gbk").counts == Counter(loaded=2)


def test_missing_or_unsupported_paths_raise_data_error_with_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.json: no such file"):
        data.load_file(tmp_path / "nope.json")
    with pytest.raises(DataError, match="notes.txt: not a"):
        data.load_file(write(tmp_path, "notes.txt", "x"))
    with pytest.raises(DataError, match="no such file"):  # looks like a hub id, but is a file name
        data.load_source("someone/data.jsonl")


def test_hub_ids_go_through_datasets_and_offline_errors_are_wrapped(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(spec, split):
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="owner/name: .*Offline, the hub cannot be reached"):
        data.load_source("owner/name")
    monkeypatch.setattr(datasets, "load_dataset", lambda spec, split: [row(), {"output": "x"}])
    result = data.load_source("owner/name")
    assert result.counts == Counter(loaded=1, dropped_missing=1)
    assert str(result.problems[0]).startswith("owner/name:2: instruction:")


def test_validate_paths_prints_problems_and_summary_never_a_traceback(tmp_path):
    good = write(tmp_path, "good.jsonl", jsonl(row("一"), row("二", "很长" * 50)))
    bad = write(tmp_path, "bad.jsonl", jsonl(row("一"), row("二", 42), row("三", ""), "{"))
    out = io.StringIO()
    assert data.validate_paths([str(good)], max_chars=40, out=out) == 0
    assert out.getvalue().splitlines() == ["rows loaded: 2", "  over 40 characters: 1 (kept; "
                                           "counted, not dropped)", "no problems"]
    out = io.StringIO()
    status = data.validate_paths([str(bad), str(tmp_path / "missing.json")], max_problems=2,
                                 out=out)
    lines = out.getvalue().splitlines()
    assert status == 1
    assert lines[:3] == [f"{bad}:2: output: expected a string, got int 42",
                         f"{bad}:3: output: empty (only whitespace)", "... and 2 more problems"]
    assert "  unreadable_sources: 1" in lines and "rows loaded: 1" in lines
    out = io.StringIO()
    data.validate_paths([str(tmp_path / "missing.json")], out=out)
    assert out.getvalue().startswith(f"{tmp_path / 'missing.json'}:0: file: no such file")


# ---------------------------------------------------------------- sources, mixing, splitting

@pytest.mark.parametrize("spec, expected", [
    ("data/a.json", ("data/a.json", None)), ("data/a.json:0.5", ("data/a.json", 0.5)),
    ("data/a.json:200", ("data/a.json", 200)), ("data/a.json:1", ("data/a.json", 1)),
    ("data/a.json:1.0", ("data/a.json", 1.0)), ("owner/name:.25", ("owner/name", 0.25)),
    ("generated:2000", ("generated", 2000)), ("a:b/c.json:3", ("a:b/c.json", 3)),
])
def test_parse_source_spec(spec, expected):
    assert data.parse_source_spec(spec) == expected


@pytest.mark.parametrize("spec", ["a.json:", "a.json:0", "a.json:1.5", "a.json:-2", "a.json:x",
                                  "a.json:0.0", ":5"])
def test_parse_source_spec_refuses_bad_suffixes(spec):
    with pytest.raises(DataError):
        data.parse_source_spec(spec)


def test_parse_source_spec_keeps_an_existing_path_with_a_colon(tmp_path):
    path = write(tmp_path, "v1:2.json", "[]")
    assert data.parse_source_spec(str(path)) == (str(path), None)


def source(name, n, task="user"):
    rows = [{"instruction": f"{name}{i}", "input": "", "output": "答", "task": task}
            for i in range(n)]
    return LoadResult(rows, [], Counter(loaded=n))


def test_mix_sources_takes_ratios_and_counts_deterministically():
    sources = [(source("a", 10), None), (source("b", 10), 0.5), (source("c", 10), 3)]
    mixed = data.mix_sources(sources, seed=1)
    assert [r["instruction"][0] for r in mixed] == ["a"] * 10 + ["b"] * 5 + ["c"] * 3
    assert mixed[:10] == sources[0][0].rows  # all rows, in file order
    assert mixed == data.mix_sources(sources, seed=1)
    assert mixed != data.mix_sources(sources, seed=2)
    assert len(data.mix_sources([(source("d", 3), 0.01)], seed=0)) == 1
    with pytest.raises(DataError, match="asks for 11 rows but has only 10"):
        data.mix_sources([(source("e", 10), 11)], seed=0)


def test_split_is_deterministic_leak_free_and_stratified():
    rows = source("问", 40, "translate").rows + source("算", 20, "math").rows
    rows += source("写", 3, "poem").rows + source("独", 1, "rare").rows
    rows += [dict(rows[0], output="另一个答案"), dict(rows[41], instruction=" 算1 ")]
    train, val, test = data.split_rows(rows, val_ratio=0.1, test_ratio=0.1, seed=7)
    assert (train, val, test) == data.split_rows(rows, 0.1, 0.1, seed=7)
    assert sorted(map(id, train + val + test)) == sorted(map(id, rows))
    train_keys = {data.normalize_key(r) for r in train}
    assert not train_keys & {data.normalize_key(r) for r in val + test}
    assert {r["task"] for r in test} == {"translate", "math", "poem"}  # "rare" has one prompt
    assert {r["task"] for r in val} == {"translate", "math", "poem"}
    assert len(test) == 4 + 2 + 1 + (rows[0] in test) + (rows[41] in test)
    with pytest.raises(ValueError):
        data.split_rows(rows, 0.5, 0.5, seed=0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("甲乙丙丁戊"), st.sampled_from(["a", "b"])),
                max_size=40), st.integers(0, 3))
def test_split_never_shares_a_prompt_across_splits(pairs, seed):
    rows = [{"instruction": text, "input": "", "output": "o", "task": task}
            for text, task in pairs]
    train, val, test = data.split_rows(rows, 0.2, 0.2, seed)
    assert len(train) + len(val) + len(test) == len(rows)
    keys = [{data.normalize_key(r) for r in split} for split in (train, val, test)]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


def test_count_over_length_counts_every_text_field():
    rows = [row("12", "345"), row("1", "2", history=[["34", "5"]]), row("1", "2", input="3456")]
    assert data.count_over_length(rows, 5) == 1
    assert data.count_over_length(rows, 4) == 3


def test_write_json_is_atomic_utf8_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out" / "train.json"
    data.write_json(path, [row()])
    text = path.read_text(encoding="utf-8")
    assert "把这句话翻译成英文" in text and text.startswith('[\n  {\n    "instruction"')
    with pytest.raises(TypeError):
        data.write_json(path, [{"instruction": object()}])
    assert json.loads(path.read_text(encoding="utf-8")) == [row()]  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["train.json"]


# ---------------------------------------------------------------- real external data

@pytest.mark.parametrize("name", ["alpaca_zh_demo.json", "glaive_toolcall_zh_demo.json"])
def test_real_datasets_load_with_every_refused_row_explained(name):
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"{path} is absent (shared/datasets is not part of a user's clone)")
    total = len(json.loads(path.read_text(encoding="utf-8")))
    result = data.load_file(path)
    dropped = sum(n for k, n in result.counts.items() if k.startswith("dropped_"))
    assert result.counts["loaded"] == len(result.rows) > 0
    assert result.counts["loaded"] + dropped == total
    assert len(result.problems) == dropped  # one problem per refused row, none silent
    assert all(p.line > 0 for p in result.problems)
    if name.startswith("glaive"):
        assert all(p.field.endswith(".from") or p.field in ("tools", "row")
                   for p in result.problems)
        assert result.counts["dropped_unsupported"] >= 159  # rows with tool roles


def test_prepare_records_its_settings_and_a_changed_config_is_named(tmp_path):
    """quick_start.py regenerates data made with other settings: settings_changes says which."""
    from zhlora.config import load_config
    from zhlora.prepare import prepare, settings_changes

    cfg = load_config(None, ["data.num_samples=60", "data.tasks=[num2cn, digits]"])
    assert settings_changes(cfg, [], tmp_path) == [f"no {tmp_path / 'data_settings.json'}"]
    prepare(cfg, [], tmp_path)
    assert {row["task"] for row in json.loads((tmp_path / "chinese_instructions.json").read_text("utf-8"))} == {
        "num2cn", "digits"}  # data.tasks decides what is generated
    assert settings_changes(cfg, [], tmp_path) == []
    other = load_config(None, ["data.num_samples=80", "data.tasks=[num2cn, digits]"])
    changes = settings_changes(other, [], tmp_path)
    assert len(changes) == 1 and changes[0].startswith("num_samples: 60 in ") and changes[0].endswith("80 now")
