"""Serving one base and many LoRA adapters with vLLM: manifest, validation, launcher, runtime client.

Modules: :mod:`serving.manifest` (typed serving manifest), :mod:`serving.validate` (adapters vs base,
pure checks), :mod:`serving.command` (the vLLM command line), :mod:`serving.launcher` (start, health,
signals, shutdown), :mod:`serving.client` (runtime add/remove/list), :mod:`serving.session` (serve,
ask, stop), :mod:`serving.vllm_plugin` (the CPU mixed-batch LoRA fix, a vLLM general plugin).
Nothing here imports vLLM at import time.
"""
