"""Config validation: every bad field gets its own clear error naming the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_kvevict.policies.config import PolicyConfig
from vllm_kvevict.policies.locret import LocretWeightsMissing
from vllm_kvevict.policies.budget import parse_budget
from vllm_kvevict.policies.registry import POLICIES

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"policy": "snapkvv"}, r"kv_policy='snapkvv' is unknown: expected one of none, ada-pyramidkv, ada-snapkv"),
        ({"policy": 3}, r"kv_policy=3 is invalid"),
        ({"policy": "snapkv", "budget": 0}, r"budget=0 is out of range: a token count must be >= 1"),
        ({"policy": "snapkv", "budget": -5}, r"budget=-5 is out of range"),
        ({"policy": "snapkv", "budget": 1.5}, r"budget=1.5 is out of range: a ratio must be in \(0, 1\]"),
        ({"policy": "snapkv", "budget": "lots"}, r"budget='lots' is invalid"),
        ({"policy": "snapkv", "budget": True}, r"budget=True is invalid"),
        ({"policy": "snapkv", "window": 0}, r"window=0 is out of range: expected an integer in \[1, 1048576\]"),
        ({"policy": "snapkv", "window": "wide"}, r"window='wide' is invalid: expected an integer"),
        ({"policy": "snapkv", "pooling": "median"}, r"pooling='median' is invalid: expected one of 'max', 'avg', 'none'"),
        ({"policy": "snapkv", "gqa_reduce": "min"}, r"gqa_reduce='min' is invalid"),
        ({"policy": "snapkv", "kernel_size": 0}, r"kernel_size=0 is out of range"),
        ({"policy": "ada-snapkv", "floor_alpha": 1.5}, r"floor_alpha=1.5 is out of range: expected a number in \[0, 1\]"),
        ({"policy": "ada-snapkv", "ada_mode": "approx"}, r"ada_mode='approx' is invalid"),
        ({"policy": "pyramidkv", "pyramid_beta": 1}, r"pyramid_beta=1 is out of range"),
        ({"policy": "nacl", "proxy_ratio": 0}, r"proxy_ratio=0 is out of range"),
        ({"policy": "nacl", "random_fraction": -0.1}, r"random_fraction=-0.1 is out of range"),
        ({"policy": "vatp", "vatp_mode": "h2o"}, r"vatp_mode='h2o' is invalid: expected one of 'window', 'accumulate'"),
        ({"policy": "tokenselect", "similarity_threshold": 2}, r"similarity_threshold=2 is out of range"),
        ({"policy": "tokenselect", "n_local": -1}, r"n_local=-1 is out of range"),
        ({"policy": "snapkv", "floor_alpha": 0.3}, r"'floor_alpha' does not apply to policy 'snapkv' \(it applies to: ada-pyramidkv, ada-snapkv\)"),
        ({"policy": "snapkv", "frobnicate": 1}, r"unknown key 'frobnicate' for policy 'snapkv': it takes budget, window"),
        ({"policy": "none", "window": 4}, r"'window' does not apply to policy 'none'"),
    ],
)
def test_bad_fields_have_their_own_message(data, pattern):
    with pytest.raises(ValueError, match=pattern):
        PolicyConfig.from_dict(data)


def test_tokenselect_takes_a_ratio_of_the_context_like_every_policy():
    policy = PolicyConfig("tokenselect", 0.25, (("n_init", 16), ("n_local", 32))).build()
    assert [policy.top_k(n) for n in (1, 4, 400, 4001)] == [1, 1, 100, 1001]
    assert not policy.selects(65) and policy.selects(66)  # 65 = 16 + ceil(65 / 4) + 32: attends to all
    assert PolicyConfig("tokenselect", 300).build().top_k(10_000) == 300


def test_keys_accept_prefix_dashes_and_strings():
    cfg = PolicyConfig.from_dict({"kv_policy": "ada-snapkv", "kv-budget": "0.125", "floor-alpha": "0.5", "window": "16"})
    assert cfg.budget == 0.125 and cfg.get("floor_alpha") == 0.5 and cfg.get("window") == 16
    assert PolicyConfig.from_dict({"policy": "snapkv", "budget": "256"}).budget == 256


def test_defaults_and_frozen():
    cfg = PolicyConfig("snapkv")
    assert cfg.budget == 1024 and cfg.get("window") == 32 and cfg.kind == "evict"
    with pytest.raises(AttributeError):
        cfg.budget = 5  # type: ignore[misc]
    assert PolicyConfig("none", 256).budget is None  # the full cache ignores a server-wide budget


def test_per_request_override_of_a_server_config():
    server = PolicyConfig.from_dict({"policy": "ada-snapkv", "budget": 512, "floor_alpha": 0.4, "window": 16})
    same = PolicyConfig.from_dict({"kv_budget": 128}, base=server)
    assert (same.policy, same.budget, same.get("floor_alpha")) == ("ada-snapkv", 128, 0.4)
    switched = PolicyConfig.from_dict({"kv_policy": "snapkv"}, base=server)
    assert (switched.policy, switched.budget, switched.get("window")) == ("snapkv", 512, 16)
    # a parameter the server left at its policy's default is not imposed on another policy
    vatp = PolicyConfig.from_dict({"kv_policy": "vatp"}, base=PolicyConfig.from_dict({"policy": "snapkv"}))
    assert (vatp.get("sink_tokens"), vatp.get("decode_interval")) == (20, 128)
    set_here = PolicyConfig.from_dict({"policy": "snapkv", "sink_tokens": 8, "decode_interval": 256})
    vatp = PolicyConfig.from_dict({"kv_policy": "vatp"}, base=set_here)
    assert (vatp.get("sink_tokens"), vatp.get("decode_interval")) == (8, 256)  # what the operator set is kept
    off = PolicyConfig.from_dict({"kv_policy": "none"}, base=server)
    assert off.policy == "none" and off.build() is None
    with pytest.raises(ValueError, match="floor_alpha"):
        PolicyConfig.from_dict({"kv_policy": "snapkv", "floor_alpha": 0.1}, base=server)


def test_locret_without_weights_fails_clearly(tmp_path):
    # weights ship for the default model (models/locret/), so point at a file that does not exist
    with pytest.raises(LocretWeightsMissing, match="locret needs trained retaining heads"):
        PolicyConfig("locret", params=(("weights", str(tmp_path / "none.pt")),)).build()
    with pytest.raises(LocretWeightsMissing, match="does not exist"):
        from vllm_kvevict.policies.locret import load_retaining_heads

        load_retaining_heads(tmp_path / "missing.pt")


def test_every_preset_file_matches_the_registry():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(POLICIES)
    for name, spec in POLICIES.items():
        cfg = PolicyConfig.from_yaml(CONFIGS / f"{name}.yaml")
        assert cfg.policy == name
        assert cfg.to_dict() == {"policy": name, **spec.defaults()}
        assert (CONFIGS / f"{name}.yaml").read_text().startswith(f"# {name}: ")


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: snapkv\nbudget: 0\n")
    with pytest.raises(ValueError, match=r"bad.yaml: snapkv: budget=0 is out of range"):
        PolicyConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="does not exist"):
        PolicyConfig.from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, value", [("256", 256), (" 0.25 ", 0.25), ("1.0", 1.0), ("1e-1", 0.1)])
def test_parse_budget_strings(text, value):
    assert parse_budget(text) == value


def test_declarations_say_whether_layers_keep_different_counts():
    from vllm_kvevict.policies.declaration import LayerBudget
    from vllm_kvevict.policies.registry import names

    for name in names("evict"):
        decl = PolicyConfig(name).build().declaration
        assert decl.layers_differ == (decl.layer_budget is LayerBudget.PYRAMID), name
    assert PolicyConfig("pyramidkv").build().declaration.layers_differ
    assert not PolicyConfig("snapkv").build().declaration.layers_differ
