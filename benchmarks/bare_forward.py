"""The floor of a denoising step: the model's own compute in plain torch, no engine.

One cached step of the bidirectional family (LLaDA's body: RMSNorm, RoPE, non-causal attention,
SwiGLU MLP, untied LM head) recomputes one window that attends to the cached K/V of the rest of
the canvas and to itself. Timing exactly that with nothing around it (no scheduler, no process
hops, no sampler, no paged KV cache) says how far an engine step is from what the hardware needs
for the same arithmetic. Used by benchmarks/gpu.py.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from vllm_dllm.model_executor.models.transformer_shape import TransformerShape


def bare_forward(sh: TransformerShape, dtype: str, context: int, w: int, replays: int,
                 cuda: bool) -> dict[str, float | None]:
    """Median ms of the forward of a ``w``-token window over ``context`` cached tokens plus
    itself, eager and (on CUDA) replayed from a CUDA graph, after 3 warm-up calls each.

    Random weights (``sh``'s sizes, ``dtype``); q/k/v and gate/up are fused as vLLM's layers
    fuse them; the window writes its K/V after the context's random K/V in a preallocated
    cache, as a cached denoising step writes its own. Multi-head attention, as LLaDA's (as many
    K/V heads as query heads).
    """
    torch.manual_seed(0)
    if not cuda:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    h, nh, d, m = sh.hidden_size, sh.num_heads, sh.head_dim, sh.intermediate_size
    kw = {"device": "cuda" if cuda else "cpu", "dtype": getattr(torch, dtype)}

    def rand(*size: int, fan_in: int = 1):
        return torch.randn(*size, **kw) * fan_in**-0.5

    layers = [(rand(3 * h, h, fan_in=h), rand(h, h, fan_in=h), rand(2 * m, h, fan_in=h),
               rand(h, m, fan_in=m), rand(2, 1, nh, context + w, d)) for _ in range(sh.num_layers)]
    norm, x0, head = torch.ones(h, **kw), rand(w, h), rand(sh.vocab_size, h, fan_in=h)
    angle = torch.arange(context, context + w, device=kw["device"])[:, None] * sh.rope_theta ** (
        -torch.arange(0, d, 2, device=kw["device"]) / d)
    cos, sin = (f(angle).repeat(1, 2).to(kw["dtype"]) for f in (torch.cos, torch.sin))

    def rms(x):
        return x * (x.float().pow(2).mean(-1, keepdim=True) + sh.rms_norm_eps).rsqrt().to(x) * norm

    def rope(x):  # [heads, w, d], rotate-half
        return x * cos + torch.cat((-x[..., d // 2 :], x[..., : d // 2]), -1) * sin

    def forward():
        x = x0
        for qkv, o, gate_up, down, kv in layers:
            q, k, v = F.linear(rms(x), qkv).view(w, 3, nh, d).permute(1, 2, 0, 3)
            kv[0, 0, :, context:], kv[1, 0, :, context:] = rope(k), v
            att = F.scaled_dot_product_attention(rope(q)[None], kv[0], kv[1])  # not causal
            x = x + F.linear(att[0].transpose(0, 1).reshape(w, h), o)
            gate, up = F.linear(rms(x), gate_up).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, down)
        return F.linear(rms(x), head)

    def timed(fn) -> float:
        """Median ms of ``replays`` calls after 3 warm-up calls: CUDA events on a GPU."""
        ms = []
        for _ in range(replays + 3):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ms.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                ms.append(1000 * (time.perf_counter() - t))
        return round(statistics.median(ms[3:]), 4)

    with torch.inference_mode():
        out = {"eager": timed(forward), "graphed": None}
        if cuda:  # warmed up on a side stream first, so the capture records no lazy set-up
            (side := torch.cuda.Stream()).wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    forward()
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph := torch.cuda.CUDAGraph()):
                forward()
            out["graphed"] = timed(graph.replay)
    return out
