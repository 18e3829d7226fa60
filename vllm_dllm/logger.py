"""The plugin's loggers, inside vLLM's logging configuration.

vLLM configures the `vllm` logger tree only (its handler, format, `VLLM_LOGGING_LEVEL`,
`VLLM_LOGGING_CONFIG_PATH`), in every process it starts. A logger named `vllm_dllm.*` sits
outside that tree: its INFO lines vanished and its warnings came out unformatted through
Python's last-resort handler. So the plugin's loggers are children of `vllm`
(`vllm.vllm_dllm.engine.config_hook`, ...), and a line of ours looks, filters and goes where
vLLM's own do.
"""

from __future__ import annotations

from vllm.logger import init_logger as _vllm_init_logger

#: The parent of every logger of the plugin (a child of vLLM's `vllm` logger).
ROOT = "vllm.vllm_dllm"


def init_logger(name: str):
    """vLLM's `init_logger` for module `name` (a `vllm_dllm.*` name) under vLLM's tree."""
    return _vllm_init_logger(f"vllm.{name}")
