"""The objective, in one place: what training minimises, evaluation measures and distillation adds.

Only answer tokens count: formatting.py gives every prompt and padding token the label -100.
Position t predicts token t+1, so the positions that are trained are those whose *next*
label is not -100 (the last prompt token predicts the first answer token):

    labels     -100 -100 ... -100   一    千   ...  四   <|im_end|>
    logits at   no   no  ...  yes   yes   yes  ...  yes   no

- answer_logits: the logits at those positions only, (N, vocab), and the N target ids;
- compute_loss: the summed cross-entropy over them and N. The training loop divides by the
  N of the whole optimizer step, so every answer token weighs the same however batches are cut;
- linear_cross_entropy (training.fused_cross_entropy): the same sum from the hidden states and
  the output layer's weight, a chunk of tokens at a time, so the (N, vocab) logits never exist
  at once (what Liger-Kernel's fused linear cross-entropy does on GPUs);
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


LOSS_CHUNK = 256  # tokens per chunk: 256 x 49152 fp32 logits is 50 MB, against 1.3 GB for a 4 x 512 batch


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), chunk by chunk.

    The loss is the last node of the graph, so each chunk's gradient can be computed on the spot
    (d CE / d logits = softmax - one_hot) and multiplied into d/d hidden (and d/d weight, when the
    output layer is trained) before the next chunk; backward only scales what forward stored.
    Under bf16 autocast the two matmuls run in bf16 and the softmax in fp32, as the plain path does.

    Every chunk works in the same two buffers, in place: a fresh vocabulary-sized tensor per op
    costs page faults on every chunk (`logsumexp` alone allocates one), and on the 2-core CPU
    that made this loss 2.3x slower (bench/README.md). 256 rows a chunk measured fastest there
    (of 64 to 1,024).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # The matmuls' dtype, as F.linear would pick it (bf16 under autocast): the weight is cast
        # once here, not once per chunk (autocast does not cache casts of frozen weights).
        dtype = F.linear(hidden[:1, :1], weight[:1, :1]).dtype
        weight_c = weight.to(dtype)
        shape = (min(chunk, hidden.shape[0]), weight.shape[0])
        logits_buf = torch.empty(shape, dtype=torch.float32, device=hidden.device)
        low_buf = logits_buf if dtype == torch.float32 else torch.empty(shape, dtype=dtype, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit below; out= needs them fixed
            for start in range(0, hidden.shape[0], chunk):
                h, t = hidden[start:start + chunk].to(dtype), targets[start:start + chunk]
                logits, low = logits_buf[:len(t)], low_buf[:len(t)]
                torch.mm(h, weight_c.T, out=low)
                if low is not logits:
                    logits.copy_(low)
                # log-sum-exp by hand, in place: shift by the row maximum, exponentiate, sum
                logits.sub_(logits.amax(-1, keepdim=True))
                picked = logits.gather(1, t[:, None]).squeeze(1)
                sums = logits.exp_().sum(-1)
                total += (sums.log() - picked).sum()
                if want_h or want_w:
                    probs = logits.div_(sums[:, None])
                    probs[torch.arange(len(t), device=t.device), t] -= 1.0
                    if low is not probs:
                        low.copy_(probs)  # what autograd would hand the matmul: the logits' own dtype
                    if want_h and grad_h.dtype == dtype:
                        torch.mm(low, weight_c, out=grad_h[start:start + chunk])
                    elif want_h:
                        grad_h[start:start + chunk] = low @ weight_c
                    if want_w:
                        grad_w += (low.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        # grad_out is a 0-dim fp32 scalar: multiplying keeps grad_h's dtype without rounding the scale first
        return (None if grad_h is None else grad_h * grad_out,
                None if grad_w is None else (grad_w * grad_out).to(ctx.weight_dtype), None, None)


def linear_cross_entropy(hidden, weight, targets, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """The summed cross-entropy of hidden @ weight.T against targets, without the full logits.
    Without grad mode (evaluation) no gradient is computed: the Function would ask requires_grad,
    which a trained head keeps under no_grad."""
    if not torch.is_grad_enabled():
        hidden, weight = hidden.detach(), weight.detach()
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def fusable_head(model):
    """The output layer when the loss can be fused into it: a plain bias-free Linear whose output the
    model uses as it is (no logit soft-capping or scaling after it); else None."""
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    config = getattr(inner, "config", None)
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None  # e.g. a LoRA-wrapped or biased head: the plain path handles it
    if head.weight.shape != (head.out_features, head.in_features) or hasattr(head.weight, "ds_id"):
        return None  # a DeepSpeed ZeRO-3 shard (or an offloaded weight) is whole only inside the forward
    if head.weight.dtype == torch.float16 or (torch.is_autocast_enabled("cuda")
                                               and torch.get_autocast_dtype("cuda") == torch.float16):
        return None  # fp16: the plain path scales the loss before casting its gradient down; this would underflow
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) \
            or getattr(config, "logits_scaling", 1.0) != 1.0:
        return None  # something happens to the logits after the head (Gemma 2, Cohere, Granite)
    return head


def fused_loss(model, batch: dict, head) -> tuple[torch.Tensor, int]:
    """compute_loss's sum through linear_cross_entropy. A pre-hook takes the answer positions'
    hidden states on their way into the head (inside the model's own forward, so DDP and PEFT
    see a normal call) and gives the head nothing to multiply."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"][:, 1:]
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = labels != IGNORE_INDEX
    taken = []

    def take(module, args):
        taken.append(args[0][keep])
        return (taken[-1][:0],)

    handle = head.register_forward_pre_hook(take)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    targets = labels[keep[:, :-1]]
    return linear_cross_entropy(taken[0], head.weight, targets, LOSS_CHUNK), int(targets.numel())


def compute_loss(model, batch: dict, supervised_logits: bool = True,
                 fused_cross_entropy: bool = False) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised tokens, and how many there are.

    Token t predicts token t+1, so logits drop the last position and labels the
    first. Labels of -100 (prompt and padding) are skipped. The caller divides by
    the supervised-token count of the whole optimizer step (all micro-batches, all
    processes), so every answer token weighs the same however batches are cut.

    supervised_logits (training.supervised_logits): apply the output layer only at
    the trained positions (answer_logits); the same loss, with less time and
    memory, since 80% of our tokens are prompt.

    fused_cross_entropy (training.fused_cross_entropy, with supervised_logits): the same sum
    by linear_cross_entropy, never holding all the logits; the plain path where the head cannot
    be fused (fusable_head).
    """
    head = fusable_head(model) if fused_cross_entropy and supervised_logits else None
    if head is not None:
        return fused_loss(model, batch, head)
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
