"""`make demo`: diffusion decoding through the real vLLM engine, plugin active.

Until the trained model of issue 5 ships, the bundled default model is a tiny LLaDA checkpoint
written by `vllm_dllm.tiny_checkpoints` in the real on-disk layout, with random weights and a
scaled-up LM head (peaked, confident distributions). Its text is noise: random weights know no
language. What the demo shows is the engine: the same batch decoded one token per forward (the
vanilla LLaDA schedule) and with confidence-aware parallel unmasking under each cache mode, with
the forwards each request took, read from the engine's per-request statistics.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

GEN = 32
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Diffusion models", "2+2="]
MODES = {
    "one token per forward (steps=32, no cache)": {"dllm_cache": "none", "dllm_steps": GEN},
    "threshold 0.9, no cache": {"dllm_cache": "none", "dllm_threshold": 0.9},
    "threshold 0.9, PrefixCache": {"dllm_cache": "prefix", "dllm_threshold": 0.9},
    "threshold 0.9, DualCache": {"dllm_cache": "dual", "dllm_threshold": 0.9},
    "factor 1.0, DualCache": {"dllm_cache": "dual", "dllm_factor": 1.0},
}


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams

    from vllm_dllm.tiny_checkpoints import write_llada_checkpoint

    model = write_llada_checkpoint(
        Path(tempfile.mkdtemp(prefix="vllm-dllm-demo-")), seed=0, lm_head_scale=30.0
    )
    llm = LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    print(f"\nmodel: {model} ({llm.llm_engine.model_config.architecture}, random weights)")
    for name, extra in MODES.items():
        params = SamplingParams(
            max_tokens=GEN,
            temperature=0.0,
            ignore_eos=True,
            extra_args={"dllm_block_length": 8, **extra},
        )
        start = time.perf_counter()
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        stats = [o.kv_transfer_params["dllm"] for o in outputs]
        forwards = sum(s["forwards"] for s in stats)
        tokens = sum(s["output_tokens"] for s in stats)
        print(
            f"{name:<44} forwards per request {[s['forwards'] for s in stats]}, "
            f"{tokens / forwards:.2f} tokens/forward, {seconds:.2f} s"
        )
    print(f"\nfirst output (noise, random weights): {outputs[0].outputs[0].text!r}")


if __name__ == "__main__":
    main()
