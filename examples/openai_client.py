"""Talk to `vllm-dllm serve` / `vllm serve` with the official `openai` client.

Start a server first (`vllm serve` on a CUDA install), for example on the bundled trained model:

    vllm-dllm serve models/llada-arith --dtype float32 --served-model-name llada-arith

then run:

    python examples/openai_client.py [--base-url http://localhost:8000/v1] [--model llada-arith]
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--model", default="llada-arith")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    xargs = {"dllm_block_length": 8, "dllm_cache": "dual", "dllm_threshold": 0.9}

    completion = client.completions.create(
        model=args.model,
        prompt="123+989=",
        max_tokens=16,
        temperature=0,
        extra_body={"vllm_xargs": xargs},
    )
    print("completion:", repr(completion.choices[0].text))
    print("statistics:", completion.model_extra["kv_transfer_params"]["dllm"])

    chat = client.chat.completions.create(
        model=args.model,
        messages=[{"role": "user", "content": "456+789="}],
        max_tokens=16,
        temperature=0,
        extra_body={"vllm_xargs": xargs},
    )
    print("chat:", repr(chat.choices[0].message.content))

    print("stream:", end=" ", flush=True)
    for chunk in client.completions.create(
        model=args.model,
        prompt="rev(vllm42)=",
        max_tokens=16,
        temperature=0,
        stream=True,
        extra_body={"vllm_xargs": {"dllm_block_length": 8, "dllm_steps": 16}},
    ):
        print(repr(chunk.choices[0].text), end=" ", flush=True)
    print()


if __name__ == "__main__":
    main()
