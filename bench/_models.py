"""Benchmark checkpoints: SmolLM2 as a bf16 HF folder, and a synthesised multi-shard Llama.

Both are written once under the work directory and reused by later runs (a ``.done`` marker holds
the parameters they were made with).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

# Llama-shaped: hidden 2048 and MLP 5632 as TinyLlama-1.1B, 16 query / 4 KV heads of 128, vocab
# 32000, untied lm_head; the number of layers follows from the requested size (1 GB: 9 layers).
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
HEAD_DIM = HIDDEN // HEADS


def _done(folder: Path, params: dict) -> bool:
    marker = folder / ".done"
    return marker.exists() and json.loads(marker.read_text()) == params


def _mark(folder: Path, params: dict) -> None:
    (folder / ".done").write_text(json.dumps(params))


def smollm2_bf16(gguf: Path, workdir: Path) -> Path:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face folder, cast from the cached fp32 GGUF folder."""
    from safetensors.torch import load_file, save_file

    from converter.sources import materialize_gguf

    fp32 = materialize_gguf(gguf).folder
    folder = workdir / "smollm2-bf16"
    params = {"from": str(fp32)}
    if _done(folder, params):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    state = load_file(fp32 / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    for f in fp32.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copyfile(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _mark(folder, params)
    return folder


def _layers_for(size_gb: float) -> int:
    per_layer = 2 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * HEAD_DIM + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN)
    fixed = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    return max(1, math.ceil((size_gb * 1e9 - fixed) / per_layer))


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    return q


def spectral_matrix(
    out_f: int, in_f: int, bases: dict[int, torch.Tensor], gen: torch.Generator, exponent: float = 0.6
) -> torch.Tensor:
    """``W = U diag(σ) Vᵀ + N`` with ``σ_i ∝ i^-exponent``, entries of std ~0.02, noise at 10% of that.

    ``U`` and ``V`` are random column subsets (random signs) of per-dimension orthonormal bases, so
    every matrix has its own singular vectors without a QR per matrix.
    """
    k = min(out_f, in_f)
    u = bases[out_f][:, torch.randperm(bases[out_f].shape[1], generator=gen)[:k]]
    v = bases[in_f][:, torch.randperm(bases[in_f].shape[1], generator=gen)[:k]]
    u = u * (torch.randint(0, 2, (k,), generator=gen) * 2 - 1)
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -exponent
    sigma *= 0.02 * math.sqrt(out_f * in_f) / float(sigma.norm())
    w = (u * sigma) @ v.T
    w += 0.002 * torch.randn(out_f, in_f, generator=gen)
    return w.to(torch.bfloat16)


def synthetic_llama(workdir: Path, size_gb: float = 1.0, min_shards: int = 4, seed: int = 0) -> Path:
    """A Llama-shaped bf16 checkpoint of about ``size_gb`` GB in >= ``min_shards`` shards.

    Target matrices have a decaying spectrum (see :func:`spectral_matrix`); embeddings are N(0, 0.02),
    norms are ones. Generated tensor by tensor and written shard by shard (memory ~ one shard).
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    layers = _layers_for(size_gb)
    folder = workdir / f"synth-llama-{size_gb:g}gb"
    params = {"layers": layers, "hidden": HIDDEN, "intermediate": INTERMEDIATE, "seed": seed, "shards": min_shards}
    if _done(folder, params):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)

    gen = torch.Generator().manual_seed(seed)
    bases = {d: _orthonormal(d, min(d, HIDDEN), gen) for d in {HIDDEN, INTERMEDIATE, KV_HEADS * HEAD_DIM}}
    kv = KV_HEADS * HEAD_DIM
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (HIDDEN,)),
            (f"{p}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.self_attn.k_proj.weight", (kv, HIDDEN)),
            (f"{p}.self_attn.v_proj.weight", (kv, HIDDEN)),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
            (f"{p}.mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (f"{p}.mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (f"{p}.mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
        ]
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    total = sum(2 * math.prod(s) for _, s in shapes)
    per_shard = total / min_shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        if size >= per_shard * len(groups) and len(groups) < min_shards:
            groups.append([])
        groups[-1].append((name, shape))
        size += 2 * math.prod(shape)

    weight_map = {}
    for n, group in enumerate(groups, 1):
        fname = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            elif "embed_tokens" in name or "lm_head" in name:
                tensors[name] = (0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
            else:
                tensors[name] = spectral_matrix(shape[0], shape[1], bases, gen)
            weight_map[name] = fname
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    _mark(folder, params)
    return folder
