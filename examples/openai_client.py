"""Talk to `vllm-dllm serve` / `vllm serve` with the official `openai` client.

Start a server first (`vllm serve` on a CUDA install), for example on the bundled trained model
exactly as the README does:

    vllm-dllm serve models/llada-arith --dtype float32 --max-model-len 128

(the model's own defaults, in its generation_config.json, set blocks of 8 and DualCache)

then run:

    python examples/openai_client.py [--base-url http://localhost:8000/v1] [--model NAME]

The bundled model answers 3-digit + 3-digit sums and rev(s)= / sort(s)= for strings s of 3-6
characters, in at most 16 tokens; the prompts below stay inside that.
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base-url",
        default="http://localhost:8000/v1",
        help="the server's OpenAI API root (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="served model name (default: the server's only model, from /v1/models)",
    )
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = args.model or client.models.list().data[0].id
    xargs = {"dllm_block_length": 8, "dllm_cache": "dual", "dllm_threshold": 0.9}

    completion = client.completions.create(
        model=model,
        prompt="123+989=",
        max_tokens=16,
        temperature=0,
        extra_body={"vllm_xargs": xargs},
    )
    print(f"model: {model}")
    print("completion:", repr(completion.choices[0].text))
    print("statistics:", completion.model_extra["kv_transfer_params"]["dllm"])

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "456+789="}],
        max_tokens=16,
        temperature=0,
        extra_body={"vllm_xargs": xargs},
    )
    print("chat:", repr(chat.choices[0].message.content))

    # One token per step; text is sent as soon as it is final. The final usage chunk carries the
    # request's statistics, as the non-streamed response does.
    print("stream:", end=" ", flush=True)
    for chunk in client.completions.create(
        model=model,
        prompt="rev(vllm42)=",
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"vllm_xargs": {"dllm_block_length": 8, "dllm_steps": 16}},
    ):
        if chunk.choices:
            print(repr(chunk.choices[0].text), end=" ", flush=True)
        else:
            print("\nstream statistics:", chunk.model_extra["kv_transfer_params"]["dllm"])


if __name__ == "__main__":
    main()
