"""The formats behind zhlora.data: files into raw rows, and raw rows into one layout.

1. File formats. Each reader returns `(records, issues)`:
- `records`: `(line, row)` pairs, where `line` is where the row starts in the file
  (JSON array: the line of the row's opening brace; JSONL: the physical line; CSV: the
  first line of the record, which may span several lines; Parquet: the 1-based row number).
  A row is whatever the file holds there, not yet checked (data.py does that).
- `issues`: `Issue(line, field, message, counter)` for what could not be parsed; `counter`
  is the name data.LoadResult.counts uses for it.

Readers never raise for bad content; a file that cannot be opened is data.py's business.

2. Row layouts. from_alpaca and from_sharegpt turn a raw row into {instruction, input,
output, system, history}, or raise Refused naming the field at fault. The policies
(what is refused and why) are listed in data.py's docstring.
"""
from __future__ import annotations

import csv
import decimal
import io
import json
import re
from pathlib import Path
from typing import NamedTuple


class Issue(NamedTuple):
    line: int
    field: str
    message: str
    counter: str


def decode(raw: bytes, encoding: str) -> tuple[str | None, Issue | None]:
    """Decode file bytes; a leading BOM is dropped. On bad bytes, say where and what to try."""
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        message = (f"byte 0x{raw[err.start]:02x} at offset {err.start} is not valid {encoding}; "
                   f"the file was not read{_encoding_hint(raw, encoding)}")
        return None, Issue(line, "encoding", message, "encoding_errors")
    except LookupError:
        return None, Issue(0, "encoding", f"unknown encoding {encoding!r}", "encoding_errors")
    # A UTF-8 BOM decodes to U+FEFF (Excel and Notepad write one); it is not part of the data.
    return text.removeprefix("\ufeff"), None


def _encoding_hint(raw: bytes, encoding: str) -> str:
    """Chinese files saved by older Windows tools are usually GBK (a subset of GB18030)."""
    for candidate in ("utf-8", "gbk", "gb18030"):
        if candidate == encoding.lower():
            continue
        try:
            raw.decode(candidate)
        except UnicodeDecodeError:
            continue
        return f"; it decodes as {candidate.upper()}: try --encoding {candidate}"
    return ""


def _parse_int(text: str):
    """Python refuses to turn more than 4300 digits into an int (sys.set_int_max_str_digits,
    a guard against slow parsing), which json would raise mid-file as ValueError; a Decimal
    holds any length. Such a number is only ever an ignored extra field or "not a string"."""
    try:
        return int(text)
    except ValueError:
        return decimal.Decimal(text)


# strict=False lets raw tabs and newlines inside strings through (hand-edited files have
# them); the remaining control characters are stripped later by data.py.
_DECODER = json.JSONDecoder(strict=False, parse_int=_parse_int)
_TOO_DEEP = "nested too deeply to read (more levels than Python's recursion limit, ~1000)"


def read_json_array(text: str) -> tuple[list, list[Issue]]:
    """Read a JSON array one element at a time, so a syntax error keeps the rows before it.

    json.load would give all or nothing; raw_decode gives each element's end offset, from
    which we count newlines to know the exact line where every row starts.
    """
    decoder = _DECODER
    records: list = []
    pos = _skip_space(text, 0)
    if pos == len(text) or text[pos] != "[":
        found = "an empty file" if pos == len(text) else repr(text[pos])
        line = text.count("\n", 0, pos) + 1
        return [], [Issue(line, "json", f"expected a JSON array of rows ('['), found {found}",
                          "syntax_errors")]
    pos = _skip_space(text, pos + 1)
    if text.startswith("]", pos):
        return [], _after_array(text, pos)
    line, counted_to = 1, 0
    while True:
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            return records, [_syntax_issue(err)]
        except RecursionError:  # e.g. "[[[[..." 5000 deep; the C decoder unwinds cleanly
            return records, [Issue(line, "json", f"{_TOO_DEEP}; the rest of the file was not read",
                                   "syntax_errors")]
        records.append((line, row))
        pos = _skip_space(text, pos)
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            where = text.count("\n", 0, pos) + 1
            found = "the end of the file" if pos >= len(text) else repr(text[pos])
            return records, [Issue(where, "json", f"expected ',' or ']' after a row, found "
                                   f"{found}; the rest of the file was not read", "syntax_errors")]
        pos = _skip_space(text, pos + 1)
    return records, _after_array(text, pos)


def _after_array(text: str, end: int) -> list[Issue]:
    """Only whitespace may follow the array's closing ']' (at `end`)."""
    rest = _skip_space(text, end + 1)
    if rest < len(text):
        where = text.count("\n", 0, rest) + 1
        return [Issue(where, "json", "extra data after the closing ']'", "syntax_errors")]
    return []


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _syntax_issue(err: json.JSONDecodeError) -> Issue:
    return Issue(err.lineno, "json", f"{err.msg} (column {err.colno}); the rest of the file "
                 "was not read", "syntax_errors")


def read_jsonl(text: str) -> tuple[list, list[Issue]]:
    """One JSON value per line; a bad line is reported and the next lines are still read."""
    decoder = _DECODER
    records, issues = [], []
    # split("\n"), not splitlines(): the latter also breaks at U+2028 and other separators
    # that may sit inside a JSON string, which would shift every following line number.
    for line, content in enumerate(text.split("\n"), start=1):
        if not content.strip():
            continue
        try:
            records.append((line, decoder.decode(content)))
        except json.JSONDecodeError as err:
            issues.append(Issue(line, "json", f"{err.msg} (column {err.colno})", "syntax_errors"))
        except RecursionError:
            issues.append(Issue(line, "json", _TOO_DEEP, "syntax_errors"))
    return records, issues


def read_csv(text: str) -> tuple[list, list[Issue]]:
    """A header line of field names, then one record per row; quoted cells may hold newlines."""
    # The csv module refuses cells over 128 KiB ("field larger than field limit") and would
    # drop the rest of the file; a long answer is a valid row (see data.count_over_length).
    # The limit is process-wide; 2**31 - 1 fits a C long on every platform.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    # strict=True turns an unclosed quote into an error instead of swallowing the file.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records, issues = [], []
    try:
        header = next(reader, None)
        if header is None:
            return [], []
        next_start = reader.line_num + 1
        for cells in reader:
            start, next_start = next_start, reader.line_num + 1
            if not cells:  # a blank line between records
                continue
            if len(cells) != len(header):
                issues.append(Issue(start, "csv", f"record has {len(cells)} cells, the header "
                                    f"has {len(header)}", "syntax_errors"))
                continue
            records.append((start, dict(zip(header, cells))))
    except csv.Error as err:
        issues.append(Issue(reader.line_num, "csv", f"{err}; the rest of the file was not read",
                            "syntax_errors"))
    return records, issues


def read_parquet(path: Path) -> tuple[list, list[Issue]]:
    """Parquet rows as dicts; LINE is the 1-based row number (a binary file has no lines)."""
    # Imported here: pyarrow is large and only Parquet users need it.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        return [], [Issue(0, "parquet", f"not a readable Parquet file: {err}", "syntax_errors")]
    return list(enumerate(rows, start=1)), []


TEXT_READERS = {".json": read_json_array, ".jsonl": read_jsonl, ".csv": read_csv}
SUPPORTED_SUFFIXES = (*TEXT_READERS, ".parquet")


TOOL_ROLES = {"function_call", "observation", "tool", "function"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}
# C0 controls except \t (0x09) and \n (0x0a), and lone UTF-16 surrogates: JSON may spell half
# an emoji as "\ud83d", which Python reads but UTF-8 cannot write (train.json would fail).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\ud800-\udfff]")
_MAX_DEPTH = 3  # a valid row's strings sit at most 3 levels down: row -> conversations -> turn -> text


class Refused(Exception):
    """A row that zhlora will not train on; `counter` names the policy in LoadResult.counts."""

    def __init__(self, counter: str, field_name: str, message: str):
        super().__init__(message)
        self.counter, self.field, self.message = counter, field_name, message


def from_alpaca(row: dict) -> dict:
    """instruction, input, output, system?, history? -> the same, checked; input defaults to ""."""
    for name in ("instruction", "output"):
        if name not in row:
            raise Refused("dropped_missing", name, "missing (a row needs instruction and "
                          "output, or conversations/messages)")
    for name in ("instruction", "input", "output", "system"):
        if name in row and not isinstance(row[name], str):
            raise Refused("dropped_type", name, f"expected a string, got {describe(row[name])}")
    history = row.get("history", [])
    if not isinstance(history, list):
        raise Refused("dropped_type", "history", "expected a list of [user, assistant] "
                      f"pairs, got {describe(history)}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(text, str) for text in pair)):
            raise Refused("dropped_type", f"history[{i}]", "expected a [user, assistant] "
                          f"pair of strings, got {describe(pair)}")
        for j, text in enumerate(pair):
            if not text.strip():
                raise Refused("dropped_empty", f"history[{i}][{j}]", "empty (only whitespace)")
    return {"instruction": row["instruction"], "input": row.get("input", ""),
            "output": row["output"], "system": row.get("system", ""),
            "history": [list(pair) for pair in history]}


class _Turn(NamedTuple):
    role: str | None  # "user", "assistant", "system", or None for an unknown role
    raw_role: object  # as written, for messages
    text: object
    role_field: str  # e.g. "conversations[3].from", to name in a Problem
    text_field: str


def from_sharegpt(row: dict) -> dict:
    """system? (user assistant)+ -> the last pair is instruction/output, earlier ones history."""
    key = "conversations" if "conversations" in row else "messages"
    if not isinstance(row[key], list) or not row[key]:
        raise Refused("dropped_type", key,
                      f"expected a non-empty list of turns, got {describe(row[key])}")
    turns = []
    for i, turn in enumerate(row[key]):
        if not isinstance(turn, dict):
            raise Refused("dropped_type", f"{key}[{i}]",
                          f"expected an object, got {describe(turn)}")
        # Parquet gives every turn both key styles, one of them null.
        role_key = "from" if turn.get("from") is not None else "role"
        text_key = "value" if turn.get("value") is not None else "content"
        role, text = turn.get(role_key), turn.get(text_key)
        # Tool roles are looked for in every turn first, so a tool-calling conversation is
        # reported as such, not as the order error its extra turns also cause.
        if isinstance(role, str) and role in TOOL_ROLES:  # a list or dict role is not hashable
            raise Refused("dropped_unsupported", f"{key}[{i}].{role_key}", f"role {role!r}: "
                          "tool-calling conversations are not supported")
        turns.append(_Turn(ROLES.get(role) if isinstance(role, str) else None, role, text,
                           f"{key}[{i}].{role_key}", f"{key}[{i}].{text_key}"))
    for turn in turns:
        if turn.role is None:
            raise Refused("dropped_bad_turns", turn.role_field, f"unknown role {turn.raw_role!r};"
                          " expected human/user, gpt/assistant or system")
        if not isinstance(turn.text, str):
            raise Refused("dropped_type", turn.text_field,
                          f"expected a string, got {describe(turn.text)}")
        if not turn.text.strip():
            raise Refused("dropped_empty", turn.text_field, "empty (only whitespace)")
    system = turns[0].text if turns[0].role == "system" else ""
    dialogue = turns[1:] if system else turns
    for i, turn in enumerate(dialogue):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            where = "only allowed as the first turn" if turn.role == "system" else "out of order"
            raise Refused("dropped_bad_turns", turn.role_field, f"{turn.raw_role!r} is {where}: "
                          f"turns must alternate user/assistant, expected a {expected} turn")
    if not dialogue or len(dialogue) % 2:
        raise Refused("dropped_bad_turns", turns[-1].role_field, "the conversation must end "
                      "with an assistant reply to a user turn")
    pairs = [[dialogue[i].text, dialogue[i + 1].text] for i in range(0, len(dialogue), 2)]
    return {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1],
            "system": system, "history": pairs[:-1]}


def strip_controls(value, depth: int = 0):
    """Strip C0 controls and lone surrogates from every string in value, down to the depth a
    valid row has (anything deeper is refused later by a type check, and recursing into a
    1000-deep list would overflow the stack); returns (clean value, whether changed)."""
    if isinstance(value, str):
        clean = _CONTROL.sub("", value)
        return clean, clean != value
    if isinstance(value, (list, dict)) and depth < _MAX_DEPTH:
        items = value.items() if isinstance(value, dict) else enumerate(value)
        cleaned = {k: strip_controls(v, depth + 1) for k, v in items}
        changed = any(flag for _, flag in cleaned.values())
        if isinstance(value, dict):
            return {k: v for k, (v, _) in cleaned.items()}, changed
        return [v for v, _ in cleaned.values()], changed
    return value, False


def describe(value) -> str:
    """A value's type and its start, for messages: `int 42`, `list ["a", "b"]`."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (RecursionError, ValueError):  # nested ~1000 deep, or an int too long for str()
        text = "(nested too deeply to show)"
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"
