"""The prompt-logprobs LoRA fix (serving/vllm_prompt_logprobs.py): row → slot maths, the patched
runner method on vLLM's real CPU punica wrapper, and a real engine with and without the fix.

The maths: the prompt-logprobs logits rows of request i are the hidden states of its scheduled tokens,
rows ``qsl[i] .. qsl[i] + n_i - 1`` of the batch (``qsl`` = query start locations); each must get the
LoRA slot of request i (-1: base, no adapter). Checked per row against a loop over the layout, exactly.

On the real ``PunicaWrapperCPU``, the logits LoRA delta of row r must be
``(h_r @ A[s_r]ᵀ) @ B[s_r]ᵀ`` for its slot s_r (0 for s_r = -1): rtol 1e-5, atol 1e-6 (vLLM keeps
the rank-r intermediate in float32; the rest is float64). vLLM's own method raises on the same batch (6 rows, 3 request indices).

The engine test (offline API in a subprocess, fp32, tiny Llama, two adapters that also target
``lm_head`` so a wrong slot on a logits row shows in the numbers) sends two batches mixing base and
both adapters with ``prompt_logprobs=1``: six text prompts (the crash shape) and three 4-token prompts
(3 logits rows per request = 3 requests: vLLM's mapping does not crash there, it silently gives row k
request k's adapter). With the fix, every prompt token's logprob equals transformers + PEFT's
(fp32, atol 1e-4; 5e-7 seen). With the fix switched off (``PISSA_VLLM_PROMPT_LOGPROBS_FIX=0``): the
first batch kills the engine with the einsum error, the second returns wrong logprobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from types import ModuleType, SimpleNamespace

import pytest
import torch

from serving import vllm_prompt_logprobs as vpl
from serving.vllm_prompt_logprobs import prompt_row_slots, view_rows

# A batch layout: 4 requests, scheduled-token counts and LoRA slots (-1 = base).
LENGTHS = [4, 1, 6, 3]
SLOTS = [0, -1, 1, 0]
HIDDEN = 5


def _layout() -> tuple[list[int], torch.Tensor]:
    qsl = [0]
    for n in LENGTHS:
        qsl.append(qsl[-1] + n)
    token_slots = torch.tensor([s for s, n in zip(SLOTS, LENGTHS) for _ in range(n)])
    return qsl, token_slots


def _request_of_row(qsl: list[int], row: int) -> int:
    for i in range(len(qsl) - 1):
        if qsl[i] <= row < qsl[i + 1]:
            return i
    raise AssertionError(row)


@pytest.mark.parametrize("drop", [0, 1])  # n_i = scheduled tokens (a chunk) or one fewer (last chunk)
def test_row_slots_match_per_row_reference(drop):
    qsl, token_slots = _layout()
    hidden = torch.randn(qsl[-1], HIDDEN)[: qsl[-1]]  # as the runner passes hidden_states[:num_scheduled]
    for i, n in enumerate(LENGTHS):
        n_logits = max(n - drop, 0)
        window = hidden[qsl[i] : qsl[i] + n_logits]  # what _get_prompt_logprobs_dict slices
        rows = view_rows(window, hidden)
        assert rows == (qsl[i], n_logits)
        slots = prompt_row_slots(token_slots, *rows)
        for j in range(n_logits):
            assert slots[j].item() == SLOTS[_request_of_row(qsl, qsl[i] + j)], (i, j)


def test_view_rows_refuses_what_is_not_a_row_window():
    hidden = torch.randn(8, HIDDEN)
    assert view_rows(hidden, hidden) == (0, 8)
    assert view_rows(hidden[3:3], hidden) == (3, 0)
    assert view_rows(hidden[2:5].clone(), hidden) is None  # a copy: rows unknown
    assert view_rows(hidden[:, 1:], hidden) is None  # columns
    assert view_rows(hidden[::2], hidden) is None  # strided rows
    assert view_rows(hidden.view(-1)[1 : 1 + HIDDEN].view(1, HIDDEN), hidden) is None  # not on a row boundary
    outer = torch.randn(12, HIDDEN)
    assert view_rows(outer[9:12], outer[:8]) is None  # past the base's rows
    assert view_rows(outer[4:6], outer[2:10]) == (2, 2)  # base itself a view


def test_row_slots_refuse_rows_outside_the_batch():
    _, token_slots = _layout()
    with pytest.raises(ValueError, match="outside a batch of 14 tokens"):
        prompt_row_slots(token_slots, 12, 3)


# --- the patched method on vLLM's real CPU wrapper -------------------------------------------------
class _FakeModel:
    """``compute_logits`` as LogitsProcessorWithLoRA does it, minus the base head: y += LoRA(h)."""

    def __init__(self, punica, lora_a, lora_b):
        self.punica, self.lora_a, self.lora_b = punica, lora_a, lora_b

    def compute_logits(self, h):
        y = torch.zeros(h.shape[0], self.lora_b.shape[2], dtype=h.dtype)
        self.punica.add_lora_logits(y, h, self.lora_a, self.lora_b, 1.0)
        return y


def _fake_prompt_logprobs(self, hidden_states, num_scheduled_tokens):
    """vLLM's loop reduced to its slicing: one compute_logits per request over its prompt rows."""
    return {i: self.model.compute_logits(hidden_states[off : off + n]) for i, (off, n) in enumerate(self.windows)}


@pytest.fixture
def cpu_runner():
    pytest.importorskip("vllm")
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    qsl, token_slots = _layout()
    lora_ids = [s + 1 for s in SLOTS]  # slot s holds LoRA id s + 1; 0 = none
    punica = PunicaWrapperCPU(64, 8, "cpu")
    mapping = LoRAMapping([lora_ids[i] for i, n in enumerate(LENGTHS) for _ in range(n)], lora_ids, is_prefill=True)
    punica.update_metadata(mapping, [1, 2], 3, 7)
    g = torch.Generator().manual_seed(0)
    lora_a = torch.randn(2, 1, 3, HIDDEN, generator=g, dtype=torch.float64)
    lora_b = torch.randn(2, 1, 7, 3, generator=g, dtype=torch.float64)
    runner = SimpleNamespace(model=_FakeModel(punica, lora_a, lora_b), num_prompt_logprobs={"r": 1},
                             windows=[(qsl[i], n - 1) for i, n in enumerate(LENGTHS)])
    runner.__dict__[vpl._PUNICA_CACHE] = (runner.model, punica)  # what _cpu_logits_punica finds in a real runner
    hidden = torch.randn(qsl[-1], HIDDEN, generator=g, dtype=torch.float64)
    return runner, punica, hidden, lora_a, lora_b


@pytest.mark.vllm
def test_patched_method_gives_each_row_its_request_adapter(cpu_runner):
    runner, punica, hidden, lora_a, lora_b = cpu_runner
    before = punica.sampler_indices.clone()
    with pytest.raises(RuntimeError, match="einsum"):  # vLLM's mapping on this batch: the engine crash
        _fake_prompt_logprobs(runner, hidden, None)
    got = vpl.fixed_prompt_logprobs(_fake_prompt_logprobs)(runner, hidden, None)
    for i, (off, n) in enumerate(runner.windows):
        for j in range(n):
            s = SLOTS[i]
            h = hidden[off + j]
            want = torch.zeros(7, dtype=torch.float64) if s < 0 else (h @ lora_a[s, 0].T) @ lora_b[s, 0].T
            torch.testing.assert_close(got[i][j], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(punica.sampler_indices, before)  # per-request mapping back for the sampling rows
    assert "compute_logits" not in runner.model.__dict__  # the model's own method back


@pytest.mark.vllm
def test_probe_and_patch_runner(monkeypatch):
    assert vpl.logits_lora_is_per_request()  # vLLM 0.32's CPU wrapper: the bug is there

    def fresh() -> ModuleType:
        module = ModuleType("fake_runner")
        module.GPUModelRunner = type("GPUModelRunner", (), {"_get_prompt_logprobs_dict": _fake_prompt_logprobs})
        return module

    module = fresh()
    assert vpl.patch_runner(module)
    assert getattr(module.GPUModelRunner._get_prompt_logprobs_dict, vpl._FIXED_MARK)
    assert not vpl.patch_runner(module)  # idempotent
    monkeypatch.setenv(vpl.ENV_SWITCH, "0")
    module = fresh()
    assert not vpl.patch_runner(module)
    assert module.GPUModelRunner._get_prompt_logprobs_dict is _fake_prompt_logprobs
    monkeypatch.setattr(vpl, "logits_lora_is_per_request", lambda: False)  # a fixed vLLM: left alone
    monkeypatch.delenv(vpl.ENV_SWITCH)
    assert not vpl.patch_runner(module)
    assert module.GPUModelRunner._get_prompt_logprobs_dict is _fake_prompt_logprobs


def test_post_import_hook_patches_on_first_import(tmp_path, monkeypatch):
    (tmp_path / "pissa_fake_runner_mod.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = vpl._PostImportHook("pissa_fake_runner_mod", lambda m: seen.append(m.VALUE))
    sys.meta_path.insert(0, hook)
    try:
        import pissa_fake_runner_mod  # noqa: F401

        assert seen == [1] and hook not in sys.meta_path
    finally:
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)
        sys.modules.pop("pissa_fake_runner_mod", None)


# --- the real engine ------------------------------------------------------------------------------
ENGINE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    wanted, base, adapters = sys.argv[1].split(","), sys.argv[2], sys.argv[3:]
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, max_cpu_loras=2,
              kv_cache_memory_bytes=64 * 2**20, max_model_len=256, seed=0, enforce_eager=True)
    loras = [None] + [LoRARequest(f"t{k}", k + 1, p) for k, p in enumerate(adapters)]
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    batches = {
        "six_text": [f"The capital {i} of France is a city" for i in range(6)],
        "three_4_tokens": [{"prompt_token_ids": [7 + i, 40 + i, 99, 120 + 3 * i]} for i in range(3)],
    }
    from serving import vllm_prompt_logprobs
    result = {}
    for name in wanted:
        prompts = batches[name]
        try:
            outs = llm.generate(prompts, sp, lora_request=[loras[i % 3] for i in range(len(prompts))])
        except Exception as exc:
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            break
        result[name] = {"ids": [o.prompt_token_ids for o in outs],
                        "logprobs": [[d[o.prompt_token_ids[j]].logprob for j, d in enumerate(o.prompt_logprobs) if j]
                                     for o in outs]}
    print("RESULT " + json.dumps({"fix": vllm_prompt_logprobs.is_active(), **result}))
    """
)


@pytest.fixture(scope="module")
def lm_head_tenants(tmp_path_factory, tiny_llama):
    from serving.testing import LLAMA_TARGETS, make_peft_adapter

    root = tmp_path_factory.mktemp("lm-head-tenants")
    return [make_peft_adapter(tiny_llama, root / f"t{k}", seed=300 + k, targets=(*LLAMA_TARGETS, "lm_head"))
            for k in range(2)]


def _run_engine(tmp_path, base, adapters, fix: bool, batches: str = "six_text,three_4_tokens") -> dict:
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", vpl.ENV_SWITCH)}
    if not fix:
        env[vpl.ENV_SWITCH] = "0"
    proc = subprocess.run([sys.executable, str(script), batches, str(base), *map(str, adapters)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _reference_logprobs(base, adapters, ids: list[list[int]]) -> list[torch.Tensor]:
    """Per prompt i (model i % 3: base, t0, t1): log p(token j+1 | tokens ≤ j) from transformers + PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = []
    for i, prompt in enumerate(ids):
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        if i % 3:
            model = PeftModel.from_pretrained(model, str(adapters[i % 3 - 1]))
        with torch.no_grad():
            logits = model.eval()(torch.tensor([prompt])).logits[0]
        out.append(torch.log_softmax(logits.float(), -1)[:-1].gather(1, torch.tensor(prompt[1:]).unsqueeze(1))[:, 0])
    return out


@pytest.mark.vllm
@pytest.mark.slow
def test_engine_prompt_logprobs_mixed_adapters(tmp_path, tiny_llama, lm_head_tenants):
    fixed = _run_engine(tmp_path, tiny_llama, lm_head_tenants, fix=True)
    assert fixed["fix"] is True
    worst = 0.0
    for name in ("six_text", "three_4_tokens"):
        ref = _reference_logprobs(tiny_llama, lm_head_tenants, fixed[name]["ids"])
        for i, (want, got) in enumerate(zip(ref, fixed[name]["logprobs"])):
            torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=1e-4, msg=f"{name} prompt {i}")
            worst = max(worst, (torch.tensor(got) - want).abs().max().item())
    # the adapters really move the logprobs (else a wrong slot could not be seen)
    ref = _reference_logprobs(tiny_llama, lm_head_tenants, [fixed["six_text"]["ids"][0]] * 3)
    assert (ref[1] - ref[0]).abs().max() > 0.05 and (ref[2] - ref[1]).abs().max() > 0.05

    broken = _run_engine(tmp_path, tiny_llama, lm_head_tenants, fix=False)
    print(f"\nwith the fix: worst |Δ logprob| {worst:.2e}; without: {broken.get('six_text')}")
    assert broken["fix"] is False
    # vLLM's own ops (einsum) and the plugin's fast ops (serving/lora_ops.py) refuse the mismatch alike
    error = broken["six_text"]["error"]
    assert "einsum" in error or "LoRA indices" in error, broken  # the engine is dead after this


@pytest.mark.vllm
@pytest.mark.slow
def test_engine_without_fix_is_silently_wrong_when_rows_equal_requests(tmp_path, tiny_llama, lm_head_tenants):
    """3 requests × 3 logits rows: vLLM's per-request mapping does not crash, it gives row k request k's
    adapter. Run without the fix only (the fixed run is in the test above)."""
    broken = _run_engine(tmp_path, tiny_llama, lm_head_tenants, fix=False, batches="three_4_tokens")["three_4_tokens"]
    assert "error" not in broken, broken
    ref = _reference_logprobs(tiny_llama, lm_head_tenants, broken["ids"])
    errors = [(torch.tensor(got) - want).abs().max().item() for want, got in zip(ref, broken["logprobs"])]
    print(f"\nwithout the fix, 3x3 rows: max |Δ logprob| per prompt {errors}")
    assert max(errors) > 1e-2, errors
