"""Knowledge distillation: the loss by hand, live and cached teachers, a smaller student."""
import math

import pytest
import torch

from conftest import build_tiny_model_dir, tiny_overrides
from zhlora.config import ConfigError, load_config
from zhlora.loss import distill_loss_sum
from zhlora.train import train
from zhlora.training.distill import teacher_coarse


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
    # top-k with k = vocab is the same KL (the tail bucket is empty)
    loss_k, _ = distill_loss_sum(student, teacher_coarse(teacher[0, 0:1], 3, T), labels, alpha, T)
    assert loss_k.item() == pytest.approx(loss.item(), rel=1e-6)
    # k = 2: the KL between the coarsened distributions [top-1, top-2, tail] of both models
    coarse = lambda p: [p[2], p[1], p[0]]  # the teacher's top-2 are tokens 2 and 1; the tail is token 0
    kl_2 = sum(p * math.log(p / q) for p, q in zip(coarse(pt), coarse(ps)))
    loss_2, _ = distill_loss_sum(student, teacher_coarse(teacher[0, 0:1], 2, T), labels, alpha, T)
    assert loss_2.item() == pytest.approx(alpha * ce + (1 - alpha) * T * T * kl_2, rel=1e-6)


def test_top_k_loss_is_zero_when_the_student_is_the_teacher(tiny_model_dir, tiny_data_dir):
    from zhlora.training.batching import collate_padded
    from zhlora.config import ModelConfig
    from zhlora.loss import answer_logits, distill_loss_rows
    from zhlora.models import load_model
    from zhlora.training.distill import teacher_top_k
    from zhlora.training.setup import load_split

    model, tok = load_model(ModelConfig(name=str(tiny_model_dir)), torch.device("cpu"))
    samples = load_split(tiny_data_dir / "val.json", tok, load_config(None, [f"model.name={tiny_model_dir}"]))[0][:4]
    cache = teacher_top_k(model, samples, [0, 1, 2, 3], tok.pad_token_id, 8, "cpu", temperature=2.0)
    teacher = tuple(torch.cat([cache[f"{i}.{part}"] for i in range(4)]) for part in ("log_probs", "indices"))
    with torch.no_grad():
        student, targets = answer_logits(model, collate_padded(samples, tok.pad_token_id))
    kl_only, n = distill_loss_rows(student, teacher, targets, alpha=0.0, temperature=2.0)
    assert n > 0 and abs(kl_only.item()) < 1e-6


def test_a_minus_inf_teacher_logit_gives_no_nan():
    from zhlora.loss import distill_loss_rows

    student = torch.randn(3, 6, requires_grad=True)
    teacher = torch.randn(3, 6)
    teacher[:, 4] = float("-inf")  # a token the teacher rules out (a masked or banned id)
    targets = torch.tensor([0, 1, 2])
    for given in (teacher, teacher_coarse(teacher, 6, 2.0), teacher_coarse(teacher, 3, 2.0)):
        loss, _ = distill_loss_rows(student, given, targets, alpha=0.5, temperature=2.0)
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(student.grad).all()
        student.grad = None



def test_answer_rows_loss_equals_the_whole_sequence_loss(tiny_model_dir, tiny_data_dir):
    from zhlora.training.batching import collate_padded
    from zhlora.config import ModelConfig
    from zhlora.loss import answer_logits, distill_loss_rows
    from zhlora.models import load_model
    from zhlora.training.setup import load_split

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
    from zhlora.models import load_model
    from zhlora.training.distill import teacher_top_k
    from zhlora.training.setup import load_split

    model, tok = load_model(ModelConfig(name=str(tiny_model_dir)), torch.device("cpu"))
    cfg = load_config(None, [f"model.name={tiny_model_dir}"])
    samples = load_split(tiny_data_dir / "val.json", tok, cfg)[0][:10]
    ids = list(range(109, 99, -1))  # ids in another order than the samples' lengths
    batched = teacher_top_k(model, samples, ids, tok.pad_token_id, 5, "cpu", batch_size=4)
    assert batched.keys() == {f"{i}.{n}" for i in ids for n in ("log_probs", "indices")}
    for i, sample in zip(ids, samples):  # independently: the whole model on one unpadded row
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([sample["input_ids"]])).logits[0, :-1]
        answer = logits[torch.tensor(sample["labels"][1:]) != -100]
        values, indices = answer.topk(5, dim=-1)
        probs = torch.softmax(answer, dim=-1)  # temperature 1 (the default)
        top = probs.gather(-1, indices)
        expected = torch.cat([top, 1 - top.sum(-1, keepdim=True)], dim=-1)  # the tail bucket, by hand
        torch.testing.assert_close(batched[f"{i}.log_probs"].exp(), expected, rtol=1e-4, atol=1e-6)
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
    import zhlora.training.distill
    from safetensors.torch import load_file

    out = tmp_path / "student"
    base = tiny_overrides(tiny_model_dir, tiny_data_dir, out, f"training.distill_teacher={tiny_run_dir}",
                          "training.distill_top_k=4", "training.save_steps=2")
    train(load_config(None, [*base, "training.max_steps=2"]))
    first = load_file(str(out / "teacher_top4.safetensors"))
    computed = []
    real = zhlora.training.distill.teacher_top_k
    monkeypatch.setattr(zhlora.training.distill, "teacher_top_k",
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
    made_again = "was made for another teacher, top-k, temperature, data or cache format: making it again"
    assert made_again in capsys.readouterr().out
    second = load_file(str(out / "teacher_top4.safetensors"))
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[k], second[k]) for k in first if k.endswith(".log_probs"))


def test_a_cache_without_the_tail_bucket_is_not_reused(tiny_model_dir, tiny_data_dir, tiny_run_dir, tmp_path,
                                                        capsys):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / "student"
    base = tiny_overrides(tiny_model_dir, tiny_data_dir, out, "training.distill_top_k=4", "training.max_steps=1",
                          "output.overwrite=true", f"training.distill_teacher={tiny_run_dir}")
    train(load_config(None, base))
    cache = out / "teacher_top4.safetensors"
    with safe_open(str(cache), "pt") as f:
        fingerprint = f.metadata()["fingerprint"]
    # What a cache made before the tail bucket holds: top-k "values" and indices, and only a fingerprint.
    old = {k.replace(".log_probs", ".values"): v[:, :-1].contiguous() if k.endswith(".log_probs") else v
           for k, v in load_file(str(cache)).items()}
    save_file(old, str(cache), metadata={"fingerprint": fingerprint})
    capsys.readouterr()
    train(load_config(None, base))
    assert "making it again" in capsys.readouterr().out
    remade = load_file(str(cache))
    assert any(k.endswith(".log_probs") for k in remade) and not any(k.endswith(".values") for k in remade)


@pytest.mark.parametrize("top_k", [0, 4])
def test_teacher_with_another_lm_head_size_is_refused(tiny_model_dir, tiny_data_dir, tmp_path, top_k):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher.resize_token_embeddings(teacher.config.vocab_size + 8)  # padded rows, as Qwen2.5 7B vs 0.5B
    teacher.save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "teacher")  # the same tokenizer
    with pytest.raises(ConfigError, match=r"lm_head has \d+ vocabulary rows, the student.s \d+"):
        train(load_config(None, tiny_overrides(tiny_model_dir, tiny_data_dir, tmp_path / "out",
                                               f"training.distill_teacher={tmp_path / 'teacher'}",
                                               f"training.distill_top_k={top_k}", "training.max_steps=1")))
