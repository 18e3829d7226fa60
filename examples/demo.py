"""`make demo`: the shipped trained diffusion LM answering real questions through the engine.

The model is `models/llada-arith`: a 2.5 M-parameter LLaDA, in the released
architecture and on-disk layout, trained by `examples/train_tiny_llada.py` on 3-digit addition
with carries, string reversal and sorting. The demo loads it with `vllm.LLM` (the plugin
registers itself), asks the same questions under each decoding mode and prints the answers with
the forwards each request took, read from the engine's per-request statistics: one token per
forward (the vanilla LLaDA schedule) against confidence-aware parallel unmasking with each cache
mode. It ends with a chat request, which goes through the model's LLaDA chat template.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

MODEL = Path(__file__).resolve().parent.parent / "models" / "llada-arith"
MAX_TOKENS = 16
BLOCK = 8
QUESTIONS = {
    "123+989=": str(123 + 989),
    "555+445=": str(555 + 445),
    "rev(vllm42)=": "24mllv",
    "sort(dream7)=": "".join(sorted("dream7")),
}
MODES = {
    "one token per forward, no cache": {"dllm_cache": "none", "dllm_steps": MAX_TOKENS},
    "threshold 0.9, no cache": {"dllm_cache": "none", "dllm_threshold": 0.9},
    "threshold 0.9, PrefixCache": {"dllm_cache": "prefix", "dllm_threshold": 0.9},
    "threshold 0.9, DualCache": {"dllm_cache": "dual", "dllm_threshold": 0.9},
    "factor 1.0, DualCache": {"dllm_cache": "dual", "dllm_factor": 1.0},
}


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(MODEL), dtype="float32", enforce_eager=True, max_model_len=128, seed=0)
    print(f"\nmodel: {MODEL.name} ({llm.llm_engine.model_config.architecture})")
    prompts = list(QUESTIONS)
    for name, extra in MODES.items():
        params = SamplingParams(
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            extra_args={"dllm_block_length": BLOCK, **extra},
        )
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        stats = [o.kv_transfer_params["dllm"] for o in outputs]
        tokens = sum(s["output_tokens"] for s in stats)
        forwards = sum(s["forwards"] for s in stats)
        print(f"\n{name}: {tokens / forwards:.2f} tokens per forward, {seconds:.2f} s")
        for prompt, out, s in zip(prompts, outputs, stats, strict=True):
            answer = out.outputs[0].text
            mark = "ok" if answer == QUESTIONS[prompt] else f"WRONG, expected {QUESTIONS[prompt]}"
            print(f"  {prompt:<15} -> {answer:<8} {s['forwards']:>2} forwards  ({mark})")

    chat = llm.chat(
        [{"role": "user", "content": "456+789="}],
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                       extra_args={"dllm_block_length": BLOCK, "dllm_cache": "dual"}),
        use_tqdm=False,
    )
    print(f"\nchat, threshold 0.9 (the default rule), DualCache: 456+789= -> "
          f"{chat[0].outputs[0].text!r}")


if __name__ == "__main__":
    main()
