"""Distil one causal softmax-attention layer into a Mamba-2-style ssmc layer (MOHAWK-style).

The teacher is the attention layer of a small, randomly initialised Transformer on synthetic
token sequences. The student computes its query (C), key (B), step size (dt) and value (x)
from the same hidden states, copies the teacher's value and output projections, and is
trained in two stages:

1. matrices: `ssmc.mixing_loss` matches the student's hidden attention matrix to the
   teacher's softmax(q k^T / sqrt(d)) per head, without materialising either on a GPU;
2. outputs: the layer's outputs are matched (mean squared error), all student weights train.

Stage 1 brings the relative output error the second stage starts from to about 0.65 (from
about 5 for the same initial student without it); a linear-attention-like student cannot
reach a softmax exactly, so neither loss goes to 0.

Runs in well under a minute on a CPU (on CUDA when a GPU is present):

    python examples/distill_attention.py [--steps1 150 --steps2 150]
"""
import argparse
import math
import time

import torch
import torch.nn as nn

import ssmc
from ssmc import dsl as S


@ssmc.ssm
def mamba2_like(x: S.In["b t h p"], dt: S.In["b t h"], A: S.In["h"], B: S.In["b t h n"],
                C: S.In["b t h n"]):
    """Mamba-2's recurrence without the gate: y = M x with M[t, s] = C_t . B_s exp(A sum dt)."""
    dt = S.softplus(dt)
    return S.recurrence(decay=S.exp(dt * A), key=B, value=x, query=C)


class Teacher(nn.Module):
    """Token embedding and one causal softmax-attention layer (a Transformer's mixer)."""

    def __init__(self, vocab, d_model, heads, sharpness=4.0):
        super().__init__()
        self.heads, self.d = heads, d_model // heads
        self.embed = nn.Embedding(vocab, d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        # larger query weights: attention as peaked as a trained layer's, not near-uniform
        self.qkv.weight.data[:d_model] *= sharpness

    def qkv_heads(self, hidden):
        b, t, _ = hidden.shape
        return [z.view(b, t, self.heads, self.d) for z in self.qkv(hidden).chunk(3, -1)]

    def forward(self, hidden):
        q, k, v = self.qkv_heads(hidden)
        y = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out(y.transpose(1, 2).flatten(2)), q, k


class Student(nn.Module):
    """The ssmc layer: projections to x, dt, B, C. As in MOHAWK, it starts from the teacher's
    weights: B and C from its key and query projections (scaled down: linear attention in
    place of a softmax), x and the output from its value and output projections."""

    def __init__(self, teacher: Teacher, init_scale=0.3):
        super().__init__()
        d_model, self.heads, self.d = teacher.out.in_features, teacher.heads, teacher.d
        w_q, w_k, w_v = teacher.qkv.weight.detach().chunk(3, 0)
        self.bc = nn.Linear(d_model, 2 * d_model, bias=False)   # state size n = head dim
        per_head = self.bc.weight.data.view(self.heads, 2, self.d, d_model)
        per_head[:, 0] = w_k.view(self.heads, self.d, d_model) * init_scale
        per_head[:, 1] = w_q.view(self.heads, self.d, d_model) * init_scale
        self.dt = nn.Linear(d_model, self.heads)
        self.A_log = nn.Parameter(torch.full((self.heads,), -2.0))
        self.value = nn.Linear(d_model, d_model, bias=False)
        self.value.weight.data.copy_(w_v)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.out.weight.data.copy_(teacher.out.weight.detach())
        self.op = ssmc.compile(mamba2_like)

    def inputs(self, hidden):
        b, t, _ = hidden.shape
        B, C = self.bc(hidden).view(b, t, self.heads, 2, -1).unbind(3)
        x = self.value(hidden).view(b, t, self.heads, self.d)
        return x, self.dt(hidden), -self.A_log.exp(), B, C

    def forward(self, hidden):
        y = self.op(*self.inputs(hidden))
        return self.out(y.flatten(2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps1", type=int, default=150, help="matrix-matching steps")
    parser.add_argument("--steps2", type=int, default=150, help="output-matching steps")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab, d_model, heads, batch, length = 64, 32, 2, 8, 32
    teacher = Teacher(vocab, d_model, heads).to(device).requires_grad_(False)
    student = Student(teacher).to(device)
    scale = 1 / math.sqrt(teacher.d)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()

    def batch_of_hidden():
        tokens = torch.randint(vocab, (batch, length), device=device)
        return teacher.embed(tokens)

    start = time.perf_counter()
    # stage 1: the mixing matrices, summed over heads; printed relative to ||softmax||^2 (the
    # loss of M = 0), which is computed here only to print it
    opt = torch.optim.Adam([p for n, p in student.named_parameters()
                            if n.split(".")[0] in ("bc", "dt", "A_log")], lr=1e-2)
    for step in range(args.steps1 + 1):
        hidden = batch_of_hidden()
        _, q, k = teacher(hidden)
        loss = ssmc.mixing_loss(student.op, *student.inputs(hidden), q=q, k=k, scale=scale)
        if step % 50 == 0 or step == args.steps1:
            with torch.no_grad():
                s = torch.einsum("bthd,bshd->bhts", q, k) * scale
                zero = torch.softmax(s.masked_fill(~causal, -math.inf), -1).square().sum()
            print(f"stage 1 (matrices) step {step:4d}  ||M - softmax||^2 / ||softmax||^2 "
                  f"{(loss / zero).item():.4f}")
        opt.zero_grad()
        loss.backward()
        opt.step()
    # stage 2: the layer's outputs, every student weight
    # (printed: the mean over the steps since the last line; fresh batches are noisy)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    seen = []
    for step in range(args.steps2 + 1):
        hidden = batch_of_hidden()
        target, _, _ = teacher(hidden)
        loss = nn.functional.mse_loss(student(hidden), target) / target.pow(2).mean()
        seen.append(loss.item())
        if step % 50 == 0 or step == args.steps2:
            print(f"stage 2 (outputs)  step {step:4d}  ||y - y_teacher||^2 / ||y_teacher||^2 "
                  f"{sum(seen) / len(seen):.4f}")
            seen = []
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"done in {time.perf_counter() - start:.1f} s on {device}")


if __name__ == "__main__":
    main()
