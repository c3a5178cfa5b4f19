"""The bundle's model card (README.md), rendered from its pissa.json record alone.

Deterministic (no timings or dates), so a resumed or re-run conversion writes the same bytes, and
``pissa push`` can regenerate it from the record.
"""

from __future__ import annotations

import statistics
from typing import Any

import yaml

from converter.targets import describe_left_out
from pissa.core.formats import bundle as B


def _energy_table(matrices: list[dict[str, Any]]) -> str:
    """Mean / worst adapter energy share per layer type (q_proj, ...)."""
    groups: dict[str, list[float]] = {}
    for m in matrices:
        groups.setdefault(m["name"].rsplit(".", 1)[-1], []).append(float(m["energy"]))
    lines = ["| layer | matrices | mean energy share | worst |", "|---|---:|---:|---:|"]
    for name, values in sorted(groups.items()):
        lines.append(f"| {name} | {len(values)} | {statistics.fmean(values):.4f} | {min(values):.4f} |")
    return "\n".join(lines)


def _quant_section(record: dict[str, Any]) -> str:
    """QPiSSA bundles: the quantization and its error against QLoRA's per layer type (empty otherwise)."""
    q = record.get("quantization")
    if not q:
        return ""
    groups: dict[str, list[dict[str, Any]]] = {}
    for m in record.get("matrices", []):
        groups.setdefault(m["name"].rsplit(".", 1)[-1], []).append(m)
    lines = [
        "## QPiSSA quantization",
        "",
        f"The residual is `deq(Q)`, `Q` = {q['quant_type'].upper()} (blocksize {q['blocksize']}"
        f"{', double quantization' if q['double_quant'] else ''}) of `W − s·BA`, {_storage(q)};"
        f" the adapter was fitted to it over {q['iters']} refinement(s), best kept."
        " Nuclear-norm error `‖W − (deq(Q) + s·BA)‖_*` against QLoRA's `‖W − deq(NF4(W))‖_*`:",
        "",
        "| layer | matrices | QPiSSA error | QLoRA error | below QLoRA |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, ms in sorted(groups.items()):
        ours, theirs = sum(m["qpissa_nuclear"] for m in ms), sum(m["qlora_nuclear"] for m in ms)
        lines.append(f"| {name} | {len(ms)} | {ours:.1f} | {theirs:.1f} | {100 * (1 - ours / theirs):.1f}% |")
    lines.append(
        f"| all | {len(record.get('matrices', []))} | {q['qpissa_nuclear_total']:.1f} | {q['qlora_nuclear_total']:.1f}"
        f" | {100 * q['below_qlora']:.1f}% |"
    )
    return "\n".join(lines) + "\n\n"


def _storage(q: dict[str, Any]) -> str:
    if q.get("storage") == "dequantized":
        return f"stored dequantized in {q['residual_dtype']}"
    return (
        "stored packed in bitsandbytes' 4-bit layout (`from_pretrained` needs bitsandbytes and quantizes nothing"
        " itself: `quantization_config` is in config.json)"
    )


def _left_out_section(entries: list[dict[str, Any]]) -> str:
    """Which matrices got no adapter and why (empty when none were left out)."""
    if not entries:
        return ""
    lines = [
        "## Left out",
        "",
        "These matrices got no adapter: they are copied unchanged into the residual model, so the bundle",
        f"covers every linear layer but the output layer except {describe_left_out(entries)}.",
        "",
        "| tensors | matrices | reason |",
        "|---|---:|---|",
    ]
    for e in entries:
        names = ", ".join(f"`{p}`" for p in e.get("patterns", []))
        lines.append(f"| {names} | {e.get('count')} | {e.get('reason')} |")
    return "\n".join(lines) + "\n\n"


def render_model_card(record: dict[str, Any], *, repo_id: str | None = None) -> str:
    """Markdown model card with a YAML header (base_model, library_name: peft, tags: [pissa]).

    Args:
        record: the bundle's pissa.json.
        repo_id: where the bundle is (or will be) published, used in the loading snippet.
    """
    source = record.get("source", {})
    opts = record.get("options", {})
    adapter = record.get("adapter", {})
    meta: dict[str, Any] = {"library_name": "peft", "tags": ["pissa", "peft", "lora"]}
    if source.get("kind") == "hub" and source.get("repo_id"):
        meta["base_model"] = source["repo_id"]
    if record.get("license"):
        meta["license"] = record["license"]
    where = repo_id or "PATH_OR_REPO_OF_THIS_BUNDLE"
    base = record.get("base_model", "the source model")
    header = yaml.safe_dump(meta, sort_keys=True).strip()
    matrices = record.get("matrices", [])
    left_out = record.get(B.LEFT_OUT_KEY) or []
    left_out_row = f"| left out | {describe_left_out(left_out)} |\n" if left_out else ""
    return f"""---
{header}
---

# PiSSA bundle of `{base}`

This folder is a [PiSSA](https://arxiv.org/abs/2404.02948) bundle made by `pissa convert`: every target
weight `W` was split into a trainable rank-{adapter.get("r")} adapter holding its principal components
(`pissa_init/`) and a frozen residual `W_res = W − scaling·B A` (the model files here). The pair
reproduces the original model {"up to the 4-bit quantization of the residual (see QPiSSA quantization)" if record.get("quantization") else "up to the residual dtype's rounding"}.

## Load and fine-tune

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel

model = AutoModelForCausalLM.from_pretrained("{where}")
model = PeftModel.from_pretrained(model, "{where}", subfolder="pissa_init", is_trainable=True)
```

or `pissa train {where} --data DATA.jsonl --out RUN`. To serve the result on the ORIGINAL base with
vLLM, export it first (`pissa export RUN --out ADAPTER`): the adapter in `pissa_init/` only makes sense
on this residual model.

## Conversion

| option | value |
|---|---|
| rank | {adapter.get("r")} |
| lora_alpha | {adapter.get("lora_alpha")} |
| rslora | {adapter.get("use_rslora")} |
| scaling | {adapter.get("scaling")} |
| targets | {", ".join(adapter.get("target_modules", []))} |
| svd | {opts.get("svd")} (niter {opts.get("niter")}, oversample {opts.get("oversample")}, seed {opts.get("seed")}) |
| residual dtype | {record.get("residual_dtype") or "as source"} |
| adapter dtype | {adapter.get("dtype")} |
| matrices | {len(matrices)} |
{left_out_row}
{_left_out_section(left_out)}{_quant_section(record)}## Captured spectral energy

Share of each matrix's squared Frobenius norm held by the adapter (`Σ_{{i≤r}} σ_i² / ‖W‖²`).

{_energy_table(matrices) if matrices else "(no matrices)"}

Made with pissa-pipeline {record.get("tool", {}).get("version", "")}.
"""
