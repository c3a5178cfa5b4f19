"""The serialized bitsandbytes 4-bit layout of a quantized Linear weight (a packed QPiSSA residual).

This is what transformers' ``save_pretrained`` of a model loaded with ``load_in_4bit`` writes, and what
``from_pretrained`` loads directly when ``config.json`` holds a ``quantization_config``. For a Linear
``M`` with weight ``[out, in]`` (``n = out·in``, NF4 block size ``b``, ``k = ceil(n / b)`` blocks)::

    M.weight                                  uint8   [ceil(n/2), 1]   two 4-bit codes per byte
    M.weight.absmax                           float32 [k]              per-block scale
                                              (uint8  [k] with double quantization)
    M.weight.quant_map                        float32 [16]             the NF4 code book
    M.weight.nested_absmax                    float32 [ceil(k/256)]    double quantization only
    M.weight.nested_quant_map                 float32 [256]            double quantization only
    M.weight.quant_state.bitsandbytes__nf4    uint8   [L]              UTF-8 JSON: quant_type, blocksize,
                                                                       dtype, shape (+ nested_blocksize,
                                                                       nested_dtype, nested_offset)

The JSON's length depends on the value of ``nested_offset`` (a float's repr) with double
quantization; the converter lays files out before it quantizes, so it pads the JSON with trailing
spaces to a length computed from the shape alone (JSON allows trailing whitespace; bitsandbytes
decodes it with ``json.loads``).
"""

from __future__ import annotations

import json
import math
from typing import Any

QUANT_STATE = "quant_state.bitsandbytes__"
ABSMAX = "absmax"
QUANT_MAP = "quant_map"
NESTED_ABSMAX = "nested_absmax"
NESTED_QUANT_MAP = "nested_quant_map"
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax constants in blocks of 256
#: dtype bitsandbytes dequantizes to: float32, so a loaded layer gives back exactly the deq(Q) the adapter was fitted to.
STATE_DTYPE = "float32"
# Longest repr of a Python float ("-1.2345678901234567e-308"): room kept for nested_offset.
_FLOAT_WIDTH = 24


def aux_suffixes(quant_type: str, double_quant: bool) -> list[str]:
    """The suffixes (after ``M.weight.``) of a packed weight's quant-state tensors."""
    names = [ABSMAX, QUANT_MAP, QUANT_STATE + quant_type]
    return names + [NESTED_ABSMAX, NESTED_QUANT_MAP] if double_quant else names


def block_counts(out_in: tuple[int, int], blocksize: int) -> tuple[int, int]:
    """``(k, nested k)``: the number of NF4 blocks and of absmax blocks (double quantization)."""
    k = math.ceil(out_in[0] * out_in[1] / blocksize)
    return k, math.ceil(k / NESTED_BLOCKSIZE)


def state_json(
    quant_type: str, blocksize: int, out_in: tuple[int, int], nested_offset: float | None = None
) -> dict[str, Any]:
    """The non-tensor part of the quant state (``nested_offset`` given: double quantization)."""
    state: dict[str, Any] = {
        "quant_type": quant_type, "blocksize": blocksize, "dtype": STATE_DTYPE, "shape": [out_in[0], out_in[1]],
    }
    if nested_offset is not None:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=nested_offset)
    return state


def state_json_length(quant_type: str, blocksize: int, out_in: tuple[int, int], double_quant: bool) -> int:
    """Bytes of the padded JSON tensor: known from the shape alone, before any quantization."""
    if not double_quant:
        return len(json.dumps(state_json(quant_type, blocksize, out_in)).encode())
    base = json.dumps(state_json(quant_type, blocksize, out_in, 0.0)).encode()
    return len(base) - len("0.0") + _FLOAT_WIDTH


def encode_state_json(state: dict[str, Any], length: int) -> bytes:
    """The JSON of ``state``, padded with spaces to ``length`` bytes."""
    raw = json.dumps(state).encode()
    if len(raw) > length:
        raise ValueError(f"quant state JSON of {len(raw)} bytes exceeds its reserved {length}")
    return raw + b" " * (length - len(raw))


def quantization_config(
    quant_type: str, double_quant: bool, compute_dtype: str, skip_modules: list[str] | None
) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` (transformers' BitsAndBytesConfig, 4-bit).

    ``skip_modules`` (``llm_int8_skip_modules``): the Linear layers stored unquantized. ``None`` keeps
    transformers' default (the output embeddings); a list replaces it, so it must name them too.
    """
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
