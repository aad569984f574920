"""Locret retaining-head training (vllm_kvevict.training) and the shipped weights.

Uses the prepared default model through transformers (no vLLM); about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import itertools
import math

import pytest
import torch

from vllm_kvevict.training import locret as lt
from vllm_kvevict.training import locret_data as ld
from vllm_kvevict.training import locret_metrics as lm
from vllm_kvevict.policies.locret import HeadShape, RetainingHeads, default_weights_path, load_retaining_heads

#: The shipped heads on freshly generated held-out examples (seed 777, 768-1024 tokens; text,
#: passkey, text) measured Spearman 0.629 and top-10% recall 0.452 (per example 0.54-0.74 / 0.35-0.58;
#: the training run's own 12 held-out examples: 0.631 / 0.465). The examples are seeded, so only
#: float rounding (another CPU, torch or transformers version) moves these; the margins (0.13, 0.07)
#: are far larger than that, and both thresholds stay above what position alone gives on the training
#: run's held-out set (keep the most recent: 0.36 / 0.37) and far above untrained heads (~0 / ~0.11).
SHIPPED_MIN_SPEARMAN = 0.5
SHIPPED_MIN_RECALL = 0.38


# ---- labels: a direct float64 computation --------------------------------------------------------
def _cis_reference(q: torch.Tensor, k: torch.Tensor, query_len: int) -> torch.Tensor:
    """CIS by the definition, one number at a time, in float64."""
    hq, t, d = q.shape
    hkv = k.shape[0]
    group = hq // hkv
    prefix = t - query_len
    out = torch.zeros(hkv, prefix, dtype=torch.float64)
    q, k = q.double(), k.double()
    for h, p in itertools.product(range(hq), range(prefix, t)):
        g = h // group  # transformers' repeat_kv: query head h reads KV head h // group
        logits = torch.tensor([float(q[h, p] @ k[g, j]) / math.sqrt(d) for j in range(p + 1)], dtype=torch.float64)
        probs = torch.softmax(logits, dim=0)
        for j in range(prefix):
            out[g, j] = max(out[g, j], probs[j])
    return out


@pytest.mark.parametrize("hq,hkv,t,query_len", [(6, 2, 12, 4), (4, 4, 9, 1), (9, 3, 10, 3)])
def test_cis_labels_match_direct_float64(hq, hkv, t, query_len):
    gen = torch.Generator().manual_seed(hq * 100 + t)
    q = torch.randn(hq, t, 8, generator=gen) * 2
    k = torch.randn(hkv, t, 8, generator=gen) * 2
    got = ld.cis_labels(q, k, query_len)
    assert got.shape == (hkv, t - query_len)
    torch.testing.assert_close(got.double(), _cis_reference(q, k, query_len), rtol=1e-5, atol=1e-6)


def test_cis_is_max_over_the_gqa_group_and_only_later_queries():
    # 2 query heads share 1 KV head; d = 1; 4 tokens, the last one is the query region.
    q = torch.zeros(2, 4, 1)
    k = torch.zeros(1, 4, 1)
    k[0, 1] = 1.0
    q[1, 3] = 2.0  # head 1's query looks at token 1 (logit 2), head 0 attends uniformly
    cis = ld.cis_labels(q, k, query_len=1, scale=1.0)[0]
    e2 = math.exp(2.0)
    # token 1: head 1 gives e^2 / (e^2 + 3); tokens 0 and 2: head 0's uniform 1/4 beats head 1's 1/(e^2 + 3)
    torch.testing.assert_close(cis.double(), torch.tensor([0.25, e2 / (e2 + 3), 0.25], dtype=torch.float64))
    # prefix positions' own queries never count: only later (query-region) positions label the prefix
    q2 = q.clone()
    q2[:, :3] = torch.randn(2, 3, 1) * 5
    torch.testing.assert_close(ld.cis_labels(q2, k, query_len=1, scale=1.0)[0], cis)
    # with a 2-token query region, position 2's query is causal: it cannot see token 3
    k3 = torch.zeros(1, 4, 1)
    k3[0, 3] = 10.0
    q3 = torch.ones(2, 4, 1)
    cis3 = ld.cis_labels(q3, k3, query_len=2, scale=1.0)[0]
    torch.testing.assert_close(cis3, torch.full((2,), 1 / 3))  # position 2: uniform over tokens 0..2


def test_target_is_monotone_in_cis_and_length_free():
    cis = torch.tensor([[1e-6, 1e-3, 0.01, 0.5, 0.9]])
    target = ld.cis_target(cis)
    assert torch.all(target[0, 1:] > target[0, :-1])
    # uniform attention (CIS = 1/N) maps to about log(1) = 0 at any length
    for n in (100, 1000):
        assert abs(float(ld.cis_target(torch.full((1, n), 1 / n))[0, 0])) < 0.02


def test_spearman_and_recall():
    a = torch.tensor([0.1, 0.4, 0.2, 0.9, 0.3])
    assert lm.spearman(a, a * 10 + 1) == pytest.approx(1.0)
    assert lm.spearman(a, -a) == pytest.approx(-1.0)
    # tie-averaged ranks, as scipy.stats.spearmanr: x = [1, 2, 2, 3] vs y = [1, 3, 2, 4] -> 0.9487
    assert lm.spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 3, 2, 4])) == pytest.approx(0.948683, abs=1e-6)
    assert lm.rankdata(torch.tensor([5.0, 1, 5, 3])).tolist() == [2.5, 0.0, 2.5, 1.0]
    true = torch.arange(20.0)
    assert lm.topk_recall(true, true) == 1.0  # top-10% of 20 = 2 tokens
    assert lm.topk_recall(-true, true) == 0.0
    assert lm.topk_recall(torch.tensor([0.0] * 18 + [1, 0]), true) == 0.5


def test_config_errors_name_the_value():
    for kwargs, text in [({"context": (512, 256)}, "context='512,256'"), ({"samples": 0}, "samples=0"),
                         ({"context": (64, 128)}, "too short"), ({"context": (1024, 9000)}, "8192"),
                         ({"query_len": (10, 600)}, "query_len='10,600'"), ({"warmup": 1.5}, "warmup=1.5")]:
        with pytest.raises(ValueError, match=text.replace("(", r"\(")):
            lt.TrainConfig(**kwargs).validate()


# ---- the real model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone():
    torch.set_num_threads(1)
    return lt.load_backbone()


def test_extract_features_are_the_pre_rope_projections_and_labels_match_eager_attention(backbone):
    net, tok, _ = backbone
    ids = tok("The pass key is 12345. Remember it. " * 6 + "What is the pass key? The pass key is 12345.")["input_ids"]
    query_len = 8
    feats, cis = ld.extract(net, ids, query_len)
    prefix = len(ids) - query_len
    shape = ld.head_shape(net.config, 1)
    assert feats.shape == (shape.num_layers, prefix, shape.in_features) and feats.dtype == torch.float16
    assert cis.shape == (shape.num_layers, shape.num_kv_heads, prefix)
    captured = {}
    attn = net.model.layers[5].self_attn
    hooks = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o[0]))
             for n in ("q_proj", "k_proj", "v_proj")]
    net.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = net.model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        net.set_attn_implementation("sdpa")
        for h in hooks:
            h.remove()
    qkv = torch.cat([captured["q_proj"], captured["k_proj"], captured["v_proj"]], dim=-1)[:prefix]
    torch.testing.assert_close(feats[5].float(), qkv, rtol=1e-3, atol=1e-2)  # fp16 storage
    for layer, probs in enumerate(out.attentions):  # [1, H_q, T, T], softmax by transformers itself
        group = shape.num_heads // shape.num_kv_heads
        ref = probs[0, :, prefix:, :prefix].reshape(shape.num_kv_heads, group, query_len, prefix).amax(dim=(1, 2))
        torch.testing.assert_close(cis[layer], ref, rtol=1e-4, atol=1e-5)
    again, _ = ld.extract(net, ids, query_len)
    assert torch.equal(again, feats)  # the backbone pass is deterministic


def test_examples_are_seeded_and_heldout_differs(backbone):
    _, tok, _ = backbone
    a = ld.make_examples(tok, 6, 3, (300, 400), (32, 48))
    assert a == ld.make_examples(tok, 6, 3, (300, 400), (32, 48))
    held = ld.make_examples(tok, 6, 3, (300, 400), (32, 48), split="heldout")
    assert not {e.ids for e in a} & {e.ids for e in held}
    assert [e.kind for e in a] == list(ld.TASK_MIX)
    for ex in a:
        assert 300 <= len(ex.ids) <= 400 + 16  # tasks: the prompt's length plus the appended answer
        tail = tok.decode(list(ex.ids[-ex.query_len:]))
        if ex.kind == "passkey":
            assert tail.startswith("\n\nWhat is the pass key?") and "The pass key is" in tail
        elif ex.kind != "text":
            assert "special magic number for" in tail and tail.endswith(".<|im_end|>")


def _parser():
    from vllm_kvevict.cli import locret_cmd

    parser = argparse.ArgumentParser(prog="vllm-kvevict")
    locret_cmd.register(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture(scope="module")
def tiny_run(backbone, tmp_path_factory):
    from vllm_kvevict.cli.locret_cmd import config_from_args

    out = tmp_path_factory.mktemp("tiny")
    args = _parser().parse_args(["locret", "train", "--tiny", "--out", str(out), "--cache-dir", str(out / "cache"),
                                 "--no-progress"])
    cfg = config_from_args(args)
    return cfg, lt.train(cfg, command="tiny", backbone=backbone)


def test_tiny_training_lowers_heldout_loss(tiny_run):
    cfg, doc = tiny_run
    before, after = doc["heldout_before_training"], doc["heldout"]
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    assert after["spearman"] > before["spearman"] + 0.2, (before, after)
    assert doc["history"]["heldout_loss"][0] == pytest.approx(before["loss"], abs=1e-4)
    assert (cfg.out / "loss.png").stat().st_size > 1000 and (cfg.out / "metrics.json").is_file()
    heads = load_retaining_heads(cfg.out / "retaining_heads.pt", expect=ld.head_shape(_default_config(), 0))
    assert heads.shape.hidden == lt.TINY["hidden"]
    assert all(p.dtype == torch.float32 for p in heads.parameters())
    assert heads.meta["heldout"] == after and heads.meta["seed"] == cfg.seed and heads.meta["command"] == "tiny"


def _default_config():
    from transformers import AutoConfig

    from vllm_kvevict.models.smollm2 import prepare_default_model

    return AutoConfig.from_pretrained(prepare_default_model(progress=False))


def test_same_seed_same_weights(tiny_run, backbone, tmp_path):
    cfg, _ = tiny_run
    again = lt.TrainConfig(**{**cfg.__dict__, "out": tmp_path, "progress": False})
    lt.train(again, command="tiny", backbone=backbone)  # features from the same cache: training only
    first = torch.load(cfg.out / "retaining_heads.pt", weights_only=True)["state_dict"]
    second = torch.load(tmp_path / "retaining_heads.pt", weights_only=True)["state_dict"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_cli_errors_name_the_bad_value(tmp_path):
    from vllm_kvevict.cli.locret_cmd import config_from_args

    parser = _parser()
    for argv, text in [(["--context", "2048,1024"], "context='2048,1024'"), (["--samples", "0"], "samples=0"),
                       (["--hidden", "-4"], "hidden=-4")]:
        with pytest.raises(ValueError, match=text):
            config_from_args(parser.parse_args(["locret", "train", "--out", str(tmp_path), *argv]))
    with pytest.raises(SystemExit):
        parser.parse_args(["locret", "train", "--context", "big"])


# ---- the shipped weights --------------------------------------------------------------------------
def test_shipped_weights_fit_the_default_model_and_refuse_other_shapes(tmp_path, capsys):
    path = default_weights_path()
    assert path.is_file() and path.stat().st_size < 8 * 2**20
    info = lt.check(path)
    assert info["shape"]["num_layers"] == 30 and info["meta"]["heldout"]["spearman"] > SHIPPED_MIN_SPEARMAN
    expect = ld.head_shape(_default_config(), 0)
    heads = load_retaining_heads(path, expect=expect)
    assert all(p.dtype == torch.float32 for p in heads.parameters())
    for field, value in [("num_kv_heads", 4), ("num_layers", 32), ("head_dim", 128)]:
        wrong = HeadShape(**{**expect.__dict__, field: value})
        with pytest.raises(ValueError, match=f"{field}=.* but the model has {field}={value}"):
            load_retaining_heads(path, expect=wrong)
    other = tmp_path / "other.pt"
    RetainingHeads(HeadShape(2, 4, 2, 16, 8)).save(other)
    args = _parser().parse_args(["locret", "check", "--weights", str(other)])
    with pytest.raises(ValueError, match="num_layers=2, but the model has num_layers=30"):
        args.func(args)
    args = _parser().parse_args(["locret", "check"])
    assert args.func(args) == 0
    assert "Spearman" in capsys.readouterr().out


def test_shipped_heads_rank_fresh_heldout_text(backbone):
    net, tok, _ = backbone
    heads = load_retaining_heads(default_weights_path(), expect=ld.head_shape(net.config, 0))
    examples = ld.make_examples(tok, 3, 777, (768, 1024), (64, 128), split="heldout")  # text, passkey, text
    metrics = lm.evaluate(heads, (ld.extract(net, ex.ids, ex.query_len) for ex in examples), alpha=0.0025)
    assert metrics["spearman"] > SHIPPED_MIN_SPEARMAN, metrics
    assert metrics["recall_top10"] > SHIPPED_MIN_RECALL, metrics
