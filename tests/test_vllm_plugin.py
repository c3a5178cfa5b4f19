"""The CPU mixed-batch LoRA fix (serving/vllm_plugin.py): op-level equivalence and a real vLLM run.

The op tests pin the maths: for row b with slot index i_b,
    shrink:  out_b = scaling · x_b @ A[i_b]ᵀ  if i_b >= 0, else 0
    expand:  y_b  += x_b @ B[i_b]ᵀ            if i_b >= 0, else y_b unchanged
against a per-row loop, with exact equality (same einsum per row; tolerance 0 in float64).

The engine test runs vLLM (offline API, in a subprocess, fp32, greedy) on the tiny Llama with two
tenant adapters and two LoRA slots: 24 prompts each for the base and both adapters, all submitted
together so base rows share batches with adapter rows while every slot is busy. Each answer is
compared with its reference (the same prompt alone on a fresh engine for the base, and with only
that adapter in the batch). With the plugin excluded (``VLLM_PLUGINS=``) base answers are wrong;
with it, zero answers are wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from serving import vllm_plugin
from serving.vllm_plugin import bgmv_expand, bgmv_expand_slice, bgmv_shrink, ops_have_negative_index_bug

SLOTS, R, IN, OUT = 3, 4, 6, 5


def _weights(seed: int, out: int, inn: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SLOTS, 1, out, inn, generator=g, dtype=torch.float64)


INDICES = torch.tensor([0, -1, 2, -1, 1, 2])


def _loop_reference(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> list[torch.Tensor | None]:
    return [None if i < 0 else torch.einsum("i,oi->o", x[b], w[i, 0]) for b, i in enumerate(idx.tolist())]


def test_shrink_matches_per_row_reference():
    x = torch.randn(len(INDICES), IN, dtype=torch.float64)
    a = _weights(1, R, IN)
    out = torch.full((len(INDICES), R), 7.0, dtype=torch.float64)
    bgmv_shrink(x, a, out, INDICES, 0.5)
    for b, ref in enumerate(_loop_reference(x, a, INDICES)):
        expected = torch.zeros(R, dtype=torch.float64) if ref is None else 0.5 * ref
        assert torch.equal(out[b], expected), b


@pytest.mark.parametrize("add", [True, False])
def test_expand_matches_per_row_reference(add):
    x = torch.randn(len(INDICES), R, dtype=torch.float64)
    b_w = _weights(2, OUT, R)
    y0 = torch.randn(len(INDICES), OUT, dtype=torch.float64)
    y = y0.clone()
    bgmv_expand(x, b_w, y, INDICES, add_inputs=add)
    for b, ref in enumerate(_loop_reference(x, b_w, INDICES)):
        expected = y0[b] if ref is None else (y0[b] + ref if add else ref)
        assert torch.equal(y[b], expected), b


@pytest.mark.parametrize("add", [True, False])
def test_expand_slice_touches_only_its_slice(add):
    x = torch.randn(len(INDICES), R, dtype=torch.float64)
    b_w = _weights(3, OUT, R)
    y0 = torch.randn(len(INDICES), OUT + 4, dtype=torch.float64)
    y = y0.clone()
    bgmv_expand_slice(x, b_w, y, INDICES, 2, OUT, add_inputs=add)
    assert torch.equal(y[:, :2], y0[:, :2]) and torch.equal(y[:, 2 + OUT:], y0[:, 2 + OUT:])
    for b, ref in enumerate(_loop_reference(x, b_w, INDICES)):
        window = y0[b, 2 : 2 + OUT]
        expected = window if ref is None else (window + ref if add else ref)
        assert torch.equal(y[b, 2 : 2 + OUT], expected), b


def test_ops_choice_and_speed_probe():
    assert vllm_plugin.chosen_ops({}) is vllm_plugin.FAST_OPS
    assert vllm_plugin.chosen_ops({"PISSA_CPU_LORA_OPS": "fixed"}) is vllm_plugin.FIXED_OPS
    assert vllm_plugin.chosen_ops({"PISSA_CPU_LORA_OPS": "bogus"}) is vllm_plugin.FAST_OPS
    faster, theirs, ours = vllm_plugin.fast_ops_are_faster(bgmv_shrink, bgmv_expand_slice, repeats=2)
    assert isinstance(faster, bool) and theirs > 0 and ours > 0  # timings only: no speed asserted here
    assert not ops_have_negative_index_bug(vllm_plugin.FAST_OPS["bgmv_shrink"])


def test_probe_tells_fixed_from_buggy():
    assert not ops_have_negative_index_bug(bgmv_shrink)

    def buggy(inputs, w, out, idx, scaling=1.0):  # vLLM 0.32's gather, reduced to its essence
        out[:] = scaling * torch.einsum("bi,boi->bo", inputs, w[idx].squeeze(1))

    assert ops_have_negative_index_bug(buggy)


@pytest.mark.vllm
def test_installed_vllm_ops_are_buggy_and_get_patched():
    """The installed vLLM shows the bug; after register() its ops (and punica_cpu's) are the fixed ones,
    and they agree with the originals on every row that has an adapter."""
    import importlib

    names = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops", "vllm.lora.punica_wrapper.punica_cpu")
    modules = [importlib.import_module(n) for n in names]
    lora_ops, _, punica_cpu = modules
    if vllm_plugin.is_active():
        pytest.skip("already patched in this process")
    saved = {(m, op): getattr(m, op) for m in modules for op in vllm_plugin.FAST_OPS if hasattr(m, op)}
    original = lora_ops.bgmv_shrink
    if not ops_have_negative_index_bug(original):
        pytest.skip("this vLLM's CPU ops handle index -1: the plugin is a no-op")
    x = torch.randn(len(INDICES), IN, dtype=torch.float64)
    a = _weights(4, R, IN)
    want = torch.zeros(len(INDICES), R, dtype=torch.float64)
    original(x, a, want, INDICES, 1.0)
    try:
        vllm_plugin.register()
        assert vllm_plugin.is_active()
        chosen = vllm_plugin.chosen_ops()  # the fast ops unless PISSA_CPU_LORA_OPS=fixed
        assert punica_cpu.bgmv_shrink is chosen["bgmv_shrink"]
        assert punica_cpu.bgmv_expand_slice is chosen["bgmv_expand_slice"]
        if chosen is vllm_plugin.FAST_OPS:
            assert punica_cpu.sgmv_shrink is chosen["sgmv_shrink"] and lora_ops.sgmv_expand is chosen["sgmv_expand"]
        got = torch.zeros_like(want)
        lora_ops.bgmv_shrink(x, a, got, INDICES, 1.0)
        rows = INDICES >= 0
        assert torch.allclose(got[rows], want[rows], rtol=0, atol=1e-12)  # float64; GEMM vs einsum order
        assert torch.count_nonzero(got[~rows]) == 0 and torch.count_nonzero(want[~rows]) > 0
        vllm_plugin.register()  # idempotent
        assert lora_ops.bgmv_shrink is chosen["bgmv_shrink"]
    finally:
        for (module, op), fn in saved.items():
            setattr(module, op, fn)


# --- the real engine ------------------------------------------------------------------------------
MIXED_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from serving import lora_fused  # count which fused path each LoRA layer call takes (engine in-process)
    paths = {"masked": 0, "packed": 0, "grouped": 0}  # masked: torch's GEMMs; packed: oneDNN on packed matrices
    def counted(name, fn):
        def call(*args, **kwargs):
            paths[name] += 1
            return fn(*args, **kwargs)
        return call
    lora_fused.fused_lora_linear = counted("masked", lora_fused.fused_lora_linear)
    lora_fused.grouped_lora_linear = counted("grouped", lora_fused.grouped_lora_linear)
    lora_fused.packed_lora_linear = counted("packed", lora_fused.packed_lora_linear)

    base, adapters = sys.argv[1], sys.argv[2:]
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=len(adapters), max_lora_rank=8,
              max_cpu_loras=len(adapters), kv_cache_memory_bytes=64 * 2**20, max_model_len=256, seed=0,
              enforce_eager=True)
    sp = SamplingParams(temperature=0, max_tokens=12)
    prompts = [f"The capital {i} of France is" if i % 2 else f"Question: what is {i} times 8?"
               for i in range(int(os.environ.get("MIXED_PROMPTS", "24")))]
    loras = [LoRARequest(f"t{k}", k + 1, path) for k, path in enumerate(adapters)]
    # References: the base on a fresh engine (slots still empty), then each adapter alone.
    ref = {-1: [o.outputs[0].text for o in llm.generate(prompts, sp)]}
    for k, lora in enumerate(loras):
        ref[k] = [o.outputs[0].text for o in llm.generate(prompts, sp, lora_request=lora)]
    jobs = [(i, k) for i in range(len(prompts)) for k in [-1, *range(len(loras))]]
    outs = llm.generate([prompts[i] for i, _ in jobs], sp,
                        lora_request=[None if k < 0 else loras[k] for _, k in jobs])
    wrong = {str(k): 0 for k in ref}
    for (i, k), o in zip(jobs, outs):
        wrong[str(k)] += o.outputs[0].text != ref[k][i]
    from serving import vllm_plugin
    distinct = {str(k): sum(ref[-1][i] != ref[k][i] for i in range(len(prompts))) for k in range(len(loras))}
    print("RESULT " + json.dumps({"plugin": vllm_plugin.is_active(), "wrong": wrong, "requests": len(jobs),
                                   "differs_from_base": distinct, "fused_paths": paths}))
    """
)


def _run_mixed(tmp_path, base, adapters, plugins: str | None, prompts: int = 24) -> dict:
    script = tmp_path / "mixed.py"
    script.write_text(MIXED_SCRIPT)
    env = dict(os.environ, MIXED_PROMPTS=str(prompts))
    env.pop("VLLM_PLUGINS", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    proc = subprocess.run([sys.executable, str(script), str(base), *map(str, adapters)], env=env,
                          capture_output=True, text=True, timeout=420, cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def two_tenants(tmp_path_factory, tiny_llama):
    from serving.testing import make_peft_adapter

    root = tmp_path_factory.mktemp("mixed-tenants")
    return [make_peft_adapter(tiny_llama, root / f"t{k}", seed=200 + k) for k in range(2)]


@pytest.mark.vllm
@pytest.mark.slow
def test_mixed_batch_wrong_without_plugin_zero_wrong_with_it(tmp_path, tiny_llama, two_tenants):
    from vllm.lora.ops.torch_ops import lora_ops

    from serving import lora_fused

    fixed = getattr(lora_ops.bgmv_shrink, "_pissa_cpu_lora_fix", False)
    if not fixed and not ops_have_negative_index_bug(lora_ops.bgmv_shrink):
        pytest.skip("this vLLM's CPU ops handle index -1 themselves: nothing to show")
    without = _run_mixed(tmp_path, tiny_llama, two_tenants, plugins="")
    with_fix = _run_mixed(tmp_path, tiny_llama, two_tenants, plugins=None)
    print(f"\nmixed batch without the plugin: {without}\nwith the plugin: {with_fix}")
    assert without["plugin"] is False and with_fix["plugin"] is True
    # The tenants really change the output (else a wrong slot could not be seen).
    assert min(with_fix["differs_from_base"].values()) >= 20, with_fix
    assert with_fix["requests"] == 72
    # Without the fix, base rows get the last slot's adapter (24/24 observed on this machine).
    assert without["wrong"]["-1"] > 0, without
    assert with_fix["wrong"] == {"-1": 0, "0": 0, "1": 0}, with_fix
    paths = with_fix["fused_paths"]  # 2 slots: masked, its GEMMs on packed matrices where vLLM has oneDNN
    assert paths["grouped"] == 0 and paths["packed" if lora_fused.onednn_ops() is not None else "masked"] > 0, paths


@pytest.mark.vllm
@pytest.mark.slow
def test_many_slots_take_the_grouped_path_with_zero_wrong(tmp_path, tiny_llama):
    """12 tenants in 12 LoRA slots (at least GROUPED_MIN_SLOTS): decode batches mixing all of them and the base
    take the grouped fused path (rows gathered by slot), and every answer equals its reference (the base on a
    fresh engine, each adapter alone)."""
    from vllm.lora.ops.torch_ops import lora_ops

    from serving import lora_fused
    from serving.testing import make_peft_adapter

    n = 12
    assert n >= lora_fused.GROUPED_MIN_SLOTS
    tenants = [make_peft_adapter(tiny_llama, tmp_path / f"g{k}", seed=300 + k) for k in range(n)]
    result = _run_mixed(tmp_path, tiny_llama, tenants, plugins=None, prompts=8)
    print(f"\n12 slots: {result}")
    buggy = getattr(lora_ops.bgmv_shrink, "_pissa_cpu_lora_fix", False) or ops_have_negative_index_bug(
        lora_ops.bgmv_shrink)
    if not buggy and not any(result["fused_paths"].values()):
        pytest.skip("this vLLM's CPU ops are correct and the plugin kept them: no fused path to test")
    assert result["plugin"] is True and result["requests"] == 8 * (n + 1)
    assert result["fused_paths"]["grouped"] > 0, result
    assert min(result["differs_from_base"].values()) >= 4, result  # each tenant changes most answers
    assert set(result["wrong"].values()) == {0}, result
