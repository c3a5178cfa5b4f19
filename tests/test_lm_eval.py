"""lm-evaluation-harness as a client of ``pissa serve``: the endpoint scores an exported adapter as
transformers + PEFT does.

One ``pissa serve --base TINY --adapter t1=EXPORT`` (fp32) serves an adapter made by the real pipeline
(tiny Llama → PiSSA bundle → ``training.train.train``, 16 steps on the task's right answers →
``converter.export.export``, exact, rank 16). A multiple-choice task of 20 arithmetic questions × 4
choices is read from a local JSONL file (task YAML with ``dataset_path: json``,
``dataset_kwargs.data_files``; offline). It is scored twice:

- through the endpoint: the ``lm_eval`` command line, as docs/serving.md gives it, with
  ``--model local-completions`` and ``num_concurrent=4`` (80 log-likelihood requests, ``echo`` +
  ``logprobs``, four in flight at once: the requests of issue 11, which crash vLLM 0.32's CPU engine
  without the plugin's prompt-logprobs fix);
- by lm-eval's ``hf`` backend (Python API): the original base with the PEFT adapter, fp32.

Equal means: for every question and every choice |Δ log-likelihood| ≤ 1e-3 nats, and the same
accuracy and per-question correctness. Why 1e-3: both sides compute in fp32 and differ only in
summation order (vLLM's CPU attention and LoRA ops vs. transformers' matmuls); a choice's
log-likelihood is a sum of 1–3 token log-probabilities, and the differences measured here are ~1e-6.
A wrong LoRA mapping (a row scored with another request's adapter slot, or with none) shifts a choice
by the adapter's effect, whose median over the 80 choices is asserted to exceed 100 × the tolerance,
and the adapter's accuracy is asserted to differ from the base's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from procs import free_port, start_pissa_serve

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ATOL = 1e-3  # nats, per choice; see the module docstring
TASK = "pissa_arith_mc"
NUM_CONCURRENT = 4
STEPS = 16  # training steps of the adapter

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


def _questions() -> list[dict]:
    """20 additions, 4 numeric choices each; the right one at position (i mod 4)."""
    out = []
    for i in range(20):
        a, b = 3 + (7 * i) % 17, 2 + (5 * i) % 13
        right = a + b
        wrong = [right + 1, right - 2, right + 10]
        choices = wrong[: i % 4] + [right] + wrong[i % 4:]
        out.append({"question": f"What is {a} plus {b}?", "choices": [f" {c}" for c in choices], "answer": i % 4})
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_bundle) -> Path:
    """An exact export (rank 16), for the ORIGINAL tiny Llama, of a short training of its bundle on the
    task's right answers (so the adapter changes the scores and the accuracy)."""
    from converter.export import export
    from training.train import train

    root = tmp_path_factory.mktemp("lmeval-export")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question: {q['question']}\nAnswer:",
                                        "response": q["choices"][q["answer"]]}) + "\n" for q in _questions()))
    train(tiny_llama_bundle, data, root / "run", max_steps=STEPS, lr=3e-2, batch_size=4, max_length=64, seed=0,
          progress=False)
    return Path(export(root / "run", root / "t1").out)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The task YAML and its JSONL data, in one folder (``--include_path``)."""
    root = tmp_path_factory.mktemp("lmeval-task")
    data = root / "arith.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in _questions()))
    (root / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    return root


@pytest.fixture(scope="module")
def lm_eval_env(tmp_path_factory) -> dict[str, str]:
    """Offline, with lm-eval's and datasets' caches under tmp_path."""
    root = tmp_path_factory.mktemp("lmeval-cache")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "ds"),
            "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama, exported):
    """``pissa serve --base TINY --adapter t1=EXPORT`` in a subprocess; yields its URL; SIGINT at teardown."""
    root = tmp_path_factory.mktemp("lmeval-serve")
    port = free_port()
    proc = start_pissa_serve(["--base", str(tiny_llama), "--adapter", f"t1={exported}", "--dtype", "float32",
                              "--kv-cache", "64M", "--port", str(port), "--log-file", str(root / "vllm.log")],
                             root / "pissa-serve.out")
    yield f"http://127.0.0.1:{port}", proc, root
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def _per_choice(samples: list[dict]) -> dict[int, list[float]]:
    """doc_id -> the log-likelihood of each choice, in choice order."""
    return {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}


def _accuracy(samples: list[dict]) -> float:
    return sum(float(s["acc"]) for s in samples) / len(samples)


def _hf_samples(base: Path, task_dir: Path, peft: Path | None) -> list[dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = f"pretrained={base},dtype=float32" + (f",peft={peft}" if peft else "")
    results = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[TASK], log_samples=True,
                                      task_manager=TaskManager(include_path=str(task_dir)), device="cpu")
    return results["samples"][TASK]


def test_lm_eval_through_endpoint_equals_hf_peft(server, tiny_llama, exported, task_dir, lm_eval_env,
                                                 tmp_path, monkeypatch):
    url, proc, root = server
    out_dir = tmp_path / "lm-eval-out"
    # The command line of docs/serving.md ("Evaluate an adapter through the endpoint"), paths filled in.
    cmd = [shutil.which("lm_eval") or "lm_eval",
           "--model", "local-completions",
           "--model_args", f"model=t1,base_url={url}/v1/completions,num_concurrent={NUM_CONCURRENT},"
                           f"tokenizer={tiny_llama},tokenizer_backend=huggingface",
           "--tasks", TASK, "--include_path", str(task_dir),
           "--output_path", str(out_dir), "--log_samples"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=lm_eval_env, cwd=tmp_path)
    log_text = (root / "vllm.log").read_text() if (root / "vllm.log").exists() else ""
    first_error = next((ln for ln in log_text.splitlines() if "Error:" in ln), "")
    vllm_log = f"first error: {first_error}\n...\n{log_text[-3000:]}"
    assert run.returncode == 0, f"lm_eval failed:\n{run.stderr[-4000:]}\n--- vLLM log ---\n{vllm_log}"
    assert proc.poll() is None, "pissa serve died during the evaluation:\n" + vllm_log
    files = sorted(out_dir.rglob(f"samples_{TASK}_*.jsonl"))
    assert len(files) == 1, list(out_dir.rglob("*"))
    served = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]

    for key, value in lm_eval_env.items():
        if key.startswith(("HF_", "TOKENIZERS")):
            monkeypatch.setenv(key, value)
    reference = _hf_samples(tiny_llama, task_dir, exported)
    base_only = _hf_samples(tiny_llama, task_dir, None)

    got, want, base = _per_choice(served), _per_choice(reference), _per_choice(base_only)
    assert sorted(got) == sorted(want) == list(range(20))
    assert all(len(got[d]) == len(want[d]) == 4 for d in want)
    deltas = [abs(g - w) for d in want for g, w in zip(got[d], want[d])]
    moved = [abs(b - w) for d in want for b, w in zip(base[d], want[d])]
    print(f"\nmax |Δ loglik| endpoint vs hf+PEFT: {max(deltas):.2e} nats over {len(deltas)} choices; "
          f"adapter vs base (hf): median {sorted(moved)[len(moved) // 2]:.3f}, "
          f"max {max(moved):.3f} nats; "
          f"accuracy endpoint {_accuracy(served):.2f}, hf+PEFT {_accuracy(reference):.2f}, "
          f"hf base {_accuracy(base_only):.2f}")
    assert max(deltas) <= ATOL, max(deltas)
    assert _accuracy(served) == _accuracy(reference)
    assert [s["acc"] for s in sorted(served, key=lambda s: s["doc_id"])] == \
        [s["acc"] for s in sorted(reference, key=lambda s: s["doc_id"])]
    # Guards: the comparison would be vacuous if the adapter did not move the scores.
    assert sorted(moved)[len(moved) // 2] > 100 * ATOL, sorted(moved)
    assert _accuracy(reference) != _accuracy(base_only)
