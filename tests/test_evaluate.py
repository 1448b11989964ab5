"""Smoke tests of the evaluation stage on the tiny LoRA run (tests/conftest.py): the two
files and their schema, the baseline, batching, train/eval prompt identity, the refusal
of the train file, and the CLI.

    python -m pytest tests/test_evaluate.py -q
"""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_overrides
from zhlora import metrics
from zhlora.config import ConfigError, load_config
from zhlora.cli import main as cli_main
from zhlora.evaluate import evaluate_run
from zhlora.metrics import DELTA_METRICS
from zhlora.generation import decoding_settings
from zhlora.formatting import IGNORE_INDEX, encode_prompt, encode_sample

TOP_LEVEL = [*metrics.HEADLINE, "test_loss", "perplexity", "num_samples", "ci", "per_task", "num_generated",
             "prompts_truncated", "unscored", "forced_vs_generated", "baseline", "delta", "delta_ci", "config", "versions", "settings", "definitions", "seconds"]
PREDICTION_KEYS = ["instruction", "input", "task", "prompt", "reference", "prediction", "baseline_prediction",
                   "finished", "exact_match", "generated_exact_match", "similarity", "rouge_l", "bleu_4",
                   "loss", "loss_tokens", "generation_time"]
FAST = dict(max_samples=6, max_new_tokens=12)  # 12 test rows in the tiny split; 12 tokens keep it quick


def copy_run(src, dst):
    """Evaluation writes into the run folder: work on a copy, so the shared fixture stays pristine."""
    shutil.copytree(src, dst)
    return dst


def strict_json(text: str):
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not valid JSON"))


def read_predictions(run):
    return [strict_json(line) for line in (run / "predictions.jsonl").read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def evaluated(tiny_run_dir, tmp_path_factory):
    run = copy_run(tiny_run_dir, tmp_path_factory.mktemp("eval") / "run")
    return run, evaluate_run(run, batch_size=4, **FAST)


def test_writes_results_with_every_documented_key(evaluated):
    run, returned = evaluated
    results = strict_json((run / "evaluation_results.json").read_text("utf-8"))
    assert list(results) == TOP_LEVEL
    assert results["num_samples"] == FAST["max_samples"]
    assert set(results["baseline"]) >= {*metrics.HEADLINE, "test_loss", "perplexity", "ci", "per_task"}
    for key in DELTA_METRICS:
        assert results["delta"][key] == pytest.approx(results[key] - results["baseline"][key])
    assert set(results["ci"]) == set(metrics.CI_METRICS)
    for key, interval in results["ci"].items():
        if interval is not None:
            assert interval[0] <= results[key] <= interval[1], key
    assert sum(row["n"] for row in results["per_task"].values()) == FAST["max_samples"]
    assert results["perplexity"] == pytest.approx(math.exp(results["test_loss"]))
    assert results["definitions"] == metrics.DEFINITIONS
    assert results["settings"] == {"batch_size": 4, "max_new_tokens": 12, "decoding": "greedy", "refill": True,
                                   "generation_config": decoding_settings(),
                                   "test_data": results["config"]["data"]["test_file"], "max_samples": 6,
                                   "generate_samples": None, "device": "cpu"}
    assert set(results["versions"]) == {"python", "torch", "transformers", "peft", "zhlora"}
    assert results["config"]["lora"]["target_modules"] == ["all-linear"]  # the run's own config
    assert not list(run.glob(".evaluation_results.json.*"))  # no temp file left behind

    rows = read_predictions(run)
    test_rows = json.loads(open(results["settings"]["test_data"], encoding="utf-8").read())[:6]
    assert [r["reference"] for r in rows] == [t["output"] for t in test_rows]  # file order
    for row in rows:
        assert list(row) == PREDICTION_KEYS
        assert (row["exact_match"] is None) == (row["task"] not in metrics.CHECKABLE_TASKS)
        assert row["prompt"].endswith("<|im_start|>assistant\n")


def test_test_loss_is_the_token_mean_over_answers(evaluated, tiny_run_dir):
    """Batched, padded test loss == the per-row, unpadded sum over supervised tokens."""
    from zhlora.generation import load_run

    run, results = evaluated
    model, tokenizer, cfg = load_run(tiny_run_dir, "cpu")
    rows = json.loads(open(results["settings"]["test_data"], encoding="utf-8").read())[:6]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            sample = encode_sample(row, tokenizer, cfg.model.template, cfg.data.max_length)
            logits = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(sample["labels"][1:])
            total += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
            tokens += int((labels != IGNORE_INDEX).sum())
    assert results["test_loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert results["test_loss"] < results["baseline"]["test_loss"]  # 30 LoRA steps already help


def test_no_baseline_and_one_by_one_equals_batched(evaluated, tmp_path):
    batched_run, _ = evaluated
    run = copy_run(batched_run, tmp_path / "run")
    results = evaluate_run(run, batch_size=1, baseline=False, **FAST)
    assert "baseline" not in results and "delta" not in results
    one_by_one = read_predictions(run)
    assert all("baseline_prediction" not in row for row in one_by_one)
    # greedy decoding: left padding and batching must not change a single answer
    assert [r["prediction"] for r in one_by_one] == [r["prediction"] for r in read_predictions(batched_run)]


@pytest.mark.parametrize("template", ["auto", "alpaca"])
def test_eval_prompt_is_the_training_prompt(tiny_tokenizer, tiny_data_dir, template):
    rows = json.loads((tiny_data_dir / "test.json").read_text("utf-8"))
    for row in rows:
        sample = encode_sample(row, tiny_tokenizer, template)
        masked = next(k for k, label in enumerate(sample["labels"]) if label != IGNORE_INDEX)
        assert encode_prompt(row, tiny_tokenizer, template) == sample["input_ids"][:masked]


def test_train_file_is_refused(tiny_run_dir, tmp_path, capsys):
    train_file = load_config(tiny_run_dir / "config.yaml").data.train_file
    with pytest.raises(ConfigError, match="training file"):
        evaluate_run(tiny_run_dir, test_data=train_file)
    copy = tmp_path / "renamed.json"  # a copy under another name is still the train file
    shutil.copy(train_file, copy)
    assert cli_main(["evaluate", "--model_path", str(tiny_run_dir), "--test_data", str(copy)]) == 2
    assert "training file" in capsys.readouterr().err
    assert not (tiny_run_dir / "evaluation_results.json").exists()


def test_cli_evaluate(tiny_run_dir, tmp_path, capsys):
    from zhlora.cli import main as zhlora

    run = copy_run(tiny_run_dir, tmp_path / "run")
    assert zhlora(["evaluate", "--model_path", str(run), "--max_samples", "4", "--max_new_tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "exact_match" in out and "95% CI" in out and "exact match by task" in out
    assert strict_json((run / "evaluation_results.json").read_text("utf-8"))["num_samples"] == 4
    assert zhlora(["evaluate", "--model_path", str(tmp_path / "missing")]) == 2


def test_full_fine_tune_loads_the_base_for_its_baseline(tiny_model_dir, tiny_data_dir, tmp_path):
    from zhlora.train import train

    run = tmp_path / "full"
    train(load_config(None, tiny_overrides(tiny_model_dir, tiny_data_dir, run, "training.method=full",
                                           "training.max_steps=2", "training.learning_rate=1e-3")))
    results = evaluate_run(run, max_samples=2, max_new_tokens=4)
    assert results["config"]["model"]["name"] == str(tiny_model_dir)  # the base, not the run folder
    assert results["baseline"]["test_loss"] != results["test_loss"]
    assert len(read_predictions(run)) == 2


# --- task adapters: several runs' adapters in one model, each scored on its own data.tasks ---

TASKS_A, TASKS_B = ["num2cn", "s2t"], ["sort", "unit"]  # one test row per task in the tiny split


@pytest.fixture(scope="module")
def task_runs(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """Two LoRA runs on different task families (8 steps each), with different r and targets."""
    from zhlora.train import train

    root = tmp_path_factory.mktemp("task_adapters")
    for name, tasks, extra in [("run_a", TASKS_A, "lora.r=4"), ("run_b", TASKS_B, "lora.target_modules=all-linear")]:
        train(load_config(None, tiny_overrides(tiny_model_dir, tiny_data_dir, root / name, "training.max_steps=8",
                                               f"data.tasks=[{','.join(tasks)}]", extra)))
    return root / "run_a", root / "run_b"


def test_switching_adapters_changes_logits_and_switching_back_restores_them(task_runs):
    from zhlora.serving.adapters import load_adapters

    run_a, run_b = task_runs  # names that are not substrings of "lora_" (PEFT warns about those)
    model, tokenizer, _ = load_adapters([("num", run_a), ("sort", run_b)], device="cpu")
    ids = tokenizer("请用汉字写出下面这个数：4096", return_tensors="pt").input_ids

    def logits(name: str | None):
        with torch.no_grad():
            if name is None:
                with model.disable_adapter():
                    return model(ids).logits
            model.set_adapter(name)
            return model(ids).logits

    a, b, base = logits("num"), logits("sort"), logits(None)
    assert not torch.allclose(a, b) and not torch.allclose(a, base) and not torch.allclose(b, base)
    assert torch.equal(logits("num"), a) and torch.equal(logits("sort"), b)  # back and forth: bit for bit


def test_each_adapter_is_scored_on_its_own_tasks(task_runs, tiny_run_dir, tmp_path, capsys):
    from zhlora.evaluate import evaluate_adapters

    run_a, run_b = task_runs
    # "num2" is run_a again: same rows, so its baseline is not scored a second time;
    # tiny_run_dir (a bare path, named after its folder) was trained on every task
    adapters = [("num", run_a), ("b", run_b), ("num2", run_a), (tiny_run_dir.name, tiny_run_dir)]
    out = tmp_path / "adapters_eval"
    results = evaluate_adapters(adapters, out, max_new_tokens=8, batch_size=4)
    assert capsys.readouterr().out.count("[evaluate] baseline") == 3

    saved = strict_json((out / "evaluation_results.json").read_text("utf-8"))
    assert saved == json.loads(json.dumps(results))
    assert list(saved["adapters"]) == ["num", "b", "num2", "outputs"]
    assert saved["base_model"] == str(load_config(run_a / "config.yaml").model.name)
    by_name = saved["adapters"]
    assert set(by_name["num"]["per_task"]) == set(by_name["num"]["baseline"]["per_task"]) == set(TASKS_A)
    assert set(by_name["b"]["per_task"]) == set(TASKS_B)
    assert by_name["num"]["tasks"] == TASKS_A and by_name["outputs"]["tasks"] == []
    every_row = len(json.loads(open(by_name["outputs"]["test_data"], encoding="utf-8").read()))
    assert by_name["outputs"]["num_samples"] == every_row  # an empty data.tasks: every test row
    for row in by_name.values():
        assert set(row) >= {"path", "tasks", "test_data", *DELTA_METRICS, "per_task", "baseline", "delta", "config"}
        assert row["config"]["data"]["tasks"] == row["tasks"]

    rows = read_predictions(out)
    assert [r["adapter"] for r in rows] == ["num"] * 2 + ["b"] * 2 + ["num2"] * 2 + ["outputs"] * every_row
    assert all(r["task"] in TASKS_A for r in rows if r["adapter"] == "num")
    assert all(r["task"] in TASKS_B for r in rows if r["adapter"] == "b")
    assert [r["prediction"] for r in rows if r["adapter"] == "num"] == [r["prediction"] for r in rows
                                                                        if r["adapter"] == "num2"]

    # switching adapters in one model answers exactly as each run loaded alone
    alone = evaluate_run(copy_run(run_b, tmp_path / "b_alone"), max_new_tokens=8, batch_size=4, baseline=False)
    assert [r["prediction"] for r in read_predictions(tmp_path / "b_alone")] == [
        r["prediction"] for r in rows if r["adapter"] == "b"]
    assert by_name["b"]["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-5)
    assert by_name["b"]["per_task"] == alone["per_task"]


def test_cli_adapters_repeated_flag_and_bare_paths(task_runs, tmp_path, capsys):
    from zhlora.cli import main as zhlora

    run_a, run_b = task_runs
    out = tmp_path / "out"
    assert zhlora(["evaluate", "--adapters", f"num={run_a}", "--adapters", f"run_b={run_b}", "--output_dir", str(out),
                   "--no_baseline", "--max_new_tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "exact match by task" in printed and "num2cn, s2t" in printed
    results = strict_json((out / "evaluation_results.json").read_text("utf-8"))
    assert list(results["adapters"]) == ["num", "run_b"]
    assert "baseline" not in results["adapters"]["num"]
    assert not (run_a / "evaluation_results.json").exists()  # the runs themselves stay untouched


def test_adapters_on_different_base_models_are_refused(task_runs, tmp_path, capsys):
    from zhlora.cli import main as zhlora
    from zhlora.evaluate import evaluate_adapters
    from zhlora.safety import AdapterError

    run_a, run_b = task_runs
    other = copy_run(run_b, tmp_path / "other")
    ours = str(load_config(run_b / "config.yaml").model.name)
    config = other / "config.yaml"
    config.write_text(config.read_text("utf-8").replace(ours, "/models/qwen2.5-0.5b-instruct"), "utf-8")
    with pytest.raises(AdapterError, match="must share one base model") as err:
        evaluate_adapters([("num", run_a), ("other", other)], tmp_path / "out")
    assert ours in str(err.value) and "/models/qwen2.5-0.5b-instruct" in str(err.value)
    assert zhlora(["evaluate", "--adapters", f"num={run_a},other={other}", "--output_dir", str(tmp_path / "o")]) == 2
    assert "qwen2.5-0.5b-instruct" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("values, expected", [
    (["math=runs/math,zh=runs/zh"], [("math", "runs/math"), ("zh", "runs/zh")]),
    (["math=runs/math", "code_zh=runs/code_zh/"], [("math", "runs/math"), ("code_zh", "runs/code_zh")]),
    ([" b = x , "], [("b", "x")]),
])
def test_parse_adapters(values, expected):
    from pathlib import Path

    from zhlora.serving.adapters import parse_adapters

    assert parse_adapters(values) == [(name, Path(path)) for name, path in expected]


@pytest.mark.parametrize("values, message", [
    (["b=x,b=y"], "given twice"), (["b=runs/b", "b=other/b"], "given twice"), (["bad name=x"], "write name=path"),
    (["b="], "write name=path"), ([","], "no adapter given"),
    (["a=x"], "part of PEFT's parameter prefix 'lora_'"), (["lora=runs/lora"], "part of PEFT's parameter prefix"),
])
def test_parse_adapters_refusals(values, message):
    from zhlora.serving.adapters import parse_adapters

    with pytest.raises(ConfigError, match=message):
        parse_adapters(values)


@pytest.mark.parametrize("argv, message", [
    (["--model_path", "outputs", "--adapters", "b=x"], "not both"),
    (["--output_dir", "somewhere"], "--output_dir is for --adapters"),
    (["--adapters", "b=missing_run"], "config.yaml not found"),
])
def test_adapters_usage_errors(argv, message, capsys):
    assert cli_main(["evaluate", *argv]) == 2
    assert message in capsys.readouterr().err


def test_table_columns_stay_apart_for_huge_values(capsys):
    from zhlora.evaluate_tables import print_table

    results = {key: 1.0 for key in DELTA_METRICS}
    results.update(perplexity=43.56, ci={}, per_task={})
    results["baseline"] = {**results, "perplexity": 350269.9263}
    results["delta"] = {"perplexity": -350226.3663}
    print_table(results)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("perplexity"))
    assert row.split()[:4] == ["perplexity", "43.5600", "350269.9", "-350226.4"]


def test_forced_argmax_follows_greedy_generation(tiny_run_dir):
    """The teacher-forced check: on a reference that is greedy's own output, every answer token is
    the argmax; the stop position is a hit exactly when greedy would stop there."""
    from zhlora.generation import generate, load_run
    from zhlora.teacher_forcing import forced_argmax

    model, tokenizer, cfg = load_run(tiny_run_dir, "cpu")
    rows = json.loads(open(cfg.data.test_file, encoding="utf-8").read())[:8]
    prompts = [encode_prompt(row, tokenizer, cfg.model.template) for row in rows]
    six = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    checked = 0
    for row, prompt, g in zip(rows, prompts, six):
        ids = g.token_ids[:5]
        reference = tokenizer.decode(ids)
        if tokenizer(reference, add_special_tokens=False)["input_ids"] != ids:
            continue  # this reference would not tokenize back to greedy's ids
        sample = encode_sample({**row, "output": reference}, tokenizer, cfg.model.template, cfg.data.max_length)
        (targets, hits, _), = forced_argmax(model, tokenizer, [sample], 4)[0].values()
        assert targets[:5] == ids and all(hits[:5])
        assert hits[5] == (len(g.token_ids) == 6 and g.token_ids[5] == targets[5])  # the stop token
        checked += 1
    assert checked >= 2


def test_a_rows_forced_scores_do_not_depend_on_its_batch(tiny_run_dir):
    """Rows are batched in length order: whatever a row is padded with, its hits and loss are its own
    (fp32 here; under bf16 autocast only rounding may differ)."""
    from zhlora.generation import load_run
    from zhlora.teacher_forcing import autocast, forced_argmax

    model, tokenizer, cfg = load_run(tiny_run_dir, "cpu")
    rows = json.loads(open(cfg.data.test_file, encoding="utf-8").read())[:10]
    samples = [encode_sample(row, tokenizer, cfg.model.template, cfg.data.max_length) for row in rows]
    alone = {i: forced_argmax(model, tokenizer, [s], 1)[0][0] for i, s in enumerate(samples)}
    together, loss_sum, tokens = forced_argmax(model, tokenizer, samples, 4)
    assert together.keys() == alone.keys() and tokens == sum(len(t) for t, _, _ in alone.values())
    for i, (targets, hits, loss) in together.items():
        assert (targets, hits) == alone[i][:2] and loss == pytest.approx(alone[i][2], rel=1e-4)
    assert loss_sum == pytest.approx(sum(loss for _, _, loss in alone.values()), rel=1e-4)
    assert not isinstance(autocast(model, "fp16"), torch.autocast)  # fp16 on a CPU: never
    assert isinstance(autocast(model, "bf16"), torch.autocast) and not isinstance(autocast(model, "no"), torch.autocast)


def test_row_losses_add_up_to_the_test_loss(evaluated):
    """Each predictions.jsonl row carries its own loss, so a part of the test rows (one task, one
    source: experiment groups) has its own; weighted by tokens they give back the test loss."""
    run, results = evaluated
    lines = [json.loads(line) for line in (run / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    scored = [line for line in lines if line["loss"] is not None]
    assert scored and all(line["loss_tokens"] > 0 for line in scored)
    tokens = sum(line["loss_tokens"] for line in scored)
    assert sum(line["loss"] * line["loss_tokens"] for line in scored) / tokens == pytest.approx(results["test_loss"])
    # and each loss is its own row's: the last row scored alone gives the loss written beside it
    from zhlora.generation import load_run
    from zhlora.teacher_forcing import forced_argmax

    model, tokenizer, cfg = load_run(run, "cpu")
    row = next(r for r in reversed(lines) if r["loss"] is not None)
    sample = encode_sample(row | {"output": row["reference"]}, tokenizer, cfg.model.template, cfg.data.max_length)
    (targets, _, loss_sum), = forced_argmax(model, tokenizer, [sample], 1)[0].values()
    assert (len(targets), loss_sum / len(targets)) == (row["loss_tokens"], pytest.approx(row["loss"], rel=1e-4))


def test_teacher_forced_exact_match_agrees_with_generation(evaluated):
    run, results = evaluated
    agree = results["forced_vs_generated"]
    assert agree["rows"] == sum(row["task"] in metrics.CHECKABLE_TASKS and row["task"] != "self_cognition"
                                for row in read_predictions(run))
    assert agree["agree"] == agree["rows"]
    assert results["num_generated"] == FAST["max_samples"]


def test_generate_samples_scores_the_rest_by_teacher_forcing(evaluated, tmp_path):
    batched_run, full = evaluated
    run = copy_run(batched_run, tmp_path / "run")
    results = evaluate_run(run, batch_size=4, baseline=False, generate_samples=2, **FAST)
    rows = read_predictions(run)
    generated = [row for row in rows if row["prediction"] is not None]
    assert results["num_generated"] == len(generated) == 2 + sum(row["task"] == "self_cognition" for row in rows[2:])
    # exact match and test loss come from the forward pass over every row: unchanged by generating fewer
    assert results["exact_match"] == full["exact_match"] and results["test_loss"] == pytest.approx(full["test_loss"])
    assert [row["exact_match"] for row in rows] == [row["exact_match"] for row in read_predictions(batched_run)]
