"""FLOP count of one distillation step (teacher forward + student forward/backward + vocabulary heads).

The formula (matrix multiplications only; embeddings, LayerNorm, GELU, softmax and the losses are left
out: < 1% for BERT-base):

    one encoder layer, one sequence of l tokens, width h, feed-forward width f:
        layer(l) = 2*l*(4*h*h + 2*h*f)      Q, K, V, output projections and the two feed-forward matmuls
                 + 4*l*l*h                   scores Q K^T and probabilities x V (all heads)
    teacher forward          = sum over sequences of  L_t * layer_t(l)
    student forward+backward = 3 * sum over sequences of  L_s * layer_s(l)   (backward = 2 x forward)
    MLM heads, per position where logits are computed:
        teacher: 2*h_t*h_t + 2*h_t*V  (transform + vocabulary projection; only when a loss reads teacher logits)
        student: 3 * (2*h_s*h_s + 2*h_s*V)

Per token of BERT-base (12 x 768, f 3072, V 30522) at l = 128: teacher 174.6 MFLOP, 6-layer student
fwd+bwd 261.9 MFLOP, heads 4 * 48.1 = 192.5 MFLOP per logit position (28.9 per token when only the 15%
masked positions get logits) -- the figures of issue 6.

"Model FLOPs" count what the configuration needs (real tokens only, logits only at the positions a
loss reads); "hardware FLOPs" count what a path really computes (padding included; the baseline's
full-vocabulary logits at every padded position). MFU = model FLOPs / s / peak.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    vocab: int

    def layer_flops(self, tokens: float, token_pairs: float) -> float:
        """One layer's forward FLOPs over sequences with `tokens` = sum l and `token_pairs` = sum l^2."""
        h, f = self.hidden, self.intermediate
        return 2.0 * tokens * (4 * h * h + 2 * h * f) + 4.0 * token_pairs * h

    def head_flops(self, positions: float) -> float:
        """Forward FLOPs of the MLM head (transform + vocabulary projection) at `positions` positions."""
        h = self.hidden
        return positions * (2.0 * h * h + 2.0 * h * self.vocab)


def step_flops(
    teacher: Shape | None, student: Shape, tokens: float, token_pairs: float, logit_positions: float, teacher_logits: bool = True
) -> dict[str, float]:
    """FLOPs of one step, by part. `tokens`/`token_pairs` = sum of l and l^2 over the step's sequences
    (padded lengths for hardware FLOPs), `logit_positions` = positions where both models compute logits."""
    parts = {
        "teacher_fwd": teacher.layers * teacher.layer_flops(tokens, token_pairs) if teacher is not None else 0.0,
        "student_fwd_bwd": 3.0 * student.layers * student.layer_flops(tokens, token_pairs),
        "teacher_head": teacher.head_flops(logit_positions) if teacher is not None and teacher_logits else 0.0,
        "student_head_fwd_bwd": 3.0 * student.head_flops(logit_positions),
    }
    parts["total"] = sum(parts.values())
    return parts


def per_token_mflops(teacher: Shape, student: Shape, seq_len: int, logit_fraction: float) -> dict[str, float]:
    """Per-token MFLOP for full sequences of `seq_len` tokens, logits at `logit_fraction` of the tokens."""
    parts = step_flops(teacher, student, seq_len, seq_len * seq_len, logit_fraction * seq_len)
    return {k: v / seq_len / 1e6 for k, v in parts.items()}


BERT_BASE = Shape(layers=12, hidden=768, intermediate=3072, vocab=30522)
DISTILBERT_STUDENT = Shape(layers=6, hidden=768, intermediate=3072, vocab=30522)

# Dense peak of the accelerators we report on (TFLOP/s, no sparsity).
PEAK_TFLOPS = {
    ("H100", "bf16"): 989.0,
    ("H100", "fp32"): 67.0,
    ("H100", "tf32"): 494.0,
    ("H200", "bf16"): 989.0,
    ("H200", "fp32"): 67.0,
    ("H200", "tf32"): 494.0,
    ("A100", "bf16"): 312.0,
    ("A100", "fp32"): 19.5,
    ("A100", "tf32"): 156.0,
}


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    for (name, prec), value in PEAK_TFLOPS.items():
        if name in device_name and prec == precision:
            return value
    return None


def measured_matmul_tflops(threads: int, size: int = 1024, repeats: int = 8) -> float:
    """Best fp32 matmul rate this CPU reaches with `threads` threads: the CPU stand-in for a datasheet peak."""
    import time

    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        return 2.0 * size**3 / best / 1e12
    finally:
        torch.set_num_threads(old)
