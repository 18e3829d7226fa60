"""vllm-dllm benchmarks: the Fast-dLLM speed-up table measured on our engine.

Entry point: ``python benchmarks/run.py [--quick] [--out benchmarks/out]`` (see README.md here).
The package is importable from the repository root (``import benchmarks``) so that the smoke
test and the per-job processes (``python -m benchmarks.engine_job``) share its code.
"""
