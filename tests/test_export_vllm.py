"""A ``--rank auto`` export loads in vLLM (offline engine) with the ``--max-lora-rank`` it reports, and
vLLM's greedy tokens equal transformers' for (original base + exported adapter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    base, adapter, max_rank, prompts = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    llm = LLM(base, dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=max_rank,
              kv_cache_memory_bytes=64 * 2**20, max_model_len=128, seed=0, enforce_eager=True)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tp = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    with_lora = [list(o.outputs[0].token_ids) for o in llm.generate(tp, sp, lora_request=LoRARequest("x", 1, adapter))]
    without = [list(o.outputs[0].token_ids) for o in llm.generate(tp, sp)]
    print("RESULT " + json.dumps({"lora": with_lora, "base": without}))
    """
)


def test_rank_auto_export_serves_in_vllm(tmp_path, tiny_llama_bundle, tiny_llama):
    import torch
    from test_export import base_with_adapter, fake_training

    from converter.export import export

    trained, _ = fake_training(tiny_llama_bundle, tmp_path, scale=1.0)
    out = tmp_path / "auto"
    report = export(trained, out, rank="auto", tol=0.4)  # worst-layer error: 0.35 at rank 8, 0.92 at 1
    assert report.mode == "compressed" and report.rank == report.max_lora_rank == 8
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True and not cfg.get("use_dora")

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(6, 320, (n,), generator=g).tolist() for n in (5, 9, 12, 7)]
    script = tmp_path / "serve.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tiny_llama), str(out), str(report.max_lora_rank),
                           json.dumps(prompts)], capture_output=True, text=True, timeout=420, cwd=tmp_path,
                          env=dict(os.environ))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])

    model = base_with_adapter(tiny_llama, out)
    want = []
    for p in prompts:
        with torch.no_grad():
            ids = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=1)
        want.append(ids[0, len(p):].tolist())
    assert got["lora"] == want
    assert got["lora"] != got["base"]  # the adapter is really applied
