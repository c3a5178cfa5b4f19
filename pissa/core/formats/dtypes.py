"""The one table of tensor dtypes: safetensors codes, their byte sizes, names and torch dtypes.

Every stage speaks of dtypes in one of three ways: the safetensors header code (``"BF16"``), the
name users type and records store (``"bfloat16"``), and the torch dtype. This module maps between
them; torch is imported only by :func:`torch_dtype` and :func:`code_of`.
"""

from __future__ import annotations

from typing import Any

# safetensors code -> bytes per element
CODE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
# safetensors code -> name (as in torch: ``torch.<name>``)
CODE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}
NAME_CODES = {name: code for code, name in CODE_NAMES.items()}
# The floating dtypes a residual or an adapter may be stored in (``--dtype``, ``--adapter-dtype``).
FLOAT_NAMES = ("float32", "float16", "bfloat16", "float64")
FLOAT_CODES = frozenset(NAME_CODES[n] for n in FLOAT_NAMES)


def torch_dtype(name_or_code: str) -> Any:
    """``torch.bfloat16`` for ``"bfloat16"`` or ``"BF16"``."""
    import torch

    return getattr(torch, CODE_NAMES.get(name_or_code, name_or_code))


def code_of(dtype: Any) -> str:
    """Safetensors code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    name = str(dtype).removeprefix("torch.")
    return NAME_CODES.get(name, name)
