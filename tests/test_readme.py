"""The README's commands are the ones CI runs, and its file tree names real files."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    test_command = next(line for block in blocks for line in block.splitlines() if "pytest" in line)
    ci_lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in ci_lines


def test_readme_tree_names_existing_files():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    tree = readme.split("## 文件树", 1)[1].split("```")[1]
    for line in tree.splitlines():
        first = line.split()[0] if line.strip() else ""
        for name in re.findall(r"[\w./]+\.(?:py|yaml|json)|[\w./]+/$", first):
            candidates = [REPO / name, REPO / "zhlora" / name.split(",")[0]]
            assert any(c.exists() for c in candidates), f"README tree names {name}, which does not exist"
