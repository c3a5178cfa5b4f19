"""A QPiSSA residual in the serialized bitsandbytes 4-bit layout (pissa/core/formats/nf4.py): the
tensors of one packed weight, their layout before quantizing, and reading them back.

``packed_layout`` needs only the shape and the options (the streaming writer lays a file out before
any matrix is quantized); ``packed_tensors`` turns a :class:`converter.qpissa.Quantized` into exactly
those tensors; ``dequantize_packed`` is bitsandbytes' own dequantization of what was stored, i.e. what
a loaded ``Linear4bit`` computes with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from converter.options import QuantOptions
from pissa.core.formats import nf4

if TYPE_CHECKING:
    from converter.qpissa import Quantized

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def packed_layout(key: str, out_in: tuple[int, int], quant: QuantOptions) -> Layout:
    """Every tensor (name, dtype, shape) of the packed weight ``key`` (``M.weight``) of shape ``out_in``."""
    n = out_in[0] * out_in[1]
    k, nested_k = nf4.block_counts(out_in, quant.blocksize)
    length = nf4.state_json_length(quant.quant_type, quant.blocksize, out_in, quant.double_quant)
    layout: Layout = {
        key: (torch.uint8, ((n + 1) // 2, 1)),
        f"{key}.{nf4.ABSMAX}": (torch.uint8 if quant.double_quant else torch.float32, (k,)),
        f"{key}.{nf4.QUANT_MAP}": (torch.float32, (16,)),
        f"{key}.{nf4.QUANT_STATE}{quant.quant_type}": (torch.uint8, (length,)),
    }
    if quant.double_quant:
        layout[f"{key}.{nf4.NESTED_ABSMAX}"] = (torch.float32, (nested_k,))
        layout[f"{key}.{nf4.NESTED_QUANT_MAP}"] = (torch.float32, (256,))
    return layout


def packed_tensors(key: str, quantized: Quantized, out_in: tuple[int, int], quant: QuantOptions) -> dict[str, torch.Tensor]:
    """The tensors of :func:`packed_layout` from a :class:`converter.qpissa.Quantized`."""
    offset = None
    tensors = {key: quantized.packed.reshape(-1, 1), f"{key}.{nf4.ABSMAX}": quantized.absmax, f"{key}.{nf4.QUANT_MAP}": quantized.code}
    if quant.double_quant:
        state = quantized.state
        state2 = state.state2
        offset = float(state.offset.item())
        tensors[f"{key}.{nf4.NESTED_ABSMAX}"] = state2.absmax
        tensors[f"{key}.{nf4.NESTED_QUANT_MAP}"] = state2.code.clone()
    length = nf4.state_json_length(quant.quant_type, quant.blocksize, out_in, quant.double_quant)
    raw = nf4.encode_state_json(nf4.state_json(quant.quant_type, quant.blocksize, out_in, offset), length)
    tensors[f"{key}.{nf4.QUANT_STATE}{quant.quant_type}"] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def aux_keys(key: str, quant_type: str, double_quant: bool) -> list[str]:
    """The quant-state tensor names that accompany the packed weight ``key``."""
    return [f"{key}.{s}" for s in nf4.aux_suffixes(quant_type, double_quant)]


def dequantize_packed(get: Callable[[str], torch.Tensor], key: str, quant_type: str, double_quant: bool) -> torch.Tensor:
    """``deq(Q)`` in float32 ``[out, in]`` of the packed weight ``key``, read with ``get`` (bitsandbytes' maths).

    Raises:
        MissingDependencyError: bitsandbytes is not installed.
    """
    from converter.qpissa import require_bitsandbytes

    functional = require_bitsandbytes()
    stats = {k[len(key) + 1 :]: get(k) for k in aux_keys(key, quant_type, double_quant)}
    state = functional.QuantState.from_dict(stats, device=torch.device("cpu"))
    return functional.dequantize_4bit(get(key), state).to(torch.float32)
