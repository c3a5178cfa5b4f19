"""The base layer every stage imports: typed errors, file formats, hashing, manifests, the Hub client.

Layers never point up (checked by import-linter in CI, contract in pyproject.toml)::

    pissa.cli, pissa.commands, pissa.demo      the front: parse, call one function, format
    converter | training | serving             the stages (independent of each other)
    pissa.core                                 this package

Nothing here imports a stage or the front, and nothing here imports torch at module level unless
the module is about tensors.
"""

__version__ = "0.1.0"
