"""pissa-pipeline: checkpoints → PiSSA bundles → fine-tuned adapters → LoRA on the original base → vLLM.

This package is the command-line front (``pissa.cli``, ``pissa.commands``, ``pissa.demo``) and, in
``pissa.core``, the base layer that every stage (``converter``, ``training``, ``serving``) builds
on. Importing it is cheap (no torch).
"""

from pissa.core import __version__

__all__ = ["__version__"]
