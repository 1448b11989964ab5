"""Load, check, mix and split instruction data; every refused row is reported, never lost.

    result = load_source("data/my_data.jsonl", columns={"question": "instruction"})
    train, val, test = split_rows(result.rows, val_ratio=0.05, test_ratio=0.05, seed=42)
    validate_paths(["data/"])          # prints PATH:LINE: FIELD: problem, returns 0 or 1

Formats (zhlora/readers.py): .json (an array of rows), .jsonl, .csv (header line), .parquet;
a folder (its supported files, sorted, recursive, hidden ones skipped); a Hugging Face id
`owner/name`. Each row is alpaca (`instruction`, `input`, `output`, optional `system`,
`history` = [[user, assistant], ...], `task`) or sharegpt (`conversations` or `messages`,
turns `{from, value}` or `{role, content}`, roles human/user, gpt/assistant, system).
`columns` renames the user's fields to ours first: {"question": "instruction"}.

A loaded row is always {"instruction", "input", "output", "task"} plus "system" and
"history" when not empty. Policies, each with its name in LoadResult.counts:
- dropped_not_object: a row that is not an object (a list, a number...).
- dropped_missing: no `instruction` or no `output` (and no conversation). A null value
  counts as absent (Parquet writes null for a column a row lacks); missing `input` is "".
- dropped_type: `instruction`, `input`, `output`, `system`, `task` not a string, or a
  malformed `history`/turn. Numbers are not coerced: 42 as an answer is likely a mistake.
- dropped_empty: whitespace-only instruction, output or turn.
- dropped_bad_turns: unknown role, system turn not first, turns not alternating
  user/assistant, or no final assistant reply. The first bad turn is named.
- dropped_unsupported: tool calling. A turn with role function_call, observation, tool or
  function is refused, and so is a non-empty `tools` list on a row that is otherwise fine:
  trained without the tool list the model would learn replies ("I can only search events")
  that its prompt does not explain. On an already refused row `tools` is not reported.
- dropped_duplicate: same system, history, instruction, input and output after NFKC and
  collapsing whitespace ("你好！" == "你好!"); the first one is kept, also across the
  files of a folder ("duplicate of line K" or "duplicate of PATH:K").
- cleaned_control: loaded rows from which C0 control characters (NUL, \\r, \\x1b...) other
  than \\n and \\t were stripped, or lone UTF-16 surrogates (half an emoji escaped as
  \\ud83d in JSON; UTF-8 cannot store one). Nothing else is changed: full-width and
  half-width punctuation stay as written, since both are normal in Chinese text.
- syntax_errors, encoding_errors, empty_files: the file, or the rest of it, was not read
  (a bad JSONL line or CSV record only costs that row). JSON nested deeper than Python
  reads (~1000 levels) is a syntax error; numbers of any length and cells of any size are
  read. validate_paths adds unreadable_sources for a path that raised DataError (missing
  file, unreadable folder, hub offline).
Other fields are ignored. Over-long rows are not dropped: see count_over_length.
"""
from __future__ import annotations

import errno
import random
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from zhlora import files, readers
from zhlora.errors import ZhloraError

TEXT_FIELDS = ("instruction", "input", "output", "system", "task")
KNOWN_FIELDS = (*TEXT_FIELDS, "history", "conversations", "messages", "tools")
_SUFFIXES = "/".join(readers.SUPPORTED_SUFFIXES)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class DataError(ZhloraError):
    """A source that cannot be read at all (missing file, bad path, hub offline)."""

    def __init__(self, reason: str, path=None):
        super().__init__(f"{path}: {reason}" if path is not None else reason)
        self.reason, self.path = reason, None if path is None else str(path)


@dataclass
class Problem:
    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"


@dataclass
class LoadResult:
    rows: list[dict] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


def load_file(path, columns: dict[str, str] | None = None, encoding: str = "utf-8",
              default_task: str = "user") -> LoadResult:
    """Read one file; bad rows become Problems. Raises DataError only if it cannot be read."""
    result = LoadResult()
    _load_into(result, Path(path), columns, encoding, default_task, seen={})
    return result


def load_source(spec: str, columns: dict[str, str] | None = None, encoding: str = "utf-8",
                default_task: str = "user") -> LoadResult:
    """A file, a folder, or a Hugging Face dataset id (the path part of a source spec)."""
    path = Path(spec)
    try:
        path.stat()
    except OSError as err:  # a name too long or a folder we may not enter raises, not False
        if err.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise DataError(path=spec, reason=f"cannot read: {err.strerror}") from err
    except ValueError:  # a NUL byte in the name; exists() below says False
        pass
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and p.suffix.lower() in readers.SUPPORTED_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(path=spec, reason=f"no {_SUFFIXES} file in this folder")
        result, seen = LoadResult(), {}  # one `seen`: duplicates across files are found too
        for file in files:
            _load_into(result, file, columns, encoding, default_task, seen)
        return result
    if path.exists() or not _HUB_ID.fullmatch(spec) or path.suffix in readers.SUPPORTED_SUFFIXES:
        return load_file(path, columns, encoding, default_task)
    return _load_hub(spec, columns, default_task)


def _load_hub(spec: str, columns, default_task: str) -> LoadResult:
    try:
        import datasets  # imported here: it takes seconds, and only hub ids need it
        dataset = datasets.load_dataset(spec, split="train")
    # The hub client raises many types (ConnectionError, OfflineModeIsEnabled,
    # DatasetNotFoundError, ImportError...); all mean the same thing to the user.
    except Exception as err:
        raise DataError(path=spec, reason="not a local file or folder, and loading it as a "
                        f"Hugging Face dataset failed ({type(err).__name__}: {err}). Offline, "
                        "the hub cannot be reached: download the data and pass the file.") from err
    result = LoadResult()
    _check_rows(result, spec, enumerate(dataset, start=1), columns, default_task, seen={})
    return result


def _load_into(result: LoadResult, path: Path, columns, encoding, default_task, seen) -> None:
    suffix = path.suffix.lower()
    if not path.exists():
        raise DataError(path=path, reason="no such file or folder")
    if suffix not in readers.SUPPORTED_SUFFIXES or path.is_dir():
        raise DataError(path=path, reason=f"not a {_SUFFIXES} file")
    if suffix == ".parquet":
        records, issues = readers.read_parquet(path)
    else:
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise DataError(path=path, reason=f"cannot read: {err.strerror}") from err
        text, issue = readers.decode(raw, encoding)
        records, issues = ([], [issue]) if issue else readers.TEXT_READERS[suffix](text)
    if not records and not issues:
        issues = [readers.Issue(0, "file", "no rows found", "empty_files")]
    first = len(result.problems)
    for issue in issues:
        result.problems.append(Problem(str(path), issue.line, issue.field, issue.message))
        result.counts[issue.counter] += 1
    _check_rows(result, str(path), records, columns, default_task, seen)
    # Parse issues and row problems interleave by line (a bad JSONL line 2 before row 5).
    result.problems[first:] = sorted(result.problems[first:], key=lambda p: p.line)


def _check_rows(result: LoadResult, path: str, records, columns, default_task, seen) -> None:
    """Apply the module's policies to (line, raw row) pairs; `seen` maps dedup key -> origin."""
    unknown = sorted(set((columns or {}).values()) - set(KNOWN_FIELDS))
    if unknown:
        raise DataError(path=path, reason=f"columns: unknown target field(s) {unknown}; "
                        f"known: {', '.join(KNOWN_FIELDS)}")
    for line, raw in records:
        try:
            row, cleaned = _canonical_row(raw, columns or {}, default_task)
        except readers.Refused as refusal:
            result.problems.append(Problem(path, line, refusal.field, refusal.message))
            result.counts[refusal.counter] += 1
            continue
        key = _dedup_key(row)
        if key in seen:
            first_path, first_line = seen[key]
            where = f"line {first_line}" if first_path == path else f"{first_path}:{first_line}"
            result.problems.append(Problem(path, line, "row", f"duplicate of {where}"))
            result.counts["dropped_duplicate"] += 1
            continue
        seen[key] = (path, line)
        result.rows.append(row)
        result.counts["loaded"] += 1
        if cleaned:
            result.counts["cleaned_control"] += 1


def _canonical_row(raw, columns: dict[str, str], default_task: str) -> tuple[dict, bool]:
    """One raw row -> (canonical row, whether control characters were stripped); may raise
    readers.Refused."""
    if not isinstance(raw, dict):
        raise readers.Refused("dropped_not_object", "row",
                              f"expected an object, got {readers.describe(raw)}")
    # A renamed column replaces a field of the target name: the user chose it explicitly.
    row = {k: v for k, v in raw.items() if k not in columns.values()}
    row.update({dst: raw[src] for src, dst in columns.items() if src in raw})
    row = {k: v for k, v in row.items() if v is not None}
    row, cleaned = readers.strip_controls({k: row[k] for k in row if k in KNOWN_FIELDS})
    if "instruction" not in row and ("conversations" in row or "messages" in row):
        canonical = readers.from_sharegpt(row)
    else:
        canonical = readers.from_alpaca(row)
    for name in ("instruction", "output"):
        if not canonical[name].strip():
            raise readers.Refused("dropped_empty", name, "empty (only whitespace)")
    if _has_tools(row.get("tools")):
        raise readers.Refused("dropped_unsupported", "tools", "tool definitions are present; "
                              "tool-calling conversations are not supported")
    task = row.get("task", "")
    if not isinstance(task, str):
        raise readers.Refused("dropped_type", "task",
                              f"expected a string, got {readers.describe(task)}")
    canonical["task"] = task.strip() or default_task
    return {k: v for k, v in canonical.items() if v or k in ("input", "task")}, cleaned


def _has_tools(tools) -> bool:
    if isinstance(tools, str):  # LLaMA-Factory stores the tool list as a JSON string
        return tools.strip() not in ("", "[]")
    return bool(tools)


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


def normalize_key(row: dict) -> str:
    """The prompt as split_rows compares it: NFKC, whitespace collapsed, instruction + input."""
    return _normalize(row["instruction"] + "\n" + row.get("input", ""))


def _dedup_key(row: dict) -> str:
    """Rows with different system prompts or histories are different samples, not duplicates."""
    texts = [row.get("system", ""), *(t for pair in row.get("history", []) for t in pair),
             row["instruction"], row.get("input", ""), row["output"]]
    # \x1f (unit separator) never survives loading (it is a C0 control), so fields cannot blur.
    return "\x1f".join(_normalize(text) for text in texts)




def count_over_length(rows: list[dict], max_chars: int) -> int:
    """Rows whose text (system, history, instruction, input, output) exceeds max_chars.

    Characters, not tokens: a cheap warning before tokenising (Chinese runs about 1-1.5
    characters per token with Qwen-style vocabularies).
    """
    return sum(_chars(row) > max_chars for row in rows)


def _chars(row: dict) -> int:
    history = sum(len(text) for pair in row.get("history", []) for text in pair)
    texts = (row.get(name, "") for name in ("system", "instruction", "input", "output"))
    return history + sum(len(text) for text in texts)


def parse_source_spec(spec: str) -> tuple[str, float | int | None]:
    """`path` -> (path, None); `path:0.5` -> a ratio in (0, 1]; `path:200` -> a row count.

    Only the text after the last ':' is a suffix, and only when `spec` itself is not an
    existing path, so POSIX paths holding ':' still load. `:1` is one row, `:1.0` all rows.
    """
    if ":" not in spec or Path(spec).exists():
        return spec, None
    path, suffix = spec.rsplit(":", 1)
    if not path:
        raise DataError(path=spec, reason="no path before the ':'")
    if re.fullmatch(r"\d+", suffix) and int(suffix) >= 1:
        return path, int(suffix)
    if re.fullmatch(r"\d*\.\d+|\d+\.", suffix) and 0 < float(suffix) <= 1:
        return path, float(suffix)
    raise DataError(path=spec, reason=f"bad suffix {suffix!r}: expected a ratio in (0, 1] "
                    "such as :0.5, or a row count of at least 1 such as :200")


def mix_sources(results: list[tuple[LoadResult, float | int | None]], seed: int) -> list[dict]:
    """Take each source's share of its rows (all, a ratio, or a count) and concatenate them.

    The rows taken are drawn with random.Random(seed) and keep their file order, so the same
    specs and seed always give the same list (split_rows shuffles later). A ratio keeps at
    least one row; a count larger than the source is an error, not a silent repeat.
    """
    rng = random.Random(seed)
    mixed = []
    for number, (result, amount) in enumerate(results, start=1):
        rows = result.rows
        if amount is None:
            take = len(rows)
        elif isinstance(amount, float):
            take = min(len(rows), max(1, round(amount * len(rows))))
        elif amount > len(rows):
            raise DataError(f"source {number} asks for {amount} rows but has only {len(rows)}")
        else:
            take = amount
        mixed.extend(rows[i] for i in sorted(rng.sample(range(len(rows)), take)))
    return mixed


def split_rows(rows: list[dict], val_ratio: float, test_ratio: float,
               seed: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Deterministic train/val/test split with no prompt shared across splits.

    Rows are grouped by normalize_key and a group goes whole to one split, so a val or test
    prompt is never one the model trained on. Within each task (the `task` of a group's
    first row) the groups are shuffled and the ratios count groups; a task with at least
    two groups gets at least one test group (three: also one val group), and always keeps
    one for training. A task with one group goes to train only.
    """
    if min(val_ratio, test_ratio) < 0 or val_ratio + test_ratio >= 1:
        raise ValueError(f"need val_ratio, test_ratio >= 0 with a sum < 1, "
                         f"got {val_ratio}, {test_ratio}")
    rng = random.Random(seed)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(normalize_key(row), []).append(row)
    by_task: dict[str, list[list[dict]]] = {}
    for group in groups.values():
        by_task.setdefault(group[0].get("task", ""), []).append(group)
    train, val, test = [], [], []
    for task in sorted(by_task):
        task_groups = by_task[task]
        rng.shuffle(task_groups)
        n = len(task_groups)
        n_test = min(n - 1, max(round(n * test_ratio), int(test_ratio > 0 and n >= 2)))
        n_val = min(n - 1 - n_test, max(round(n * val_ratio), int(val_ratio > 0 and n >= 3)))
        for i, group in enumerate(task_groups):
            (test if i < n_test else val if i < n_test + n_val else train).extend(group)
    for split in (train, val, test):
        rng.shuffle(split)
    return train, val, test


def write_json(path, rows: list[dict]) -> None:
    """Write rows as a UTF-8 JSON array, atomically (files.write_json); a disk that refuses is a DataError."""
    try:
        files.write_json(path, rows)
    except OSError as err:  # a read-only or full disk: one clear line, not a traceback
        raise DataError(path=path, reason=f"cannot write: {err.strerror}") from err


def validate_paths(paths: list[str], columns: dict[str, str] | None = None,
                   encoding: str = "utf-8", max_problems: int = 200,
                   max_chars: int | None = None, out=sys.stdout) -> int:
    """Print every problem as PATH:LINE: FIELD: problem, then a summary; 0 if none, else 1."""
    problems, counts, over = [], Counter(loaded=0), 0
    for path in paths:
        try:
            result = load_source(str(path), columns, encoding)
        except DataError as err:
            problems.append(Problem(str(path), 0, "file", err.reason))
            counts["unreadable_sources"] += 1
            continue
        problems += result.problems
        counts.update(result.counts)
        if max_chars is not None:
            over += count_over_length(result.rows, max_chars)
    for problem in problems[:max_problems]:
        print(problem, file=out)
    if len(problems) > max_problems:
        print(f"... and {len(problems) - max_problems} more problems", file=out)
    print(f"rows loaded: {counts.pop('loaded')}", file=out)
    for name, count in sorted(counts.items()):
        if count:
            print(f"  {name}: {count}", file=out)
    if max_chars is not None:
        print(f"  over {max_chars} characters: {over} (kept; counted, not dropped)", file=out)
    print(f"{len(problems)} problem(s)" if problems else "no problems", file=out)
    return 1 if problems else 0
