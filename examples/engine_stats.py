"""Forwards per request and tokens per forward for each configuration of a family's decoding.

    python examples/engine_stats.py {llada,dream,fast_dllm_v2,sdar,llada2} [--lm-head-scale 30]

Writes a tiny checkpoint of the family (random weights; `--lm-head-scale` > 1 makes its
distributions peaked, like a trained model's: the LLaDA / Dream writers scale the LM head,
the block-diffusion writers every logit), decodes 8 prompts of different lengths (ignore_eos)
under each configuration of the family's grid, and prints the engine's own per-request
statistics:

- llada, dream: cache none / prefix / dual x rule (threshold 0.9 / 0.5, factor 1.0, 32 steps),
  block 8, max_tokens 32;
- fast_dllm_v2 (block 32 from the checkpoint, sub-blocks of 8): cache none / dual x threshold
  0.95 / 0.5, max_tokens 64;
- sdar (block 4 from the checkpoint, one step per token of a block by default): remasking
  low_confidence_dynamic / low_confidence_static x threshold 0.95 / 0.5, max_tokens 64
  (the static rule commits the step's quota whatever the threshold);
- llada2 (block 32): threshold 0.95 / 0.5, without and with LLaDA 2.1's editing (editing
  threshold 0.9), max_tokens 64.

Block-diffusion prompts end inside a block, on a block boundary and inside the first block.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

BIDIRECTIONAL_RULES = {
    "threshold 0.9": {"dllm_threshold": 0.9},
    "threshold 0.5": {"dllm_threshold": 0.5},
    "factor 1.0": {"dllm_factor": 1.0},
    "steps=32 (1/step)": {"dllm_steps": 32},
}


def grid(family: str) -> dict[str, dict]:
    """Configuration label -> the request's `dllm_*` parameters."""
    if family in ("llada", "dream"):
        return {
            f"cache={cache:6} rule={name}": {"dllm_cache": cache, "dllm_block_length": 8, **rule}
            for cache in ("none", "prefix", "dual")
            for name, rule in BIDIRECTIONAL_RULES.items()
        }
    if family == "fast_dllm_v2":
        return {
            f"cache={cache:4} threshold={threshold}": {
                "dllm_cache": cache,
                "dllm_threshold": threshold,
            }
            for cache in ("none", "dual")
            for threshold in (0.95, 0.5)
        }
    if family == "llada2":
        return {
            f"editing={editing} threshold={threshold}": {
                "dllm_threshold": threshold,
                **({"dllm_editing_threshold": 0.9} if editing else {}),
            }
            for editing in (False, True)
            for threshold in (0.95, 0.5)
        }
    return {
        f"remasking={remasking:22} threshold={threshold}": {
            "dllm_remasking": remasking,
            "dllm_threshold": threshold,
        }
        for remasking in ("low_confidence_dynamic", "low_confidence_static")
        for threshold in (0.95, 0.5)
    }


#: Prompt lengths: the bidirectional grid's 3, 5, ..., 17; for the block families lengths inside
#: the first block, inside a later one, and on boundaries of both blocks (4 and 32).
PROMPT_LENGTHS = {
    "llada": [3 + 2 * i for i in range(8)],
    "dream": [3 + 2 * i for i in range(8)],
    "fast_dllm_v2": [3, 8, 17, 32, 45, 50, 64, 70],
    "sdar": [3, 8, 17, 32, 45, 50, 64, 70],
    "llada2": [3, 8, 17, 32, 45, 50, 64, 70],
}
MAX_TOKENS = {"llada": 32, "dream": 32, "fast_dllm_v2": 64, "sdar": 64, "llada2": 64}


def write_checkpoint(family: str, out: Path, scale: float) -> Path:
    from vllm_dllm.testing.block_checkpoints import (
        write_fast_dllm_v2_checkpoint,
        write_sdar_checkpoint,
    )
    from vllm_dllm.testing.checkpoints import write_dream_checkpoint, write_llada_checkpoint
    from vllm_dllm.testing.llada2_checkpoints import write_llada2_checkpoint

    if family == "llada2":
        return write_llada2_checkpoint(out, seed=0, logit_scale=scale)
    if family == "llada":
        return write_llada_checkpoint(out, seed=0, lm_head_scale=scale)
    if family == "dream":
        return write_dream_checkpoint(out, seed=0, lm_head_scale=scale)
    block_writer = (
        write_fast_dllm_v2_checkpoint if family == "fast_dllm_v2" else write_sdar_checkpoint
    )
    return block_writer(out, seed=0, logit_scale=scale)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("family", choices=["llada", "dream", "fast_dllm_v2", "sdar", "llada2"])
    parser.add_argument(
        "--lm-head-scale",
        type=float,
        default=1.0,
        help="scale of the logits (> 1: a peaked checkpoint; 30 makes most top-1 probabilities "
        "close to 1)",
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    path = write_checkpoint(args.family, Path(tempfile.mkdtemp()), args.lm_head_scale)
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, max_model_len=512, seed=0)
    lengths = PROMPT_LENGTHS[args.family]
    prompts = [
        TokensPrompt(prompt_token_ids=[(7 * i + j) % 250 + 1 for j in range(n)])
        for i, n in enumerate(lengths)
    ]
    max_tokens = MAX_TOKENS[args.family]
    print(
        f"{args.family} lm_head_scale={args.lm_head_scale}: {len(prompts)} prompts of "
        f"{lengths} tokens, max_tokens={max_tokens}, ignore_eos"
    )
    for label, extra in grid(args.family).items():
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args=extra
        )
        outputs = llm.generate(prompts, params, use_tqdm=False)
        stats = [o.kv_transfer_params["dllm"] for o in outputs]
        forwards = sum(s["forwards"] for s in stats)
        tokens = sum(s["output_tokens"] for s in stats)
        print(
            f"{args.family} lm_head_scale={args.lm_head_scale} {label:50} "
            f"forwards/request={forwards / len(stats):6.2f} tokens/forward={tokens / forwards:5.2f}"
        )


if __name__ == "__main__":
    main()
