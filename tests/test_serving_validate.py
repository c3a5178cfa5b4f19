"""Adapter validation against a base (pure checks and the disk driver), max_lora_rank selection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pissa.core.errors import AdapterValidationError
from serving.validate import (
    ALLOWED_MAX_LORA_RANKS,
    AdapterInfo,
    BaseInfo,
    check_adapter,
    check_adapters,
    config_problems,
    pairing_problems,
    read_adapter,
    read_base,
    select_max_lora_rank,
    validate_adapters,
)

# --- a synthetic base and adapter (no model needed) -----------------------------------------------
HIDDEN, INTER, VOCAB, KV = 128, 256, 320, 64
BASE_SHAPES = {
    "model.embed_tokens": (VOCAB, HIDDEN),
    "model.layers.0.self_attn.q_proj": (HIDDEN, HIDDEN),
    "model.layers.0.self_attn.k_proj": (KV, HIDDEN),
    "model.layers.0.mlp.down_proj": (HIDDEN, INTER),
    "model.layers.0.input_layernorm": (HIDDEN,),
    "lm_head": (VOCAB, HIDDEN),
}
BASE = BaseInfo("/models/base", frozenset({"/models/base", "org/base"}), BASE_SHAPES, None)


def lora_shapes(r: int = 8, modules: dict[str, tuple[int, int]] | None = None) -> dict[str, tuple[int, ...]]:
    """PEFT keys and [r, in] / [out, r] shapes for each module (out, in)."""
    modules = modules or {
        "model.layers.0.self_attn.q_proj": (HIDDEN, HIDDEN),
        "model.layers.0.self_attn.k_proj": (KV, HIDDEN),
        "model.layers.0.mlp.down_proj": (HIDDEN, INTER),
    }
    out: dict[str, tuple[int, ...]] = {}
    for m, (o, i) in modules.items():
        out[f"base_model.model.{m}.lora_A.weight"] = (r, i)
        out[f"base_model.model.{m}.lora_B.weight"] = (o, r)
    return out


def good_config(**overrides) -> dict:
    cfg = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "init_lora_weights": True, "bias": "none",
           "use_dora": False, "modules_to_save": None, "base_model_name_or_path": "/models/base",
           "target_modules": ["q_proj", "k_proj", "down_proj"]}
    cfg.update(overrides)
    return cfg


def info(config=None, shapes=None, record=None, name="t") -> AdapterInfo:
    return AdapterInfo(name, f"/adapters/{name}", config or good_config(), shapes or lora_shapes(), record)


def test_good_adapter_has_no_problem():
    assert check_adapter(info(), BASE) == []


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"peft_type": "IA3"}, "only LORA"),
        ({"use_dora": True}, "DoRA"),
        ({"init_lora_weights": "pissa_niter_4"}, "pissa-style init"),
        ({"init_lora_weights": "olora"}, "olora-style init"),
        ({"init_lora_weights": "loftq"}, "loftq-style init"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"lora_bias": True}, "lora_bias"),
        ({"r": 0}, "positive integer"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ],
)
def test_each_refused_feature(override, fragment):
    problems = config_problems(good_config(**override))
    assert len(problems) == 1 and fragment in problems[0], problems


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_inits_that_only_set_adapter_weights_are_accepted(init):
    assert config_problems(good_config(init_lora_weights=init)) == []


def test_every_problem_reported_at_once():
    """Four independent faults in one adapter: four lines, not the first one only."""
    shapes = lora_shapes()
    shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = (8, 64)  # wrong in
    shapes["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"] = (8, HIDDEN)  # no such module, no B
    cfg = good_config(use_dora=True, base_model_name_or_path="/models/other")
    problems = check_adapter(info(cfg, shapes), BASE)
    text = "\n".join(problems)
    assert "DoRA" in text
    assert "q_proj: shapes A [8, 64]" in text
    assert "gate_proj: has only A" in text
    assert "made for base '/models/other'" in text
    assert len(problems) == 4, problems


def test_shapes_must_fit_the_base():
    shapes = lora_shapes(modules={"model.layers.0.self_attn.k_proj": (HIDDEN, HIDDEN)})  # base is [64, 128]
    (problem,) = check_adapter(info(shapes=shapes), BASE)
    assert "k_proj" in problem and "expected A [r, 128] and B [64, r]" in problem


def test_targets_the_base_lacks_and_non_lora_tensors():
    shapes = lora_shapes(modules={"transformer.h.0.attn.c_attn": (384, 128)})
    shapes["base_model.model.lm_head.weight"] = (VOCAB, HIDDEN)  # a modules_to_save copy
    problems = check_adapter(info(shapes=shapes), BASE)
    assert any("not a LoRA tensor" in p for p in problems)
    assert any("targets modules the base does not have: transformer.h.0.attn.c_attn" in p for p in problems)


def test_norm_layers_cannot_be_adapted():
    shapes = {"base_model.model.model.layers.0.input_layernorm.lora_A.weight": (8, HIDDEN),
              "base_model.model.model.layers.0.input_layernorm.lora_B.weight": (HIDDEN, 8)}
    (problem,) = check_adapter(info(shapes=shapes), BASE)
    assert "1-D" in problem


def test_embedding_lora_shapes():
    good = {"base_model.model.model.embed_tokens.lora_embedding_A": (8, VOCAB),
            "base_model.model.model.embed_tokens.lora_embedding_B": (HIDDEN, 8)}
    assert check_adapter(info(shapes=good), BASE) == []
    bad = dict(good)
    bad["base_model.model.model.embed_tokens.lora_embedding_A"] = (8, HIDDEN)
    assert "embed_tokens" in check_adapter(info(shapes=bad), BASE)[0]


def test_rank_pattern_ranks():
    modules = {"model.layers.0.self_attn.q_proj": (HIDDEN, HIDDEN)}
    shapes = lora_shapes(16, modules)
    assert "rank 16 is neither r" in check_adapter(info(shapes=shapes), BASE)[0]
    cfg = good_config(rank_pattern={"q_proj": 16})
    assert check_adapter(info(cfg, shapes), BASE) == []


# --- max_lora_rank --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ranks", "minimum", "expected"),
    [([], None, 1), ([1], None, 1), ([2], None, 8), ([8], None, 8), ([9, 4], None, 16), ([16, 32], None, 32),
     ([65], None, 128), ([300], None, 320), ([321], None, 512), ([512], None, 512), ([8], 20, 32)],
)
def test_select_max_lora_rank(ranks, minimum, expected):
    assert select_max_lora_rank(ranks, minimum) == expected
    assert expected in ALLOWED_MAX_LORA_RANKS


def test_rank_above_512_is_refused():
    with pytest.raises(AdapterValidationError, match="513"):
        select_max_lora_rank([8, 513])


def test_check_adapters_selects_rank_and_prefixes_names():
    a = info(name="small")
    b = info(good_config(r=24), lora_shapes(24), name="big")
    problems, rank = check_adapters([a, b], BASE)
    assert problems == [] and rank == 32
    problems, rank = check_adapters([a, b], BASE, max_lora_rank=16)  # a running server's limit
    assert rank == 16 and problems == ["adapter 'big' (/adapters/big): rank 24 exceeds max_lora_rank 16"]


# --- pairing rule -------------------------------------------------------------------------------
def test_pairing_by_identity_and_alias():
    assert pairing_problems(info(good_config(base_model_name_or_path="org/base")), BASE) == []
    other = pairing_problems(info(good_config(base_model_name_or_path="org/other")), BASE)
    assert len(other) == 1 and "'org/other'" in other[0]


def test_pairing_needs_a_recorded_base():
    (problem,) = pairing_problems(info(good_config(base_model_name_or_path=None)), BASE)
    assert "records no base model" in problem


def test_pairing_no_fuzzy_matching():
    """Same basename, different folder: refused (the rule is exact identity or same folder)."""
    (problem,) = pairing_problems(info(good_config(base_model_name_or_path="/elsewhere/base")), BASE)
    assert "/elsewhere/base" in problem


def test_pairing_export_record_is_checked_too():
    """The export record names another base although the config names this one: refused."""
    record = {"format": "pissa-export", "base_model": "org/other"}
    (problem,) = pairing_problems(info(record=record), BASE)
    assert "export record" in problem and "org/other" in problem
    assert pairing_problems(info(record={"base_model": "org/base"}), BASE) == []


def test_pairing_same_folder_through_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    base = BaseInfo(str(real), frozenset({str(real)}), BASE_SHAPES, str(real))
    assert pairing_problems(info(good_config(base_model_name_or_path=str(link))), base) == []


def test_pairing_names_a_pissa_bundle(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "pissa.json").write_text("{}")
    (problem,) = pairing_problems(info(good_config(base_model_name_or_path=str(bundle))), BASE)
    assert "PiSSA bundle" in problem


# --- from disk: real PEFT adapters on the tiny Llama ---------------------------------------------
@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, tiny_llama, tiny_qwen2):
    """Tenant 'a' for the tiny Llama, tenant 'q' for the tiny Qwen2 (same tensor shapes!)."""
    from serving.testing import make_peft_adapter

    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(tiny_llama, root / "a", seed=1)
    make_peft_adapter(tiny_qwen2, root / "q", seed=2)
    return root


def test_real_adapter_passes_and_rank_is_selected(adapters_dir, tiny_llama):
    base = read_base(str(tiny_llama), is_local=True)
    report = validate_adapters(base, [("a", str(adapters_dir / "a"), True)])
    assert report.max_lora_rank == 8 and report.ranks == {"a": 8}


def test_adapter_for_another_base_refused_even_with_identical_shapes(adapters_dir, tiny_llama):
    """The Qwen2 adapter's tensors fit the Llama exactly; only the pairing rule catches it."""
    base = read_base(str(tiny_llama), is_local=True)
    q = read_adapter("q", str(adapters_dir / "q"), is_local=True)
    from serving.validate import tensor_problems

    assert tensor_problems(q.config, q.tensor_shapes, base) == []
    with pytest.raises(AdapterValidationError) as exc:
        validate_adapters(base, [("a", str(adapters_dir / "a"), True), ("q", str(adapters_dir / "q"), True)])
    problems = exc.value.problems()
    assert len(problems) == 1 and problems[0].startswith("adapter 'q'") and "made for base" in problems[0]


def test_unreadable_adapters_all_reported(adapters_dir, tiny_llama, tmp_path):
    base = read_base(str(tiny_llama), is_local=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(adapters_dir / "a", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(AdapterValidationError) as exc:
        validate_adapters(base, [("e", str(empty), True), ("b", str(broken), True), ("m", str(tmp_path / "no"), True)])
    text = "\n".join(exc.value.problems())
    assert "no adapter_config.json" in text and "not readable safetensors" in text and "not a folder" in text


def test_export_record_checksum(adapters_dir, tiny_llama, tmp_path):
    """An adapter edited after export no longer matches the sha256 its export record holds."""
    import hashlib

    base = read_base(str(tiny_llama), is_local=True)
    adapter = tmp_path / "exported"
    shutil.copytree(adapters_dir / "a", adapter)
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    record = {"format": "pissa-export", "base_model": str(tiny_llama),
              "files": {"adapter_model.safetensors": digest}}
    (adapter / "pissa_export.json").write_text(json.dumps(record))
    validate_adapters(base, [("x", str(adapter), True)])
    record["files"]["adapter_model.safetensors"] = "0" * 64
    (adapter / "pissa_export.json").write_text(json.dumps(record))
    with pytest.raises(AdapterValidationError, match="changed since export"):
        validate_adapters(base, [("x", str(adapter), True)])


def test_tied_lm_head_is_known(tiny_gpt2):
    """GPT-2 ties lm_head to transformer.wte: lm_head has no tensor of its own but is adaptable."""
    base = read_base(str(tiny_gpt2), is_local=True)
    assert base.weight_shapes["lm_head"] == base.weight_shapes["transformer.wte"] == (320, 128)


def test_base_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(AdapterValidationError, match="no \\*.safetensors"):
        read_base(str(tmp_path), is_local=True)


def test_base_path_identity(tiny_llama):
    base = read_base(str(tiny_llama), is_local=True, aliases=["org/tiny"])
    assert str(Path(tiny_llama).resolve()) in base.identities and "org/tiny" in base.identities


# --- hub ids: downloaded through pissa.core.hub (the Hub stand-in of tests/hub_standin.py) --------
def _upload(hub, repo_id: str, folder: Path, revision: str | None = None) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token="hf_alice")
    api.create_repo(repo_id, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision)


def test_hub_base_and_adapter_validated_through_the_hub_client(hub, tiny_llama, tmp_path):
    """Hub ids go through pissa.core.hub.download_repo: HF_ENDPOINT and HF_TOKEN read when called."""
    from serving.testing import make_peft_adapter

    make_peft_adapter(tiny_llama, tmp_path / "a", seed=1)  # records the local folder as its base
    _upload(hub, "alice/base", tiny_llama)
    _upload(hub, "alice/tenant-a", tmp_path / "a")
    base = read_base("alice/base", is_local=False, aliases=[str(tiny_llama)])
    assert base.weight_shapes["model.layers.0.self_attn.q_proj"] == (128, 128)
    report = validate_adapters(base, [("a", "alice/tenant-a", False)])
    assert report.ranks == {"a": 8}
    assert hub.count("GET", r"^/alice/tenant-a/resolve/[^/]+/adapter_model\.safetensors$") == 1


def test_hub_adapter_revision_is_honoured(hub, tiny_llama, tmp_path):
    from serving.testing import make_peft_adapter

    make_peft_adapter(tiny_llama, tmp_path / "r8", seed=1, rank=8)
    make_peft_adapter(tiny_llama, tmp_path / "r16", seed=1, rank=16)
    _upload(hub, "alice/tenant", tmp_path / "r8")
    _upload(hub, "alice/tenant", tmp_path / "r16", revision="v2")
    assert read_adapter("t", "alice/tenant", is_local=False).config["r"] == 8
    assert read_adapter("t", "alice/tenant", is_local=False, revision="v2").config["r"] == 16
    missing = read_adapter("t", "alice/tenant", is_local=False, revision="nope")
    assert missing.read_problems == (
        f"cannot fetch it: downloading alice/tenant@nope ({hub.endpoint}): revision 'nope' does not exist in "
        "alice/tenant (check the branch, tag or commit (--revision))",
    )


def test_hub_failures_are_adapter_validation_lines(hub, tiny_llama, tmp_path):
    """A missing adapter repo and a failing Hub: one HubError line each, every adapter reported."""
    from serving.testing import make_peft_adapter

    make_peft_adapter(tiny_llama, tmp_path / "a", seed=1)
    _upload(hub, "alice/ok", tmp_path / "a")
    base = read_base(str(tiny_llama), is_local=True)
    with pytest.raises(AdapterValidationError) as exc:
        validate_adapters(base, [("ok", "alice/ok", False), ("gone", "alice/gone", False)])
    assert exc.value.problems() == [
        f"adapter 'gone' (alice/gone): cannot fetch it: downloading alice/gone@main ({hub.endpoint}): repository "
        "alice/gone not found (or private and not visible to this token) (HTTP 404) (check the repo id)"
    ]
    hub.fail("GET", r"^/api/models/alice/ok", 503)
    with pytest.raises(AdapterValidationError) as exc:
        read_base("alice/ok", is_local=False)
    (line,) = exc.value.problems()
    assert line.startswith("base 'alice/ok': cannot fetch it: ") and "the Hub failed with HTTP 503" in line


def test_base_must_be_a_model_folder(tiny_llama, tmp_path):
    with pytest.raises(AdapterValidationError, match="is not a folder"):
        read_base(str(tiny_llama / "config.json"), is_local=True)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_llama.glob("*.safetensors"):
        shutil.copy(f, bare)
    with pytest.raises(AdapterValidationError, match="has no config.json"):
        read_base(str(bare), is_local=True)
    (bare / "config.json").write_text("{oops")
    with pytest.raises(AdapterValidationError, match="not a JSON object"):
        read_base(str(bare), is_local=True)
