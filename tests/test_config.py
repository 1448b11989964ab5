"""Config: defaults are the guide's, every YAML in configs/ loads, bad keys are named."""
from pathlib import Path

import pytest

from zhlora.config import ConfigError, config_from_dict, load_config, save_config

ROOT = Path(__file__).resolve().parents[1] / "configs"
# zhlora configs; configs/accelerate/ holds accelerate's launch configs (another schema).
CONFIGS = sorted(p for p in ROOT.rglob("*.yaml") if not {"accelerate", "experiments"} & set(p.parts))
LAUNCH_CONFIGS = sorted((ROOT / "accelerate").glob("*.yaml"))


def test_defaults_are_the_guides():
    cfg = load_config()
    assert (cfg.lora.r, cfg.lora.lora_alpha, cfg.lora.target_modules) == (16, 32, ["q_proj", "v_proj"])
    t = cfg.training
    assert (t.learning_rate, t.batch_size, t.num_epochs, t.warmup_ratio) == (2e-4, 4, 3, 0.1)
    assert cfg.output.dir == "outputs"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_yaml_loads(path):
    assert path.read_text(encoding="utf-8").startswith("#"), "each YAML starts with the command that runs it"
    load_config(path)


@pytest.mark.parametrize("override, message", [
    ("lora.rank=8", "lora.rank: unknown key; did you mean lora.r?"),
    ("traning.learning_rate=1e-4", "did you mean training.learning_rate?"),
    ("training.batchsize=2", "did you mean training.batch_size?"),
    ("lora.r=0", "lora.r: 0 must be > 0"),
    ("training.learning_rate=0", "training.learning_rate: 0.0 must be > 0"),
    ("training.warmup_ratio=1", "training.warmup_ratio: 1.0 must be in [0, 1)"),
    ("training.warmup_ratio=-0.1", "must be in [0, 1)"),
    ("lora.r=abc", "lora.r: expected int"),
    ("lora.r=2.5", "lora.r: expected int"),
    ("training.packing=maybe", "training.packing: expected true or false"),
    ("training.method=qlora", "training.method: 'qlora' must be lora or full"),
    ("lora.r", "key=value"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["training.distill_teacher=outputs", "training.packing=true"],
     "training.distill_teacher: distillation needs training.packing=false"),
    (["training.progressive=[16@10]", "training.method=full"],
     "training.progressive: needs training.method=lora and lora.backend=peft"),
    (["training.progressive=[16@10]", "lora.backend=scratch"],
     "training.progressive: needs training.method=lora and lora.backend=peft"),
    (["data.val_ratio=0.5", "data.test_ratio=0.5"], "data.val_ratio + data.test_ratio: must leave rows"),
])
def test_keys_that_cannot_go_together_are_refused_at_load(overrides, message):
    """Checked with the config, not after the model and data load."""
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    load_config(None, overrides[:1])  # each key alone is fine


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=[p.name for p in LAUNCH_CONFIGS])
def test_accelerate_launch_configs_parse(path):
    import yaml

    text = path.read_text(encoding="utf-8")
    assert text.startswith("# accelerate launch --config_file")
    assert yaml.safe_load(text)["distributed_type"] in ("MULTI_GPU", "DEEPSPEED")


def test_overrides_parse_types():
    cfg = load_config(None, ["lora.r=32", "training.learning_rate=1e-4", "lora.target_modules=q_proj,k_proj",
                             "lora.target_modules=[all-linear]", "training.num_epochs=1", "training.resume=true"])
    assert cfg.lora.r == 32 and cfg.training.learning_rate == 1e-4
    assert cfg.lora.target_modules == ["all-linear"] and cfg.training.resume == "true"


def test_yaml_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: 8\n  alpha: 16\n")
    with pytest.raises(ConfigError, match="lora.alpha: unknown key; did you mean lora.lora_alpha"):
        load_config(bad)
    bad.write_text("lorra: 3\n")
    with pytest.raises(ConfigError, match="did you mean lora"):
        load_config(bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["lora.r=8", "data.tasks=[num2cn,s2t]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("value", ["no", "off", "false", "'false'", "'no'"])
def test_mixed_precision_no_is_not_read_as_false(tmp_path, value):
    """YAML 1.1 reads a bare `no` (or off, false) as the boolean False, not the string 'no'."""
    path = tmp_path / "c.yaml"
    path.write_text(f"training:\n  mixed_precision: {value}\n", encoding="utf-8")
    assert load_config(path).training.mixed_precision == "no"
    assert load_config(None, [f"training.mixed_precision={value}"]).training.mixed_precision == "no"
    assert config_from_dict({"training": {"mixed_precision": False}}).training.mixed_precision == "no"
    assert load_config(None, ["training.resume=false"]).training.resume == "false"  # other fields keep "false"
