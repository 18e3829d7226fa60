"""Test fixtures that users of the plugin can run too: random LLaDA / Dream checkpoints in the
released on-disk layout (`checkpoints`), with their tokenizers and chat templates.

Not imported by the plugin at run time.
"""
