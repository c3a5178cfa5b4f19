"""Reading safetensors headers: tensor names and shapes through ``safe_open`` (no tensor data read)."""

from __future__ import annotations

import os


def tensor_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors file, from its header.

    Raises:
        ValueError: not a readable safetensors file (safetensors' own errors are turned into this).
    """
    return {key: shape for key, (_, shape) in tensor_dtypes(path).items()}


def tensor_dtypes(path: str | os.PathLike[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype code such as ``"BF16"``, shape), from the file's header.

    Raises:
        ValueError: not a readable safetensors file.
    """
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            out = {}
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                s = f.get_slice(key)
                out[key] = (str(s.get_dtype()), tuple(s.get_shape()))
            return out
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError (not a ValueError)
        raise ValueError(str(exc)) from exc
