"""`make demo`: the shipped trained diffusion LM answering real questions through the engine.

The model is `models/llada-arith`: a 2.5 M-parameter LLaDA, in the released architecture and
on-disk layout, trained by `examples/train_tiny_llada.py` on 3-digit + 3-digit addition with
carries, and reversing and sorting strings of 3-6 characters (nothing else: `12+34=` is outside
what it learned). The demo loads it with `vllm.LLM` (the plugin
registers itself), asks the same questions under each decoding mode and prints the answers with
the forwards each request took, read from the engine's per-request statistics: one token per
forward (the vanilla LLaDA schedule) against confidence-aware parallel unmasking with each cache
mode. It ends with a chat request, which goes through the model's LLaDA chat template.

vLLM logs at WARNING here unless `VLLM_LOGGING_LEVEL` says otherwise: the output is the result.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

MODEL = Path(__file__).resolve().parent.parent / "models" / "llada-arith"
MAX_TOKENS = 16
BLOCK = 8
#: Seconds the engine processes get to exit before vLLM kills them (and warns about it); a
#: loaded 2-core machine needs more than vLLM's 5 s default.
SHUTDOWN_TIMEOUT_S = 60.0
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
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()  # no options: `--help` describes the demo
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # vLLM's Triton shim touches a deprecated torch alias in every process it starts; the
    # FutureWarning is vLLM's, and nothing a user of the demo can act on.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    from vllm import LLM

    llm = LLM(model=str(MODEL), dtype="float32", enforce_eager=True, max_model_len=128, seed=0)
    try:
        run(llm)
    finally:
        # An explicit shutdown: left to interpreter exit, vLLM's engine monitor reports the
        # engine core's exit as unexpected.
        llm.llm_engine.engine_core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)


def run(llm) -> None:  # noqa: ANN001  (vllm.LLM, imported lazily)
    from vllm import SamplingParams

    print(f"\nmodel: {MODEL.name} ({llm.llm_engine.model_config.architecture}); it answers "
          "3-digit + 3-digit sums, rev(s)= and sort(s)= for s of 3-6 characters")
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
