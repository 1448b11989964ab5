"""Experiments on the tiny model: a 2 x 2 grid x 2 seeds end to end, resume without redoing
work, a re-run of only a missing evaluation, the base-model mode, and every shipped YAML."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from zhlora import experiment
from zhlora.config import ConfigError
from zhlora.experiment import load_experiment, run_experiment, slug
from zhlora.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT_YAMLS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
QUICK = {"max_samples": 4, "max_new_tokens": 8, "batch_size": 4, "baseline": False}


def write_experiment(folder: Path, model_dir: Path, data_dir: Path, **spec) -> Path:
    """An experiment YAML pointing at the tiny model and data (no base_config: zhlora's defaults)."""
    overrides = [f"model.name={model_dir}", f"data.train_file={data_dir / 'train.json'}",
                 f"data.val_file={folder / 'no_val.json'}",  # no validation pass: faster, not under test here
                 f"data.test_file={data_dir / 'test.json'}", "training.max_steps=3", "training.batch_size=2",
                 "training.logging_steps=1"]
    spec = {"overrides": overrides, "seeds": [1, 2], "evaluate": QUICK, **spec}
    path = folder / "tiny_sweep.yaml"
    path.write_text("# zhlora experiment tiny_sweep.yaml\n" + yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """A finished 2 x 2 grid (lora.r x learning rate) with 2 seeds: 8 runs of 3 steps."""
    folder = tmp_path_factory.mktemp("sweep")
    path = write_experiment(folder, tiny_model_dir, tiny_data_dir,
                            grid={"lora.r": [2, 4], "training.learning_rate": [1e-2, 5e-3]},
                            groups={"every": sorted(TASKS)})
    out = folder / "runs"
    rows = run_experiment(path, out)
    return path, out, rows


def mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_grid_runs_every_point_and_seed_and_summarises(sweep):
    _, out, rows = sweep
    with open(out / "results.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["point"] for r in table] == ["r=2_learning_rate=0.01", "r=2_learning_rate=0.005",
                                           "r=4_learning_rate=0.01", "r=4_learning_rate=0.005"]
    for row in table:
        assert row["seeds"] == "2" and row["lora.r"] in ("2", "4")
        for name in experiment.QUALITY:
            assert f"{name}_mean" in row and f"{name}_std" in row
        assert row["test_loss_std"] != "" and float(row["test_loss_mean"]) > 0  # two seeds: a spread
        assert int(row["trainable_params"]) > 0
        # two seeds are fewer than the 3 timed runs a time or memory figure needs: left empty
        assert row["peak_memory_mb"] == row["supervised_tokens_per_s"] == "" and int(row["timed_runs"]) <= 2
    # r=4 trains twice the parameters of r=2 (each is r * (in + out) per adapted layer)
    assert int(table[2]["trainable_params"]) == 2 * int(table[0]["trainable_params"])
    for point in ("r=2_learning_rate=0.01", "r=4_learning_rate=0.005"):
        for seed in (1, 2):
            run = out / point / f"seed{seed}"
            assert (run / "train_summary.json").is_file() and (run / "evaluation_results.json").is_file()
            assert f"seed: {seed}" in (run / "config.yaml").read_text()
    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert markdown.count("\n| r=") == 4 and " ± " in markdown
    assert (out / "quality_vs_r.png").is_file() and (out / "quality_vs_learning_rate.png").is_file()
    assert "quality_vs_r.png" in markdown
    compared = json.loads((out / "comparisons.json").read_text(encoding="utf-8"))
    assert compared["reference"] == "r=2_learning_rate=0.01" and compared["seeds"] == [1, 2]
    assert sorted(compared["points"]) == sorted(r["point"] for r in table[1:])
    for result in compared["points"].values():
        assert result["exact_match"]["paired_by"] == "row" and result["test_loss"]["seeds"] == 2
        assert result["test_loss"]["verdict"] in ("higher", "lower", "same")
    # a group of every task scores what the whole test split scores: its loss is the test loss
    for row in table:
        assert float(row["test_loss@every_mean"]) == pytest.approx(float(row["test_loss_mean"]))
    assert "test_loss@every" in markdown
    assert compared["groups"]["every"]["points"].keys() == compared["points"].keys()


def test_second_run_redoes_nothing(sweep, monkeypatch):
    path, out, _ = sweep
    before = mtimes(out)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")

    monkeypatch.setattr("zhlora.train.train", must_not_run)
    monkeypatch.setattr("zhlora.evaluate.evaluate_run", must_not_run)
    run_experiment(path, out)
    assert mtimes(out) == before


def test_missing_evaluation_reruns_only_that_evaluation(sweep, monkeypatch):
    from zhlora import evaluate

    path, out, _ = sweep
    run = out / "r=4_learning_rate=0.01" / "seed2"
    (run / "evaluation_results.json").unlink()
    summary = (run / "train_summary.json").stat().st_mtime_ns
    evaluated = []
    real = evaluate.evaluate_run

    def counting(folder, **kwargs):
        evaluated.append(Path(folder))
        return real(folder, **kwargs)

    monkeypatch.setattr("zhlora.train.train", lambda cfg: pytest.fail("training ran again"))
    monkeypatch.setattr(evaluate, "evaluate_run", counting)
    run_experiment(path, out)
    assert evaluated == [run]
    assert (run / "evaluation_results.json").is_file()
    assert (run / "train_summary.json").stat().st_mtime_ns == summary


def test_changed_experiment_is_refused_not_mixed_in(sweep, tmp_path):
    path, out, _ = sweep
    spec = yaml.safe_load(path.read_text())
    spec["overrides"] = [o.replace("training.max_steps=3", "training.max_steps=4") for o in spec["overrides"]]
    changed = tmp_path / "tiny_sweep.yaml"
    changed.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="other values of training.max_steps"):
        run_experiment(changed, out)


def test_baseline_only_scores_exactly_the_base_model(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    from zhlora.config import load_config
    from zhlora.evaluate import read_test_rows, score_model
    from zhlora.generation import load_base

    path = write_experiment(tmp_path, tiny_model_dir, tiny_data_dir, baseline_only=True)
    monkeypatch.setattr("zhlora.train.train", lambda cfg: pytest.fail("baseline_only trained"))
    rows = run_experiment(path, tmp_path / "runs")
    assert len(rows) == 1 and rows[0]["seeds"] == 1  # one seed: greedy decoding needs no other
    cfg = load_config(tmp_path / "runs" / "base_config" / "seed1" / "config.yaml")
    model, tokenizer = load_base(cfg)
    test_rows = read_test_rows(Path(cfg.data.test_file), cfg, QUICK["max_samples"])
    direct = score_model(model, tokenizer, test_rows, cfg, QUICK["batch_size"], QUICK["max_new_tokens"])[3]
    for name in ("avg_similarity", "success_rate", "test_loss"):
        assert rows[0][f"{name}_mean"] == pytest.approx(direct[name], abs=1e-6)


def test_killed_training_resumes_from_its_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path):
    path = write_experiment(tmp_path, tiny_model_dir, tiny_data_dir, grid={"lora.r": [2]})
    exp = load_experiment(path)
    point = exp.points()[0]
    folder = tmp_path / "runs" / slug(point) / "seed1"
    assert experiment.point_config(exp, point, 1, folder).training.resume == "false"
    (folder / "checkpoints").mkdir(parents=True)  # what a killed train() leaves (test_train tests the resume)
    assert experiment.point_config(exp, point, 1, folder).training.resume == "true"


def test_command_line_overrides_and_errors(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from zhlora.cli import main

    path = write_experiment(tmp_path, tiny_model_dir, tiny_data_dir, grid={"lora.r": [2]})
    exp = load_experiment(path, ["lora.lora_dropout=0.1", "evaluate.max_samples=2"])
    assert "lora.lora_dropout=0.1" in exp.overrides and exp.evaluate["max_samples"] == 2
    assert main(["experiment", str(path), "--output_dir", str(tmp_path / "runs"), "lora.rank=3"]) == 2
    assert "did you mean lora.r?" in capsys.readouterr().err


def test_train_samples_writes_a_nested_subset(tiny_model_dir, tiny_data_dir, tmp_path):
    import json

    path = write_experiment(tmp_path, tiny_model_dir, tiny_data_dir, grid={"train_samples": [8, 16]})
    exp = load_experiment(path)
    source = json.loads((tiny_data_dir / "train.json").read_text(encoding="utf-8"))
    for point in exp.points():
        target = tmp_path / "runs" / slug(point) / "train.json"
        cfg = experiment.point_config(exp, point, 1, target.parent / "seed1")
        assert Path(cfg.data.train_file) == target
        experiment.write_train_subset(str(tiny_data_dir / "train.json"), point["train_samples"], target)
        assert json.loads(target.read_text(encoding="utf-8")) == source[:point["train_samples"]]


@pytest.mark.parametrize("spec, message", [
    ({"gird": {}}, "gird: unknown key; did you mean grid?"),
    ({"grid": {"lora.rank": [4]}}, "lora.rank: unknown key; did you mean lora.r?"),
    ({"grid": {"lora.r": 4}}, "a non-empty list per key"),
    ({"grid": {"data.num_samples": [100, 200]}}, "vary train_samples"),
    ({"grid": {"lr": [1e-3]}}, "lr: not a config key"),
    ({"grid": {"lora.r": [4, 8]}, "overrides": ["lora.r=16"]}, "lora.r is varied by the grid"),
    ({"overrides": ["output.dir=elsewhere"]}, "use --output_dir"),
    ({"overrides": ["training.seed=3"]}, "list them in seeds"),
    ({"evaluate": {"max_sample": 4}}, "max_sample: unknown key"),
    ({"base_config": "configs/missing.yaml"}, "no such file"),
    ({"groups": {"generated": "num2cn"}}, "groups: write name: [task, task, ...]"),
    ({"grid": {"lora.r": [4, 8]}, "reference": {"lora.r": 16}}, "must pick exactly one grid point (it picks 0"),
])
def test_bad_experiments_are_named(spec, message, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert message in str(err.value)


def test_slug_names_a_folder():
    assert slug({"lora.r": 4, "training.learning_rate": 0.01}) == "r=4_learning_rate=0.01"
    assert slug({"lora.target_modules": ["q_proj", "v_proj"]}) == "target_modules=q_proj+v_proj"
    assert slug({"model.name": "Qwen/Qwen2.5-0.5B-Instruct"}) == "name=Qwen-Qwen2.5-0.5B-Instruct"
    assert slug({}) == "base_config"


@pytest.mark.parametrize("path", EXPERIMENT_YAMLS, ids=[p.name for p in EXPERIMENT_YAMLS])
def test_every_experiment_yaml_validates(path, monkeypatch):
    """Its base_config, overrides and every grid point load with load_config (load_experiment checks)."""
    monkeypatch.chdir(REPO)  # base_config paths are relative to the repository root
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# python experiments/run.py configs/experiments/" + path.name)
    exp = load_experiment(path)
    assert exp.points() and exp.run_seeds()
    for point in exp.points():
        for seed in exp.run_seeds():
            cfg = experiment.point_config(exp, point, seed, Path("runs") / exp.name / slug(point) / f"seed{seed}")
            assert cfg.training.seed == seed and cfg.output.dir.endswith(f"seed{seed}")


def test_peak_memory_mark_restarts_before_each_run():
    """train.py reads the process's peak RSS; without the reset a sweep's rows would only ever grow."""
    import resource
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("only Linux can reset the peak RSS (/proc/self/clear_refs)")
    import mmap

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # 50 MB straight from the kernel, every page touched, and handed back on close: a numpy array may
    # reuse memory malloc already holds (and keep it), so it need not move the peak at all.
    block = mmap.mmap(-1, 50 * 2**20)
    block.write(b"\1" * (50 * 2**20))
    high = peak_mb()
    block.close()
    experiment.reset_between_runs()
    assert peak_mb() < high - 40


def test_runs_in_one_process_may_change_mixed_precision():
    """accelerate keeps one state per process; a sweep over training.mixed_precision needs a reset."""
    from accelerate import Accelerator

    try:
        Accelerator(cpu=True, mixed_precision="no")
        experiment.reset_between_runs()
        assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
    finally:
        experiment.reset_between_runs()  # leave no state behind for the next test's train()


def test_points_that_set_different_keys_share_one_table(tmp_path):
    """progressive.yaml: only its third point sets training.progressive."""
    from zhlora.experiment import Experiment, write_csv, write_markdown
    from zhlora.experiment_report import COSTS, QUALITY

    def row(point, **grid):
        numbers = {f"{m}_{s}": 0.5 for m in QUALITY for s in ("mean", "std")}
        return {"point": point, **grid, "seeds": "42", **numbers, **{c: 1.0 for c in COSTS}}

    rows = [row("r=8", **{"lora.r": "8"}), row("r=8_progressive", **{"lora.r": "8", "training.progressive": "[16@20]"})]
    write_csv(rows, tmp_path)
    header, first, second = (tmp_path / "results.csv").read_text().splitlines()
    assert header.startswith("point,lora.r,training.progressive,seeds,")
    assert first.startswith("r=8,8,,42,") and second.startswith("r=8_progressive,8,[16@20],42,")
    exp = Experiment("p", "base.yaml", [], {}, [42], {"max_samples": 4, "max_new_tokens": 8}, False)
    write_markdown(exp, rows, tmp_path, "zhlora experiment p.yaml")
    table = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| r=8")]
    assert table[0].startswith("| r=8 | 8 | - |") and table[1].startswith("| r=8_progressive | 8 | [16@20] |")


def test_a_sweep_started_as_a_command_takes_the_allocator_training_would(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                         monkeypatch):
    """`zhlora experiment` runs trainings, so like `zhlora train` it starts itself again with jemalloc
    when the config asks for it (allocator.py); called from Python it never does."""
    import argparse

    chosen = []
    monkeypatch.setattr(experiment.allocator, "use", chosen.append)
    monkeypatch.setattr(experiment, "run_experiment", lambda *args: None)
    path = write_experiment(tmp_path, tiny_model_dir, tiny_data_dir, grid={"lora.r": [2]})
    args = argparse.Namespace(experiment=str(path), output_dir=None, overrides=["training.allocator=system"])
    experiment.run(argparse.Namespace(**vars(args), entry=False))
    assert chosen == []
    experiment.run(argparse.Namespace(**vars(args), entry=True))
    assert chosen == ["system"]
