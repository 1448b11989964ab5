"""Knowledge distillation: the loss by hand, live and cached teachers, a smaller student."""
import math

import pytest
import torch

from conftest import build_tiny_model_dir, tiny_overrides
from zhlora.config import ConfigError, load_config
from zhlora.distill import distill_loss_sum
from zhlora.train import train


def test_loss_matches_a_hand_computation():
    # One supervised token (position 1, token 2), predicted by the logits at position 0; vocab of 3.
    student = torch.tensor([[[1.0, 0.0, 2.0], [5.0, 5.0, 5.0], [9.0, 0.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 2.0, 4.0], [7.0, 0.0, 0.0], [0.0, 0.0, 9.0]]])
    labels = torch.tensor([[-100, 2, -100]])
    alpha, T = 0.25, 2.0
    s = [1.0, 0.0, 2.0]
    ce = -(s[2] - math.log(sum(math.exp(x) for x in s)))
    ps = [math.exp(x / T) / sum(math.exp(y / T) for y in s) for x in s]
    t = [0.0, 2.0, 4.0]
    pt = [math.exp(x / T) / sum(math.exp(y / T) for y in t) for x in t]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    loss, n = distill_loss_sum(student, teacher, labels, alpha, T)
    assert n == 1
    assert loss.item() == pytest.approx(alpha * ce + (1 - alpha) * T * T * kl, rel=1e-6)
    # top-k with k = vocab is the same KL
    values, indices = teacher[0, 0:1].topk(3)
    loss_k, _ = distill_loss_sum(student, (values, indices), labels, alpha, T)
    assert loss_k.item() == pytest.approx(loss.item(), rel=1e-6)



def test_answer_rows_loss_equals_the_whole_sequence_loss(tiny_model_dir, tiny_data_dir):
    from zhlora.batching import collate_padded
    from zhlora.config import ModelConfig
    from zhlora.distill import distill_loss_rows
    from zhlora.models import answer_logits, load_model
    from zhlora.train_setup import load_split

    model, tok = load_model(ModelConfig(name=str(tiny_model_dir)), torch.device("cpu"))
    samples = load_split(tiny_data_dir / "val.json", tok, load_config(None, [f"model.name={tiny_model_dir}"]))[0][:4]
    batch = collate_padded(samples, tok.pad_token_id)
    teacher = torch.randn(*batch["input_ids"].shape, model.config.vocab_size)
    with torch.no_grad():
        whole = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows, targets = answer_logits(model, batch)  # the head hooked to the answer positions
    mask = batch["labels"][:, 1:] != -100
    full, n = distill_loss_sum(whole, teacher, batch["labels"], 0.3, 2.0)
    part, m = distill_loss_rows(rows, teacher[:, :-1][mask], targets, 0.3, 2.0)
    assert n == m == int(mask.sum()) > 0
    assert part.item() == pytest.approx(full.item(), rel=1e-5)

@pytest.mark.parametrize("top_k", [0, 8])
def test_student_learns_from_a_run_folder_teacher(tiny_model_dir, tiny_data_dir, tiny_run_dir, tmp_path, top_k):
    out = tmp_path / "student"
    summary = train(load_config(None, tiny_overrides(
        tiny_model_dir, tiny_data_dir, out, "model.num_hidden_layers=1", f"training.distill_teacher={tiny_run_dir}",
        f"training.distill_top_k={top_k}", "training.max_steps=6")))
    assert math.isfinite(summary["final_loss"])
    cache = out / f"teacher_top{top_k}.safetensors"
    assert cache.is_file() == (top_k > 0)
    if top_k:  # only the rows 6 steps of batch 4 draw, not all 240 training rows
        from safetensors.torch import load_file

        assert 0 < len(load_file(str(cache))) // 2 <= 6 * 4
    from zhlora.generation import load_run

    student, _, cfg = load_run(out)  # reloads with one layer, as saved in config.yaml
    assert cfg.model.num_hidden_layers == 1 and len(student.base_model.model.model.layers) == 1


def test_teacher_with_another_tokenizer_is_refused(tiny_model_dir, tiny_data_dir, tmp_path):
    other = build_tiny_model_dir(tmp_path / "other", chat_template=None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["新词"])
    tok.save_pretrained(other)
    with pytest.raises(ConfigError, match="tokenizer differs from the student"):
        train(load_config(None, tiny_overrides(tiny_model_dir, tiny_data_dir, tmp_path / "out",
                                               f"training.distill_teacher={other}", "training.max_steps=2")))


def test_keep_layers_picks_evenly_spaced_layers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from zhlora.models import keep_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert keep_layers(model, 2) == [0, 1] and model.config.num_hidden_layers == 2


def test_batched_teacher_top_k_equals_one_by_one(tiny_model_dir, tiny_data_dir):
    from zhlora.config import ModelConfig
    from zhlora.distill import teacher_top_k
    from zhlora.models import load_model
    from zhlora.train_setup import load_split

    model, tok = load_model(ModelConfig(name=str(tiny_model_dir)), torch.device("cpu"))
    cfg = load_config(None, [f"model.name={tiny_model_dir}"])
    samples = load_split(tiny_data_dir / "val.json", tok, cfg)[0][:10]
    ids = list(range(109, 99, -1))  # ids in another order than the samples' lengths
    batched = teacher_top_k(model, samples, ids, tok.pad_token_id, 5, "cpu", batch_size=4)
    assert batched.keys() == {f"{i}.{n}" for i in ids for n in ("values", "indices")}
    for i, sample in zip(ids, samples):  # independently: the whole model on one unpadded row
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0, :-1]
        values, indices = logits[torch.tensor(sample["labels"][1:]) != -100].topk(5, dim=-1)
        torch.testing.assert_close(batched[f"{i}.values"], values, rtol=1e-5, atol=1e-5)
        assert torch.equal(batched[f"{i}.indices"], indices)


def test_cache_covers_accumulation_and_a_second_epoch(tiny_model_dir, tiny_data_dir, tiny_run_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "student"
    # 6 steps x 2 micro-batches x 32 rows = 384 draws from ~270 rows: the stream wraps into epoch 2
    summary = train(load_config(None, tiny_overrides(
        tiny_model_dir, tiny_data_dir, out, f"training.distill_teacher={tiny_run_dir}", "training.distill_top_k=4",
        "training.batch_size=32", "training.gradient_accumulation_steps=2", "training.max_steps=6")))
    assert math.isfinite(summary["final_loss"])
    assert len(load_file(str(out / "teacher_top4.safetensors"))) // 2 == summary["train_samples"]


def test_resume_with_more_steps_tops_up_the_teacher_cache(tiny_model_dir, tiny_data_dir, tiny_run_dir, tmp_path,
                                                          monkeypatch):
    import zhlora.distill
    from safetensors.torch import load_file

    out = tmp_path / "student"
    base = tiny_overrides(tiny_model_dir, tiny_data_dir, out, f"training.distill_teacher={tiny_run_dir}",
                          "training.distill_top_k=4", "training.save_steps=2")
    train(load_config(None, [*base, "training.max_steps=2"]))
    first = load_file(str(out / "teacher_top4.safetensors"))
    computed = []
    real = zhlora.distill.teacher_top_k
    monkeypatch.setattr(zhlora.distill, "teacher_top_k",
                        lambda teacher, samples, ids, *a, **k: computed.extend(ids) or real(teacher, samples, ids,
                                                                                          *a, **k))
    train(load_config(None, [*base, "training.max_steps=6", "training.resume=true"]))
    second = load_file(str(out / "teacher_top4.safetensors"))
    cached_before = {int(key.split(".")[0]) for key in first}
    assert computed and not cached_before & set(computed)  # only the rows not cached yet
    assert first.keys() < second.keys()
    for key in first:  # the cached rows are kept as they were
        assert torch.equal(first[key], second[key])


def test_overwrite_with_another_teacher_remakes_the_cache(tiny_model_dir, tiny_data_dir, tiny_run_dir, tmp_path,
                                                          capsys):
    from safetensors.torch import load_file

    out = tmp_path / "student"
    base = tiny_overrides(tiny_model_dir, tiny_data_dir, out, "training.distill_top_k=4", "training.max_steps=2",
                          "output.overwrite=true")
    train(load_config(None, [*base, f"training.distill_teacher={tiny_run_dir}"]))
    first = load_file(str(out / "teacher_top4.safetensors"))
    train(load_config(None, [*base, f"training.distill_teacher={tiny_run_dir}"]))  # same teacher: reused
    assert "making it again" not in capsys.readouterr().out
    train(load_config(None, [*base, f"training.distill_teacher={tiny_model_dir}"]))  # the untrained base model
    assert "was made for another teacher, top-k or data: making it again" in capsys.readouterr().out
    second = load_file(str(out / "teacher_top4.safetensors"))
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first if k.endswith(".values"))
