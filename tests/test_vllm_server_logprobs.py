"""A real `pissa serve` under the requests evaluation tools and ordinary clients send, mixed across
the base and two adapters (issue 11: one such request used to kill vLLM's engine core on CPU).

One module-scoped server: the tiny Llama (fp32, 64 MiB KV cache, 2 LoRA slots, eager) with two PEFT
adapters that target every linear layer AND ``lm_head``, so the logits LoRA really differs per
tenant and a prompt token scored with the wrong tenant's slot shows in the numbers.

1. Prompt-token logprobs: 24 concurrent requests, ``echo=True, logprobs=1, max_tokens=1`` and
   ``prompt_logprobs=1``, over 4 prompts × (base, t0, t1). Every prompt token's logprob equals
   transformers + PEFT's for the request's own model, fp32, atol 1e-4 (about 1e-6 seen). Without the
   plugin's prompt-logprobs fix the first such batch kills the engine (``einsum(): subscript b ...``;
   tests/test_vllm_prompt_logprobs.py shows it on the engine).
2. A request-shape matrix: each shape sent as 6 concurrent requests (2 per model), then all shapes at
   once; a 5xx or a dropped connection fails; a 4xx is allowed only where the API may refuse the
   request (``max_tokens: 0``, an empty prompt). After each shape ``/health`` is 200 and a greedy
   control completion per model equals transformers + PEFT's token ids.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from procs import serve_from_manifest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MODELS = ("base", "t0", "t1")
PROMPTS = ["The capital of France is", "def add(a, b):", "What is 3 times 4?", "Hello world, hello"]
CONTROL = "The quick brown fox"
CONTROL_TOKENS = 8


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    from serving.testing import LLAMA_TARGETS, make_peft_adapter

    root = tmp_path_factory.mktemp("lm-head-adapters")
    return {f"t{k}": make_peft_adapter(tiny_llama, root / f"t{k}", seed=300 + k, targets=(*LLAMA_TARGETS, "lm_head"))
            for k in range(2)}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama, adapters):
    """``python -m pissa serve MANIFEST``; yields (url, log path); SIGINT at teardown."""
    root = tmp_path_factory.mktemp("serve-logprobs")
    url, log, proc = serve_from_manifest(root, tiny_llama, adapters, timeout=360, max_loras=2, max_cpu_loras=2,
                                         max_lora_rank=8, health_timeout=300)
    yield url, log
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, (root / "pissa-serve.out").read_text()[-2000:]


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def hf_models(tiny_llama, adapters) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models: dict[str, Any] = {"base": AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()}
    for name, path in adapters.items():
        base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
        models[name] = PeftModel.from_pretrained(base, str(path)).eval()
    return models


def _hf_prompt_logprobs(model, ids: list[int]):
    """log p(ids[j] | ids[:j]) for j = 1 .. len(ids) - 1."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1))[:, 0]


@pytest.fixture(scope="module")
def control_refs(tiny_llama, hf_models) -> dict[str, list[int]]:
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    ids = tok(CONTROL, return_tensors="pt").input_ids
    refs = {}
    for name, model in hf_models.items():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=CONTROL_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        refs[name] = out[0, ids.shape[1]:].tolist()
    return refs


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def _control_ok(client, control_refs) -> list[str]:
    """Models whose greedy control completion differs from transformers + PEFT's (empty: all correct)."""
    wrong = []
    for name in MODELS:
        r = client.completions.create(model=name, prompt=CONTROL, max_tokens=CONTROL_TOKENS, temperature=0,
                                      extra_body={"return_token_ids": True})
        if list(r.choices[0].model_extra["token_ids"]) != control_refs[name]:
            wrong.append(name)
    return wrong


# --- 1. prompt-token logprobs, mixed tenants, concurrent -----------------------------------------
def _echo_logprobs(client, model: str, prompt: str) -> tuple[list[int], list[float]]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0,
                                  extra_body={"return_token_ids": True})
    choice = r.choices[0]
    ids = list(choice.model_extra["prompt_token_ids"])
    token_logprobs = choice.logprobs.token_logprobs
    assert token_logprobs[0] is None and len(token_logprobs) == len(ids) + 1  # prompt + the 1 generated
    return ids, [float(x) for x in token_logprobs[1 : len(ids)]]


def _prompt_logprobs(client, model: str, prompt: str) -> tuple[list[int], list[float]]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0,
                                  extra_body={"prompt_logprobs": 1, "return_token_ids": True})
    choice = r.choices[0]
    ids = list(choice.model_extra["prompt_token_ids"])
    entries = choice.model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    return ids, [float(entries[j][str(ids[j])]["logprob"]) for j in range(1, len(ids))]


def test_plugin_patched_the_engine(server):
    text = server[1].read_text()
    assert "patched GPUModelRunner._get_prompt_logprobs_dict" in text, text[-3000:]


def test_concurrent_prompt_logprobs_equal_transformers_peft(server, client, hf_models):
    import torch

    jobs = [(kind, model, prompt) for kind in ("echo", "prompt_logprobs") for prompt in PROMPTS for model in MODELS]
    call = {"echo": _echo_logprobs, "prompt_logprobs": _prompt_logprobs}
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(lambda j: call[j[0]](client, j[1], j[2]), jobs))
    assert _healthy(server[0])
    worst = 0.0
    for (kind, model, prompt), (ids, got) in zip(jobs, answers):
        want = _hf_prompt_logprobs(hf_models[model], ids)
        torch.testing.assert_close(torch.tensor(got), want, rtol=0, atol=1e-4, msg=f"{kind} {model} {prompt!r}")
        worst = max(worst, (torch.tensor(got) - want).abs().max().item())
    # The tenants really score differently (else a request scored with the wrong slot would pass).
    ids = answers[0][0]
    per_model = [_hf_prompt_logprobs(hf_models[m], ids) for m in MODELS]
    assert min((per_model[a] - per_model[b]).abs().max().item() for a, b in ((0, 1), (0, 2), (1, 2))) > 0.05
    print(f"\n{len(jobs)} concurrent prompt-logprob requests: worst |Δ logprob| vs transformers+PEFT {worst:.2e}")


# --- 2. the request-shape matrix ------------------------------------------------------------------
def _chat_logprobs(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi there"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    assert all(len(t.top_logprobs) == 3 for t in r.choices[0].logprobs.content)


def _n3(client, model):
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=4, n=3, temperature=0.8, seed=1)
    assert len(r.choices) == 3


def _stop(client, model):
    r = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=8, temperature=0, stop=["a", " "])
    assert "a" not in r.choices[0].text and " " not in r.choices[0].text


def _seed(client, model):
    a, b = (client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=6, temperature=1.0, seed=1234)
            for _ in range(2))
    assert a.choices[0].text == b.choices[0].text


def _stream_usage(client, model):
    chunks = list(client.completions.create(model=model, prompt=PROMPTS[3], max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 5


def _json_object(client, model):
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "JSON please"}], max_tokens=6,
                                   temperature=0, response_format={"type": "json_object"})


def _logit_bias(client, model):
    r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                  logit_bias={"42": 100}, extra_body={"return_token_ids": True})
    assert list(r.choices[0].model_extra["token_ids"]) == [42, 42, 42]


def _presence_penalty(client, model):
    client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=6, temperature=0, presence_penalty=1.5,
                              frequency_penalty=0.5)


def _max_tokens(n: int) -> Callable[[Any, str], None]:
    def shape(client, model):
        r = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=n, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        assert len(r.choices[0].model_extra["token_ids"] or []) == n

    return shape


def _empty_prompt(client, model):
    client.completions.create(model=model, prompt="", max_tokens=3, temperature=0)


def _token_ids(client, model):
    r = client.completions.create(model=model, prompt=[[5, 17, 99, 120], [7, 8]], max_tokens=3, temperature=0)
    assert len(r.choices) == 2


def _echo(client, model):
    _echo_logprobs(client, model, PROMPTS[0])


def _prompt_lp(client, model):
    _prompt_logprobs(client, model, PROMPTS[1])


# name -> (shape, 4xx allowed)
SHAPES: dict[str, tuple[Callable[[Any, str], None], bool]] = {
    "chat logprobs/top_logprobs": (_chat_logprobs, False),
    "n=3": (_n3, False),
    "stop": (_stop, False),
    "seed": (_seed, False),
    "stream + usage": (_stream_usage, False),
    "response_format json_object": (_json_object, False),
    "logit_bias": (_logit_bias, False),
    "presence/frequency penalty": (_presence_penalty, False),
    "max_tokens 0": (_max_tokens(0), True),
    "max_tokens 1": (_max_tokens(1), False),
    "empty prompt": (_empty_prompt, True),
    "token-id prompts": (_token_ids, False),
    "echo + logprobs": (_echo, False),
    "prompt_logprobs": (_prompt_lp, False),
}


def _outcome(shape: Callable[[Any, str], None], client, model: str) -> str:
    """"ok", "4xx <code>" or "5xx <code>" / "dead <error>" (an assertion error propagates)."""
    import openai

    try:
        shape(client, model)
        return "ok"
    except openai.APIStatusError as exc:
        return f"{exc.status_code // 100}xx {exc.status_code}"
    except openai.APIConnectionError as exc:
        return f"dead {exc}"


def _check(name: str, outcomes: list[str]) -> None:
    allowed = {"ok", "4xx"} if SHAPES[name][1] else {"ok"}
    bad = [o for o in outcomes if o.split()[0] not in allowed]
    assert not bad, (name, outcomes)


@pytest.mark.parametrize("name", list(SHAPES))
def test_request_shape_concurrent_across_tenants(name, server, client, control_refs):
    shape = SHAPES[name][0]
    jobs = [m for m in MODELS for _ in range(2)]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        outcomes = list(pool.map(lambda m: _outcome(shape, client, m), jobs))
    print(f"\n{name}: {outcomes}")
    _check(name, outcomes)
    assert _healthy(server[0]), name
    assert _control_ok(client, control_refs) == [], name


def test_all_shapes_at_once(server, client, control_refs):
    jobs = [(name, m) for name in SHAPES for m in MODELS]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        outcomes = list(pool.map(lambda j: _outcome(SHAPES[j[0]][0], client, j[1]), jobs))
    by_shape: dict[str, list[str]] = {}
    for (name, _), outcome in zip(jobs, outcomes):
        by_shape.setdefault(name, []).append(outcome)
    print("\n" + json.dumps(by_shape, indent=1))
    for name, got in by_shape.items():
        _check(name, got)
    assert _healthy(server[0])
    assert _control_ok(client, control_refs) == []
