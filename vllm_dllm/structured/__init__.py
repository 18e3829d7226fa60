"""Structured output for diffusion models: a grammar enforced at commit (`commit_rule`)."""
