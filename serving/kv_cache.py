"""The KV cache size vLLM gets when the manifest gives none: chosen from free memory on CPU.

Why: vLLM's CPU worker, without ``--kv-cache-memory-bytes``, reserves ``gpu_memory_utilization`` (0.92)
× the NUMA node's total memory and refuses to start when the node has less available than that
("Available memory on node 0 (9.4/10.96 GiB) on startup is less than desired CPU memory utilization").
With an explicit size it only checks, once the model is loaded, that the size is at most the node's
available memory (``vllm/v1/worker/cpu_worker.py``, vLLM 0.32). So on CPU, with no size given, we pass

    kv = min(CAP, SHARE × (available − weights − VLLM_OVERHEAD))      rounded down to a MiB

where ``available`` is what vLLM itself reads (the node's MemFree + Active(file) + Inactive(file) +
SReclaimable, clamped to the cgroup's limit), ``weights`` the base's weights in the served dtype, and
``VLLM_OVERHEAD`` the memory of vLLM's processes besides weights and cache. Half of what remains is left
to the rest of the machine, so the check vLLM makes after loading the model passes. We also pass
``--max-model-len auto`` (unless ``max_model_len`` is set), with a chosen size and with one the manifest
gives: vLLM then shortens the context to what the cache holds instead of refusing a model whose full
context does not fit (with a given size on a GPU this was not run).

A size given is passed as is, after two checks: at least :data:`SMALLEST_SET`, and on CPU at most the free
memory (vLLM's own check comes only after the model is loaded). Left to vLLM: a GPU (CUDA available),
``VLLM_CPU_KVCACHE_SPACE`` in the environment
(vLLM's legacy setting, which overrides the flag), or ``--gpu-memory-utilization`` in ``extra_args``.

The rule is :func:`choose_kv_cache_bytes` (pure); :func:`decide_kv_cache` applies it to a manifest;
:func:`read_node_memory`, :func:`weights_bytes` and :func:`cuda_available` are the thin probes.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pissa.core.errors import ServingError
from pissa.core.formats.dtypes import CODE_BYTES, FLOAT_CODES

log = logging.getLogger(__name__)

MIB = 2**20
FIT_NOTE = ("context length: the model's, or less if the KV cache cannot hold it (--max-model-len auto; "
            "set vllm.max_model_len to fix it)")
GIB = 2**30
CAP = 1 * GIB  # plenty for many concurrent requests of a small model; more only when asked for
SHARE = 0.5  # of the memory left after weights and vLLM's processes
# vLLM's API server, engine core and worker besides weights and KV cache: ~1.2-1.5 GB RSS measured with the
# tiny test models and SmolLM2 (environment notes: 1.7 GB in all with a 135M model and a 64 MB cache).
VLLM_OVERHEAD = 2 * GIB
MINIMUM = 64 * MIB  # below this, refuse before a 40 s start-up that would fail or thrash
SMALLEST_SET = MIB  # a size given below this cannot hold one block of even the tiny test models
LEGACY_ENV = "VLLM_CPU_KVCACHE_SPACE"
UTILIZATION_FLAG = "--gpu-memory-utilization"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
SET_IT = "set vllm.kv_cache_memory_bytes (--kv-cache) to change"


@dataclass(frozen=True)
class NodeMemory:
    """Memory as vLLM's CPU worker sees it: of NUMA ``node`` (None: the whole machine), bytes."""

    node: int | None
    total: int
    available: int
    share: int = 1  # the memory is this many replicas' (``available`` is one replica's part)

    def where(self) -> str:
        place = f"NUMA node {self.node}" if self.node is not None else "this machine"
        return place if self.share == 1 else f"{place}, for each of {self.share} replicas"


@dataclass(frozen=True)
class KvCacheChoice:
    """What ``build_command`` passes: ``kv_bytes`` (None: no flag), ``fit_context`` (``--max-model-len
    auto``), and ``notes``, the start-up lines that say where the size came from."""

    kv_bytes: int | None
    notes: tuple[str, ...]
    fit_context: bool = False


def human(n: float) -> str:
    """``1073741824`` -> ``1.0 GiB``; ``67108864`` -> ``64 MiB``."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


# --- the rule (pure) ----------------------------------------------------------------------------
def choose_kv_cache_bytes(available: int, weights: int, *, cap: int = CAP, share: float = SHARE,
                          overhead: int = VLLM_OVERHEAD) -> int:
    """``min(cap, share × (available − weights − overhead))``, rounded down to a MiB (≤ 0: nothing fits)."""
    room = int(share * (available - weights - overhead))
    return min(cap, room) // MIB * MIB


def served_weights_bytes(tensors: Iterable[tuple[str, tuple[int, ...]]], served_dtype: str) -> int:
    """Bytes of the weights in memory: each (safetensors dtype code, shape), floating tensors in the served
    dtype (vLLM's ``--dtype``), others as stored.

    ``auto`` keeps the stored sizes (vLLM on CPU may run an fp32 checkpoint in bf16: an over-estimate, safe).
    """
    served = DTYPE_BYTES.get(served_dtype)
    total = 0
    for code, shape in tensors:
        numel = math.prod(shape)
        floating = code in FLOAT_CODES
        total += numel * (served if served is not None and floating else CODE_BYTES.get(code, 4))
    return total


def available_in_node_meminfo(text: str) -> tuple[int, int]:
    """(total, available) bytes from ``/sys/devices/system/node/nodeN/meminfo``, as vLLM computes them:
    available = MemFree + Active(file) + Inactive(file) + SReclaimable.

    Raises:
        ValueError: a field is missing.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()  # "Node 0 MemFree:  3788548 kB"
        if len(parts) >= 4 and parts[0] == "Node":
            values[parts[2].rstrip(":")] = int(parts[3]) * 1024
    free = values["MemFree"] + values["Active(file)"] + values["Inactive(file)"] + values["SReclaimable"]
    return values["MemTotal"], free


def available_in_proc_meminfo(text: str) -> tuple[int, int]:
    """(total, available) bytes from ``/proc/meminfo`` (MemTotal, MemAvailable).

    Raises:
        ValueError: a field is missing.
    """
    values = {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE)}
    if "MemTotal" not in values or "MemAvailable" not in values:
        raise ValueError("no MemTotal/MemAvailable")
    return values["MemTotal"], values["MemAvailable"]


def clamp_to_cgroup(total: int, available: int, limit: int | None, usage: int | None) -> tuple[int, int]:
    """vLLM's clamp: a cgroup limit below the node's total caps both (a container's view)."""
    if limit is not None and limit < total:
        return limit, max(0, min(available, limit - (usage or 0)))
    return total, available


def decide_kv_cache(
    kv_cache_memory_bytes: int | None,
    *,
    max_model_len: int | None,
    extra_args: Sequence[str],
    environ: Mapping[str, str],
    on_gpu: Callable[[], bool],
    memory: Callable[[], NodeMemory],
    weights: Callable[[], int],
) -> KvCacheChoice:
    """The KV cache decision for a manifest's settings. The probes are called only when a size is to be chosen
    (and, on CPU, ``memory`` to check a size given against the free memory).

    Args:
        kv_cache_memory_bytes: the manifest's size (None: choose).
        max_model_len: the manifest's context length (None: vLLM's, fitted to the chosen cache).
        extra_args: the manifest's verbatim vLLM arguments.
        environ: the environment vLLM will see.
        on_gpu: whether CUDA is available (vLLM's GPU default then applies).
        memory: the NUMA node's memory, as vLLM's CPU worker reads it.
        weights: the base's weights in memory, bytes.

    Raises:
        ServingError: on CPU, not enough free memory for the weights, vLLM and a minimal cache; a size given
            below :data:`SMALLEST_SET`, or (on CPU) above the free memory.
    """
    if kv_cache_memory_bytes is not None:
        if kv_cache_memory_bytes < SMALLEST_SET:
            raise ServingError(f"a KV cache of {kv_cache_memory_bytes} bytes cannot hold a block of any model",
                               fix="set vllm.kv_cache_memory_bytes (--kv-cache) to e.g. 64M")
        if not environ.get(LEGACY_ENV) and not on_gpu():  # with the legacy variable vLLM ignores this size
            mem = memory()
            if kv_cache_memory_bytes > mem.available:
                # vLLM's CPU worker checks this too, but only after loading the model (~40 s in).
                raise ServingError(
                    f"a KV cache of {human(kv_cache_memory_bytes)} is more than the {human(mem.available)} free on "
                    f"{mem.where()}", fix="set a smaller vllm.kv_cache_memory_bytes (--kv-cache), or leave it "
                    "unset to have it chosen from free memory")
        # A size too small for the model's full context (SmolLM2's 8192 tokens need 0.35 GiB in float32) would
        # make vLLM refuse to start; fitted, it serves a shorter context and says so in its log. vLLM fits it to
        # the cache size on any device (v1/core/kv_cache_utils.py, _auto_fit_max_model_len); run on CPU only.
        fit = max_model_len is None
        notes = [f"KV cache: {human(kv_cache_memory_bytes)} (as set)", *((FIT_NOTE,) if fit else ())]
        return KvCacheChoice(kv_cache_memory_bytes, tuple(notes), fit_context=fit)
    if environ.get(LEGACY_ENV):
        return KvCacheChoice(None, (f"KV cache: {environ[LEGACY_ENV]} GiB from {LEGACY_ENV} (vLLM's own setting; "
                                    "it overrides vllm.kv_cache_memory_bytes)",))
    if any(arg.split("=", 1)[0] == UTILIZATION_FLAG for arg in extra_args):
        return KvCacheChoice(None, (f"KV cache: vLLM's, from {UTILIZATION_FLAG} in extra_args",))
    if on_gpu():
        return KvCacheChoice(None, ("KV cache: vLLM's default on GPU (gpu_memory_utilization)",))
    mem, need = memory(), weights()
    kv = choose_kv_cache_bytes(mem.available, need)
    if kv < MINIMUM:
        raise ServingError(
            f"not enough free memory to serve on CPU: {human(mem.available)} free on {mem.where()}; the weights "
            f"need ~{human(need)} and vLLM ~{human(VLLM_OVERHEAD)} besides, before any KV cache",
            fix="free some memory, or set vllm.kv_cache_memory_bytes (--kv-cache 64M) to try anyway",
        )
    notes = [f"KV cache: {human(kv)} (chosen from {human(mem.available)} free on {mem.where()}; {SET_IT})"]
    if max_model_len is None:
        notes.append(FIT_NOTE)
    return KvCacheChoice(kv, tuple(notes), fit_context=max_model_len is None)


# --- thin probes --------------------------------------------------------------------------------
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _int_or_none(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def current_node() -> int:
    """The NUMA node of the first CPU this process may run on (the node vLLM's CPU worker checks); 0 if unknown."""
    try:
        cpu = min(os.sched_getaffinity(0))
    except (AttributeError, OSError, ValueError):
        return 0
    for entry in sorted(Path(f"/sys/devices/system/cpu/cpu{cpu}").glob("node[0-9]*")):
        return int(entry.name[4:])
    return 0


def read_node_memory() -> NodeMemory:
    """The memory vLLM's CPU worker will see: its NUMA node's meminfo, else ``/proc/meminfo``; cgroup-clamped.

    Raises:
        ServingError: neither file can be read.
    """
    node = current_node()
    text = _read(f"/sys/devices/system/node/node{node}/meminfo")
    found: NodeMemory | None = None
    if text is not None:
        try:
            found = NodeMemory(node, *available_in_node_meminfo(text))
        except (KeyError, ValueError):
            found = None
    if found is None:
        try:
            found = NodeMemory(None, *available_in_proc_meminfo(_read("/proc/meminfo") or ""))
        except ValueError as exc:
            raise ServingError("cannot read this machine's free memory (/proc/meminfo)",
                               fix="set vllm.kv_cache_memory_bytes (--kv-cache 1G)") from exc
    limit = _int_or_none(_read("/sys/fs/cgroup/memory.max"))  # "max" (no limit) -> None
    usage = _int_or_none(_read("/sys/fs/cgroup/memory.current"))
    total, available = clamp_to_cgroup(found.total, found.available, limit, usage)
    return NodeMemory(found.node, total, available)


def weights_bytes(folder: str | Path | None, served_dtype: str) -> int:
    """The base's weights in memory, from its ``*.safetensors`` headers (0 when the folder is unknown).

    Raises:
        ValueError: a weights file is not readable safetensors (the adapter validation reports it first).
    """
    if folder is None:
        return 0
    from pissa.core.formats.safetensors import tensor_dtypes

    tensors = [spec for f in sorted(Path(folder).glob("*.safetensors")) for spec in tensor_dtypes(f).values()]
    return served_weights_bytes(tensors, served_dtype)


def cuda_available() -> bool:
    """True when torch sees a CUDA device (torch imported here, only when a choice has to be made)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
