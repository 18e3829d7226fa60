"""Offline batch generation with a diffusion LM through vLLM (the plugin is picked up by itself).

    python examples/offline_batch.py MODEL [--cache dual] [--threshold 0.9]

MODEL is any LLaDA or Dream checkpoint directory or hub id (GSAI-ML/LLaDA-8B-Instruct where the
machine can reach the hub). The prompts suit the bundled trained model (3-digit + 3-digit
addition, reversing and sorting strings of 3-6 characters):

    python examples/offline_batch.py models/llada-arith

While it runs, vLLM's progress bar shows tokens/s and tokens per forward
(`vllm_dllm.entrypoints.progress.dllm_progress`).
"""

from __future__ import annotations

import argparse
import os

PROMPTS = ["123+989=", "555+445=", "rev(vllm42)=", "sort(dream7)="]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="LLaDA or Dream checkpoint directory or hub id")
    parser.add_argument(
        "--cache",
        default="dual",
        choices=["none", "prefix", "dual"],
        help="dllm_cache: the Fast-dLLM cache mode (default: %(default)s)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.9,
        help="dllm_threshold: commit positions at least this confident (default: %(default)s)",
    )
    parser.add_argument(
        "--block-length",
        type=int,
        default=8,
        help="dllm_block_length: tokens per block (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=16, help="max_tokens per prompt (default: %(default)s)"
    )
    args = parser.parse_args()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams

    from vllm_dllm.entrypoints.progress import dllm_progress

    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=512)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=0.0,
        extra_args={
            "dllm_cache": args.cache,
            "dllm_threshold": args.threshold,
            "dllm_block_length": args.block_length,
        },
    )
    try:
        for output in llm.generate(PROMPTS, params, use_tqdm=dllm_progress(llm)):
            stats = output.kv_transfer_params["dllm"]
            print(
                f"{output.prompt!r:>24} -> {output.outputs[0].text!r:<20} "
                f"{stats['forwards']} forwards, {stats['tokens_per_forward']} tokens/forward"
            )
    finally:
        # Left to interpreter exit, the engine processes are killed and leak shared memory.
        llm.llm_engine.engine_core.shutdown(timeout=60)


if __name__ == "__main__":
    main()
