"""Infilling with a diffusion LM: the model fills the gap between a prompt and a suffix.

A bidirectional model (LLaDA, Dream) decodes the canvas `prompt ++ [MASK] * G ++ suffix` with
every position seeing every other, so the suffix informs the gap. This runs the bundled trained
model (`models/llada-arith`: 3-digit sums, rev(s)= and sort(s)=) offline through `vllm.LLM`: for
each question and each split of its answer into a missing start and a given end, it passes the
end as the suffix (`extra_args={"dllm_suffix": ...}`) with a gap as long as the missing start,
and checks that gap + suffix is the right answer.

The gap is `max_tokens` rounded up to whole blocks, so here it is one block of exactly the
missing length (`dllm_block_length` = `max_tokens`). The model was trained on answers padded
with EOS to 16 tokens, so the suffix is given as token ids: the answer's end, then EOS up to
that length, the canvas the model knows. (A text suffix, as the server's `suffix` sends, is its
tokens and one EOS.)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

MODEL = Path(__file__).resolve().parent.parent / "models" / "llada-arith"
#: The answer length the model was trained on (answer, then EOS padding).
ANSWER_LEN = 16
SHUTDOWN_TIMEOUT_S = 60.0
QUESTIONS = {
    "123+989=": str(123 + 989),
    "555+445=": str(555 + 445),
    "rev(vllm42)=": "24mllv",
    "sort(dream7)=": "".join(sorted("dream7")),
}


def infill(llm) -> list[tuple[str, str, str]]:  # noqa: ANN001  (vllm.LLM, imported lazily)
    """(prompt, what the model wrote in the gap, the given end) for every split of every
    answer; the whole answer is the split with an empty end."""
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    cases, params = [], []
    for prompt, answer in QUESTIONS.items():
        for gap in range(1, len(answer) + 1):
            end = answer[gap:]
            padding = [tokenizer.eos_token_id] * (ANSWER_LEN - len(answer))
            suffix = tokenizer.encode(end, add_special_tokens=False) + padding
            cases.append((prompt, end))
            params.append(SamplingParams(
                max_tokens=gap,
                temperature=0.0,
                extra_args={"dllm_block_length": gap, "dllm_cache": "prefix",
                            "dllm_suffix": suffix},
            ))  # fmt: skip
    outputs = llm.generate([prompt for prompt, _ in cases], params, use_tqdm=False)
    return [(p, o.outputs[0].text, end) for (p, end), o in zip(cases, outputs, strict=True)]


def report(results: list[tuple[str, str, str]]) -> int:
    """Print each infilled answer; return how many are right."""
    print("prompt          [gap]end     (the model wrote the gap; the end was the suffix)")
    right = 0
    for prompt, gap, end in results:
        ok = gap + end == QUESTIONS[prompt]
        right += ok
        print(f"  {prompt:<14} [{gap:>6}]{end:<6} {'ok' if ok else 'WRONG'}")
    print(f"{right} of {len(results)} right")
    return right


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()  # no options: `--help` describes the example
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    from vllm import LLM

    llm = LLM(model=str(MODEL), dtype="float32", enforce_eager=True, max_model_len=128, seed=0)
    try:
        report(infill(llm))
    finally:
        llm.llm_engine.engine_core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)


if __name__ == "__main__":
    main()
