"""The KV cache size `pissa serve` chooses on CPU when none is given (serving/kv_cache.py).

vLLM's CPU worker, with no size, wants 0.92 × the NUMA node's memory and refuses to start when less is
free; with an explicit size it only checks the size is at most what is free once the model is loaded.
The rule: min(1 GiB, ½ × (free − weights − 2 GiB for vLLM's processes)), to the MiB.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from procs import free_port

from pissa.cli import run
from pissa.core.errors import ServingError
from serving.kv_cache import (
    GIB,
    MIB,
    NodeMemory,
    available_in_node_meminfo,
    available_in_proc_meminfo,
    choose_kv_cache_bytes,
    clamp_to_cgroup,
    decide_kv_cache,
    read_node_memory,
    served_weights_bytes,
    weights_bytes,
)

NODE_MEMINFO = """\
Node 0 MemTotal:       10184424 kB
Node 0 MemFree:         3788548 kB
Node 0 MemUsed:         6395876 kB
Node 0 Active(file):    2027268 kB
Node 0 Inactive(file):  1524444 kB
Node 0 SReclaimable:     200000 kB
Node 0 SUnreclaim:        50000 kB
"""


# --- the rule, with numbers ----------------------------------------------------------------------
def test_rule_caps_at_one_gib_when_memory_is_plentiful():
    # The machine of the bug report: 9.4 GiB free on node 0; SmolLM2 in fp32 is ~0.5 GiB.
    assert choose_kv_cache_bytes(int(9.4 * GIB), GIB // 2) == GIB


def test_rule_takes_half_of_what_is_left_after_weights_and_vllm():
    # 3 GiB free, 0.25 GiB weights: ½ × (3 − 0.25 − 2) GiB = 384 MiB.
    assert choose_kv_cache_bytes(3 * GIB, GIB // 4) == 384 * MIB
    # rounded down to a MiB
    assert choose_kv_cache_bytes(3 * GIB + 3 * MIB, GIB // 4) == 385 * MIB
    assert choose_kv_cache_bytes(GIB, GIB) <= 0


def test_node_meminfo_is_read_as_vllm_reads_it():
    total, available = available_in_node_meminfo(NODE_MEMINFO)
    assert total == 10184424 * 1024
    assert available == (3788548 + 2027268 + 1524444 + 200000) * 1024


def test_proc_meminfo_and_cgroup_clamp():
    assert available_in_proc_meminfo("MemTotal:  1000 kB\nMemFree: 10 kB\nMemAvailable:  600 kB\n") == (1024000, 614400)
    with pytest.raises(ValueError):
        available_in_proc_meminfo("MemTotal: 1000 kB\n")
    assert clamp_to_cgroup(10 * GIB, 8 * GIB, None, None) == (10 * GIB, 8 * GIB)
    assert clamp_to_cgroup(10 * GIB, 8 * GIB, 4 * GIB, 3 * GIB) == (4 * GIB, GIB)
    assert clamp_to_cgroup(10 * GIB, 8 * GIB, 20 * GIB, 3 * GIB) == (10 * GIB, 8 * GIB)


def test_weights_are_counted_in_the_served_dtype():
    tensors = [("F32", (1000, 100)), ("BF16", (100,)), ("U8", (64,))]
    assert served_weights_bytes(tensors, "auto") == 400_000 + 200 + 64
    assert served_weights_bytes(tensors, "bfloat16") == 200_000 + 200 + 64
    assert served_weights_bytes(tensors, "float32") == 400_000 + 400 + 64


def test_weights_of_a_real_folder(tiny_llama):
    from safetensors import safe_open

    with safe_open(str(tiny_llama / "model.safetensors"), framework="numpy") as f:
        numel = sum(int(f.get_tensor(k).size) for k in f.keys())  # noqa: SIM118
    assert weights_bytes(tiny_llama, "float32") == 4 * numel  # the tiny Llama is stored in fp32
    assert weights_bytes(tiny_llama, "bfloat16") == 2 * numel
    assert weights_bytes(None, "auto") == 0


def _never() -> NodeMemory:
    raise AssertionError("the memory probe must not run")


def _decide(kv=None, *, max_model_len=None, extra=(), environ=None, gpu=False, available=int(9.4 * GIB), weights=GIB // 2):
    return decide_kv_cache(kv, max_model_len=max_model_len, extra_args=extra, environ=environ or {},
                           on_gpu=lambda: gpu, memory=lambda: NodeMemory(0, int(10.96 * GIB), available),
                           weights=lambda: weights)


def test_cpu_without_a_size_chooses_one_and_says_so():
    choice = _decide()
    assert choice.kv_bytes == GIB and choice.fit_context
    assert choice.notes[0] == ("KV cache: 1.0 GiB (chosen from 9.4 GiB free on NUMA node 0; "
                               "set vllm.kv_cache_memory_bytes (--kv-cache) to change)")
    assert "--max-model-len auto" in choice.notes[1]
    fixed = _decide(max_model_len=2048, available=3 * GIB, weights=GIB // 4)
    assert fixed.kv_bytes == 384 * MIB and not fixed.fit_context and len(fixed.notes) == 1


def test_what_is_left_to_vllm():
    def decide(kv=None, **kw):
        return decide_kv_cache(kv, max_model_len=None, extra_args=kw.get("extra", ()), environ=kw.get("environ", {}),
                               on_gpu=lambda: kw.get("gpu", False), memory=kw.get("memory", _never), weights=_never)

    def plenty():
        return NodeMemory(total=16 * GIB, available=8 * GIB, node=0)

    given = decide(64 * MIB, memory=plenty)  # on CPU a given size is only checked against the free memory
    assert given.kv_bytes == 64 * MIB and given.notes[0] == "KV cache: 64 MiB (as set)"
    # An explicit size too small for the model's full context must not stop vLLM from starting (bench/quant_serve.py
    # with --kv-cache 256M on SmolLM2's 8192 tokens did): the context is fitted unless max_model_len is set.
    assert given.fit_context and "--max-model-len auto" in given.notes[1]
    pinned = decide_kv_cache(64 * MIB, max_model_len=2048, extra_args=(), environ={}, on_gpu=lambda: False,
                             memory=plenty, weights=_never)
    assert not pinned.fit_context and pinned.notes == ("KV cache: 64 MiB (as set)",)
    given_on_gpu = decide_kv_cache(64 * MIB, max_model_len=None, extra_args=(), environ={}, on_gpu=lambda: True,
                                   memory=_never, weights=_never)  # on a GPU a given size reads no memory
    assert given_on_gpu.fit_context and given_on_gpu.kv_bytes == 64 * MIB
    assert decide(environ={"VLLM_CPU_KVCACHE_SPACE": "2"}).kv_bytes is None
    assert decide(extra=("--gpu-memory-utilization=0.5",)).kv_bytes is None
    assert decide(extra=("--gpu-memory-utilization", "0.5")).kv_bytes is None
    gpu = decide(gpu=True)
    assert gpu.kv_bytes is None and "GPU" in gpu.notes[0]


def test_a_given_size_that_cannot_work_is_refused_before_starting():
    def decide(kv, available=8 * GIB, gpu=False):
        return decide_kv_cache(kv, max_model_len=None, extra_args=(), environ={}, on_gpu=lambda: gpu,
                               memory=lambda: NodeMemory(total=16 * GIB, available=available, node=0), weights=_never)

    with pytest.raises(ServingError, match="1024 bytes cannot hold a block"):
        decide(1024)
    with pytest.raises(ServingError, match="1024.0 GiB is more than the 8.0 GiB free on NUMA node 0") as exc:
        decide(2**40)
    assert "--kv-cache" in (exc.value.fix or "")
    assert decide(MIB).kv_bytes == MIB and decide(8 * GIB).kv_bytes == 8 * GIB  # the bounds themselves pass
    assert decide(2**40, gpu=True).kv_bytes == 2**40  # a GPU's cache is not in this memory: vLLM's to check
    legacy = decide_kv_cache(2**40, max_model_len=None, extra_args=(), environ={"VLLM_CPU_KVCACHE_SPACE": "1"},
                             on_gpu=lambda: False, memory=_never, weights=_never)
    assert legacy.kv_bytes == 2**40  # vLLM ignores the flag when its own variable is set: nothing to check


def test_too_little_memory_is_one_clear_error_before_starting():
    with pytest.raises(ServingError) as exc:
        _decide(available=int(2.5 * GIB), weights=GIB // 2)
    assert "2.5 GiB free on NUMA node 0" in exc.value.message and "--kv-cache" in (exc.value.fix or "")


def test_the_probe_reads_what_vllm_reads():
    """Same node, same formula as vLLM's CPU worker (memory moves between the two reads: 5% slack)."""
    cpu_utils = pytest.importorskip("vllm.utils.cpu_resource_utils")
    ours = read_node_memory()
    theirs = cpu_utils.get_memory_node_info(ours.node or 0)
    assert ours.total == theirs.total_memory
    assert abs(ours.available - theirs.available_memory) <= 0.05 * theirs.total_memory


# --- the command ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama) -> Path:
    from serving.testing import make_peft_adapter

    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("kv") / "a", seed=3, rank=8)


def test_flags_only_dry_run_has_an_explicit_kv_cache_on_cpu(capsys, tiny_llama, adapter):
    """`pissa serve --base X --adapter a=Y --dry-run` without --kv-cache, on a CPU machine: the command carries
    `--kv-cache-memory-bytes N` (vLLM's default would want 0.92 of the node) and the output says why."""
    from serving.kv_cache import cuda_available

    if cuda_available():
        pytest.skip("on GPU vLLM's default is kept")
    code = run(["serve", "--base", str(tiny_llama), "--adapter", f"a={adapter}", "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    argv = shlex.split(lines[-1])
    kv = int(argv[argv.index("--kv-cache-memory-bytes") + 1])
    assert 64 * MIB <= kv <= GIB and kv % MIB == 0
    assert argv[argv.index("--max-model-len") + 1] == "auto"
    assert lines[0].startswith("KV cache: ") and "free on " in lines[0] and "vllm.kv_cache_memory_bytes" in lines[0]


@pytest.mark.vllm
def test_flags_only_serve_starts_on_cpu(tmp_path, tiny_llama, adapter):
    """One real start of `pissa serve --base TINY --adapter a=ADAPTER` with no KV cache size given: vLLM comes
    up with the chosen size, serves the adapter, and stops on SIGINT."""
    port = free_port()
    out_path, log = tmp_path / "pissa-serve.out", tmp_path / "vllm.log"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pissa", "serve", "--base", str(tiny_llama), "--adapter",
                                 f"a={adapter}", "--port", str(port), "--log-file", str(log)],
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while "vLLM is up" not in out_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("pissa serve did not come up:\n" + out_path.read_text()[-3000:])
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
            models = r.read().decode()
        assert '"a"' in models
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    text = out_path.read_text()
    assert code == 0, text[-2000:]
    assert "  KV cache: " in text and "chosen from" in text
    assert "Explicitly set" in log.read_text()  # vLLM's own line for an explicit KV cache size
