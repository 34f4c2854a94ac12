"""LM head + cross entropy over chunks of tokens: the [tokens x vocab] logits never exist whole.

``linear_cross_entropy(hidden [N, d], weight [V/tp, d], labels [N])`` returns the mean token
loss of ``hidden @ weight.T`` (this TP rank's vocabulary slice, as the vocab-parallel head
computes it). The forward walks the tokens ``chunk`` rows at a time: logits of the chunk (the
model dtype, as the head's GEMM writes them), their log-sum-exp over the whole vocabulary
(max and sum of exponentials all-reduced over TP), the target logit (held by one TP rank,
all-reduced), and at once the gradient of the chunk's logits, ``softmax - onehot`` over the
number of counted tokens, which the same pass turns into this chunk's gradient of ``hidden``
and adds into the weight's. The backward only scales those two by the upstream gradient (and
all-reduces the hidden gradient over TP, as the column-parallel layer's backward does).

Memory: one chunk of logits (and its fp32 work) instead of the full logits plus their gradient
(2 x 2 GiB at 32 k tokens x 32 k vocab; 2 x 8 GiB with Llama 3's 128 k vocabulary). FLOPs: the
same three GEMMs as the head's forward and backward.

Exactness: the same maths as ``lm_loss`` on the head's logits. Labels equal to -100 are not
counted (``F.cross_entropy``'s ignore_index). Padding rows of the vocabulary (ids >= the real
vocab size) get -inf, as ``LMHead`` does. The weight gradient is the sum of per-chunk products,
each rounded to the weight dtype once (bf16: a few more roundings than one GEMM over all tokens).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

IGNORE_INDEX = -100
CHUNK_BYTES = 1 << 29  # one chunk's logits in bf16: 512 MiB
MIN_ROWS = 256


def chunk_rows(vocab_local: int, tokens: int) -> int:
    """Rows per chunk: ~CHUNK_BYTES of bf16 logits, at least MIN_ROWS, dividing ``tokens`` if it can
    (one compiled shape); otherwise the last chunk is shorter."""
    target = max(MIN_ROWS, CHUNK_BYTES // (2 * vocab_local))
    rows = 1 << (target.bit_length() - 1)  # a power of two: divides the usual token counts
    if rows >= tokens:
        return tokens
    while tokens % rows and rows // 2 >= MIN_ROWS:
        rows //= 2
    return rows


def _chunk_stats(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, pad_start: int | None,
                 tp_group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 logits [c, V/tp] (padding masked), their lse [c] over the whole vocabulary, the
    target logit [c] and whether each label is on this rank's slice."""
    x = logits.float()
    if pad_start is not None:
        x[:, pad_start:] = float("-inf")
    local = labels - vocab_start
    here = (local >= 0) & (local < x.shape[1])
    target = x.gather(1, local.clamp(0, x.shape[1] - 1)[:, None])[:, 0] * here
    mx = x.max(dim=1).values
    if tp_group is not None:
        dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=tp_group)
    sumexp = (x - mx[:, None]).exp_().sum(dim=1)
    if tp_group is not None:
        dist.all_reduce(sumexp, group=tp_group)
        dist.all_reduce(target, group=tp_group)
    return x, sumexp.log() + mx, target, here


def _chunk_grad(x: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, here: torch.Tensor,
                vocab_start: int, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d(mean loss)/d(logits) of the chunk: (softmax - onehot) * scale, zero on ignored rows."""
    g = (x - lse[:, None]).exp_()
    rows = here.nonzero()[:, 0]
    g[rows, labels[rows] - vocab_start] -= 1.0
    return g.mul_(scale[:, None]).to(dtype)


def _tp1_chunk(logits, labels, scale):
    """TP 1: loss sum and the logits' gradient in one compiled pair of passes (CUDA)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=1)
    target = x.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    loss = ((lse - target) * (scale > 0)).sum()
    g = (x - lse[:, None]).exp()
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == labels[:, None]
    return loss, ((g - onehot.float()) * scale[:, None]).to(logits.dtype)


_compiled_tp1_chunk = None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, pad_start, tp_group):
        global _compiled_tp1_chunk
        n, vocab_local = hidden.shape[0], weight.shape[0]
        counted = labels != IGNORE_INDEX
        count = counted.sum().clamp(min=1)
        scale_all = counted.float() / count  # d(mean)/d(token loss), 0 on ignored tokens
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = chunk_rows(vocab_local, n)
        fast = tp_group is None and pad_start is None and hidden.is_cuda
        if fast and _compiled_tp1_chunk is None:
            _compiled_tp1_chunk = torch.compile(_tp1_chunk)
        for r0 in range(0, n, rows):
            h, lab, scale = hidden[r0:r0 + rows], labels[r0:r0 + rows], scale_all[r0:r0 + rows]
            logits = h @ weight.t()
            if fast:
                loss_sum, g = _compiled_tp1_chunk(logits, lab, scale)
            else:
                x, lse, target, here = _chunk_stats(logits, lab, vocab_start, pad_start, tp_group)
                loss_sum = ((lse - target) * (scale > 0)).sum()
                g = _chunk_grad(x, lse, lab, here & (scale > 0), vocab_start, scale, logits.dtype)
                del x
            del logits
            total += loss_sum
            torch.mm(g, weight, out=grad_hidden[r0:r0 + rows])
            grad_weight.addmm_(g.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.tp_group = tp_group
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if ctx.tp_group is not None:  # every TP rank's vocabulary slice contributed to d(hidden)
            dist.all_reduce(grad_hidden, group=ctx.tp_group)
        return grad_hidden, grad_weight * grad_loss.to(grad_weight.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, vocab_start: int = 0,
                         pad_start: int | None = None, tp_group=None) -> torch.Tensor:
    """Mean cross entropy of ``hidden [N, d] @ weight[V/tp, d].T`` against ``labels [N]`` (global
    vocabulary ids); ``vocab_start``: first id of this rank's slice; ``pad_start``: first local
    padding row (None: none); ``tp_group``: None at TP 1. Every TP rank returns the same scalar."""
    return _LinearCrossEntropy.apply(hidden, weight, labels, vocab_start, pad_start, tp_group)
