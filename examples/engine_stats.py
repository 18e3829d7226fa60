"""Forwards per request and tokens per forward for each cache mode x selection rule.

    python examples/engine_stats.py {llada,dream} [--lm-head-scale 30]

Writes a tiny checkpoint (random weights; `--lm-head-scale` > 1 makes its distributions peaked,
like a trained model's), decodes 8 prompts of different lengths (max_tokens 32, block 8,
ignore_eos) under every mode, and prints the engine's own per-request statistics.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

RULES = {
    "threshold 0.9": {"dllm_threshold": 0.9},
    "threshold 0.5": {"dllm_threshold": 0.5},
    "factor 1.0": {"dllm_factor": 1.0},
    "steps=32 (1/step)": {"dllm_steps": 32},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("family", choices=["llada", "dream"])
    parser.add_argument("--lm-head-scale", type=float, default=1.0)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_dllm.testing.checkpoints import write_dream_checkpoint, write_llada_checkpoint

    write = write_llada_checkpoint if args.family == "llada" else write_dream_checkpoint
    path = write(Path(tempfile.mkdtemp()), seed=0, lm_head_scale=args.lm_head_scale)
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    prompts = [
        TokensPrompt(prompt_token_ids=[(7 * i + j) % 250 + 1 for j in range(3 + 2 * i)])
        for i in range(8)
    ]
    for cache in ("none", "prefix", "dual"):
        for name, rule in RULES.items():
            params = SamplingParams(
                max_tokens=32,
                temperature=0,
                ignore_eos=True,
                extra_args={"dllm_cache": cache, "dllm_block_length": 8, **rule},
            )
            stats = [o.kv_transfer_params["dllm"] for o in llm.generate(prompts, params)]
            forwards = sum(s["forwards"] for s in stats)
            tokens = sum(s["output_tokens"] for s in stats)
            print(
                f"{args.family} lm_head_scale={args.lm_head_scale} cache={cache:6} "
                f"rule={name:18} forwards/request={forwards / len(stats):6.2f} "
                f"tokens/forward={tokens / forwards:5.2f}"
            )


if __name__ == "__main__":
    main()
