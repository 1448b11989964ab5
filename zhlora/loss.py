"""The objective, in one place: what training minimises, evaluation measures and distillation adds.

Only answer tokens count: formatting.py gives every prompt and padding token the label -100.
Position t predicts token t+1, so the positions that are trained are those whose *next*
label is not -100 (the last prompt token predicts the first answer token):

    labels     -100 -100 ... -100   一    千   ...  四   <|im_end|>
    logits at   no   no  ...  yes   yes   yes  ...  yes   no

- answer_logits: the logits at those positions only, (N, vocab), and the N target ids;
- compute_loss: the summed cross-entropy over them and N. The training loop divides by the
  N of the whole optimizer step, so every answer token weighs the same however batches are cut;
- distill_loss_rows / distill_loss_sum: knowledge distillation (training/distill.py keeps
  the teacher), on the same answer tokens:

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

  where x_T = softmax(logits / T). A temperature T > 1 flattens both distributions so the
  student also learns which wrong answers the teacher finds nearly right; the T^2 keeps that
  term's gradients on the same scale as the cross-entropy (Hinton et al. 2015). With a cached
  top-k teacher both sides are coarsened to k + 1 outcomes (the top-k ids and "anything
  else"), whose KL is exact and never more than the full one (merging outcomes cannot
  increase a KL).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zhlora.formatting import IGNORE_INDEX
from zhlora.models import unwrap


def answer_logits(model, batch: dict, head_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) at the positions whose next token is trained (label != -100):
    logits (N, vocab) and the N target ids, row by row in batch order.

    Position t predicts token t+1. The output layer is a vocabulary-sized matmul (21% of
    SmolLM2's FLOPs) and its batch x length x vocab result is the biggest tensor of a step;
    training and the distillation teacher need it only at answer positions. With head_only
    (training.supervised_logits) a forward pre-hook hands the head only those hidden states,
    through the model's own forward (not around it), so DDP and PEFT see a normal call. A
    model without a separate output layer to hook runs whole, as does head_only=False.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"][:, 1:]
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = labels != IGNORE_INDEX
    head = unwrap(model).get_output_embeddings() if head_only else None
    if head is None:
        return model(**inputs, use_cache=False).logits[keep], labels[keep[:, :-1]]
    handle = head.register_forward_pre_hook(lambda module, args: (args[0][keep],))
    try:
        return model(**inputs, use_cache=False).logits, labels[keep[:, :-1]]
    finally:
        handle.remove()


def compute_loss(model, batch: dict, supervised_logits: bool = True) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised tokens, and how many there are.

    Token t predicts token t+1, so logits drop the last position and labels the
    first. Labels of -100 (prompt and padding) are skipped. The caller divides by
    the supervised-token count of the whole optimizer step (all micro-batches, all
    processes), so every answer token weighs the same however batches are cut.

    supervised_logits (training.supervised_logits): apply the output layer only at
    the trained positions (answer_logits); the same loss, with less time and
    memory, since 80% of our tokens are prompt.
    """
    logits, targets = answer_logits(model, batch, supervised_logits)
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.numel())


def distill_loss_sum(student_logits, teacher, labels, alpha: float, temperature: float):
    """(summed loss over supervised tokens, their count) from whole-sequence logits [batch, length,
    vocab]; teacher = its whole-sequence logits, or (log_probs, indices) at the n answer tokens."""
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    if not isinstance(teacher, tuple):
        teacher = teacher[:, :-1][mask]
    return distill_loss_rows(student_logits[:, :-1][mask], teacher, labels[mask], alpha, temperature)


def distill_loss_rows(student, teacher, targets, alpha: float, temperature: float):
    """The same from the answer positions only (what answer_logits returns): student
    [n, vocab], teacher [n, vocab] or (log_probs [n, k + 1], indices [n, k])
    (training/distill.py's teacher_coarse), targets [n]."""
    student = student.float()
    ce_sum = F.cross_entropy(student, targets, reduction="sum")
    log_s = F.log_softmax(student / temperature, dim=-1)
    if isinstance(teacher, tuple):  # cached top-k: both models over [top-k ids..., everything else]
        log_t, indices = teacher
        log_s = coarse(log_s, indices)
    else:
        log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    # 0 * log 0 = 0: a token the teacher gives probability 0 (a -inf logit, an empty tail) adds
    # nothing, where the plain product would be 0 * -inf = NaN.
    p_t = log_t.exp()
    kl_sum = torch.where(p_t > 0, p_t * (log_t - log_s), 0.0).sum()
    return alpha * ce_sum + (1 - alpha) * temperature ** 2 * kl_sum, int(targets.numel())


def coarse(log_probs, indices):
    """[n, vocab] log-probabilities -> [n, k + 1]: those of the k ids, then the log of the tail,
    all the other tokens' mass, summed in log space (1 - sum(top-k) cancels in float32 once the
    top-k hold nearly all the mass)."""
    # finfo.min, not -inf: with k = vocab the tail is empty, and logsumexp over all -inf has NaN gradients.
    tail = log_probs.scatter(-1, indices, torch.finfo(log_probs.dtype).min).logsumexp(-1, keepdim=True)
    return torch.cat([log_probs.gather(-1, indices), tail], dim=-1)
