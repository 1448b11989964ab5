"""The `zhlora` command: --help lists every command with its purpose, quickly; a user's error is one line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from zhlora import cli

EVERY_COMMAND = ["prepare", "validate", "doctor", "train", "distill", "evaluate", "plot", "demo", "serve",
                 "experiment", "params", "merge", "merge-adapters", "export"]


def test_help_lists_every_command_with_its_purpose(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    assert [name for name, *_ in cli.COMMANDS] == EVERY_COMMAND
    for name, purpose, _, _ in cli.COMMANDS:
        assert f" {name} {purpose}" in shown, f"zhlora --help does not show `{name}`"


@pytest.mark.parametrize("name", EVERY_COMMAND)
def test_each_command_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([name, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: zhlora {name}")


def test_help_loads_no_model_library():
    """--help imports every command module; torch and transformers wait for a command's run()."""
    code = "import sys; from zhlora import cli; cli.build_parser(); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_experiment_takes_overrides_before_and_after_options():
    args = cli.build_parser().parse_args(["experiment", "x.yaml", "lora.r=4", "--output_dir", "runs/x", "lora.r=8"])
    assert (args.experiment, args.output_dir, args.overrides) == ("x.yaml", "runs/x", ["lora.r=4", "lora.r=8"])


def test_a_user_error_is_one_line_with_status_2(capsys):
    assert cli.main(["train", "lora.rank=8"]) == 2
    assert capsys.readouterr().err == "zhlora train: error: lora.rank: unknown key; did you mean lora.r?\n"
