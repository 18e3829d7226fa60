"""The denoising loop's state and per-step device math, free of vLLM.

`request` holds each request's loop state as host integers; `canvases` the device-resident
canvases and block tables; `step` turns a batch's plans into device tensors (window inputs,
candidates, commits). `vllm_dllm.engine.denoiser` only connects them to vLLM.
"""
