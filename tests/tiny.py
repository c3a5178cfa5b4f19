"""Tiny Hugging Face checkpoints built on the fly, for shape and equivalence tests.

Every factory writes a complete model folder (config, tokenizer, safetensors weights) that
``AutoModelForCausalLM.from_pretrained`` and vLLM can load. Weights are random but seeded; they
are for shape/maths tests, never for claims about spectra (use SmolLM2 for those).

Heads are 64 wide: vLLM's CPU attention refuses head_dim 16.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris. 12 * 34 = 408. Hello world!",
    "def add(a, b): return a + b  # numbers 0 1 2 3 4 5 6 7 8 9",
    "Question: what is 7 times 8? Answer: 56. The quick brown fox jumps over the lazy dog.",
]


def save_tiny_tokenizer(folder: Path, vocab_size: int = 320) -> None:
    """A byte-level BPE tokenizer (trained on a fixed corpus: deterministic) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def _config(kind: str, vocab_size: int, tie: bool, layers: int):
    from transformers import GPT2Config, LlamaConfig, MixtralConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie, bos_token_id=0, eos_token_id=5)
    if kind == "llama":
        return LlamaConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, max_position_embeddings=512, **common,
        )
    if kind == "qwen2":
        return Qwen2Config(
            hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512, **common,
        )
    if kind == "phi3":
        return Phi3Config(
            hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=1, **common,
        )
    if kind == "mixtral":  # 4 experts, top-2 routing
        return MixtralConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=2,
            num_key_value_heads=1, head_dim=64, max_position_embeddings=512, num_local_experts=4,
            num_experts_per_tok=2, **common,
        )
    if kind == "gpt2":
        return GPT2Config(n_embd=128, n_layer=layers, n_head=2, n_positions=512, **common)
    raise ValueError(f"unknown tiny model kind {kind!r}")


def make_tiny_model(
    folder: Path,
    kind: str = "llama",
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    tie: bool = False,
    layers: int = 2,
    seed: int = 0,
    tokenizer: bool = True,
) -> Path:
    """Write a tiny ``kind`` model (llama, qwen2 (q/k/v biases), phi3 (fused), gpt2 (Conv1D), mixtral (MoE)).

    transformers 5 saves Mixtral's experts per expert (``block_sparse_moe.experts.N.w1.weight``) though
    it holds them fused in memory (``mlp.experts.gate_up_proj [E, 2I, H]``).

    Args:
        folder: where to write (created).
        dtype: weight dtype on disk.
        max_shard_size: e.g. ``"300KB"`` to get several shards and an index.
        tie: tie input and output embeddings.
        layers: decoder layers.
        seed: weight seed.
        tokenizer: also save the tiny tokenizer (vocab 320).
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = 320
    config = _config(kind, vocab, tie, layers)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            # Larger-than-default weights so the spectrum is not flat noise at 0.02 scale.
            p.normal_(0.0, 0.08)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if tokenizer:
        save_tiny_tokenizer(folder, vocab)
    return folder
