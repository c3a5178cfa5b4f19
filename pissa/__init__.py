"""pissa-pipeline: checkpoints → PiSSA bundles → fine-tuned adapters → LoRA on the original base → vLLM.

This package is the command-line front (``pissa``) and the shared error types; the work is done by
the ``converter``, ``training`` and ``serving`` packages. Importing it is cheap (no torch).
"""

__version__ = "0.1.0"
