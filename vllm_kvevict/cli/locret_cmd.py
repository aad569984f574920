"""`vllm-kvevict locret train|check`: train Locret's retaining heads, or check a weights file.

`train` runs `vllm_kvevict.training.locret` (transformers on CPU, no vLLM): it writes the weights
(`retaining_heads.pt`), `metrics.json` and `loss.png` into `--out`. `check` loads a weights file
against the model's shape and prints the held-out metrics recorded when it was trained.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from vllm_kvevict.cli.eval_cmd import _pair


def register(sub: argparse._SubParsersAction) -> None:
    from vllm_kvevict.training.locret import SHIPPED, TINY

    loc = sub.add_parser("locret", help="train or check Locret retaining heads (transformers, CPU)")
    lsub = loc.add_subparsers(dest="locret_command", required=True, metavar="ACTION")

    tr = lsub.add_parser(
        "train", help="train retaining heads on locally generated text and retrieval tasks",
        description="Runs the frozen model once per generated example to get pre-RoPE q/k/v features and "
                    "causal-importance labels (cached on disk), then trains one small MLP per layer. Writes "
                    "retaining_heads.pt, metrics.json and loss.png into --out. Defaults reproduce the shipped "
                    "weights (models/locret/README.md).")
    tr.add_argument("--out", type=Path, default=Path("locret-out"), help="output directory (default locret-out)")
    tr.add_argument("--samples", type=int, default=None, help=f"training examples (default {SHIPPED['samples']})")
    tr.add_argument("--heldout", type=int, default=None, help=f"held-out examples (default {SHIPPED['heldout']})")
    tr.add_argument("--context", type=_pair(int), default=None, metavar="MIN,MAX",
                    help="example lengths in tokens (default {},{})".format(*SHIPPED["context"]))
    tr.add_argument("--epochs", type=int, default=None, help=f"passes over the training examples (default {SHIPPED['epochs']})")
    tr.add_argument("--hidden", type=int, default=None, help=f"d_R, the heads' hidden width (default {SHIPPED['hidden']})")
    tr.add_argument("--seed", type=int, default=None, help="seed of data, initialisation and order (default 0)")
    tr.add_argument("--threads", type=int, default=None, help="torch threads (default: half the cores)")
    tr.add_argument("--model", default=None, help="Hugging Face directory (default: the prepared default model)")
    tr.add_argument("--cache-dir", type=Path, default=None,
                    help="feature/label cache (default: ~/.cache/vllm-kvevict/locret-train)")
    tr.add_argument("--tiny", action="store_true",
                    help="a few short examples ({} train, contexts {}-{}): well under a minute, for tests".format(
                        TINY["samples"], *TINY["context"]))
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=run_train)

    ck = lsub.add_parser("check", help="load retaining-head weights against the model and print their metrics",
                         description="Loads the weights against the model's shape (layers, heads, KV heads, "
                                     "head_dim) and prints the held-out metrics stored when they were trained.")
    ck.add_argument("--weights", type=Path, default=None, help="weights file (default: the shipped weights)")
    ck.add_argument("--model", default=None, help="Hugging Face directory (default: the prepared default model)")
    ck.add_argument("--json", action="store_true", help="print the whole meta as JSON")
    ck.set_defaults(func=run_check)


def config_from_args(args: argparse.Namespace):
    """The TrainConfig for parsed `locret train` arguments (--tiny defaults, then explicit flags)."""
    from vllm_kvevict.training.locret import TrainConfig

    cfg = TrainConfig.tiny() if args.tiny else TrainConfig()
    for name in ("samples", "heldout", "context", "epochs", "hidden", "seed", "threads", "model", "cache_dir"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    cfg.out = args.out
    cfg.progress = not args.no_progress
    cfg.validate()  # before the model loads: a bad flag fails in a second
    return cfg


def canonical_command(cfg, tiny: bool = False) -> str:
    """The command line that reproduces `cfg` (recorded in the weights' meta)."""
    parts = ["vllm-kvevict", "locret", "train"] + (["--tiny"] if tiny else [])
    parts += ["--samples", str(cfg.samples), "--heldout", str(cfg.heldout), "--context", "{},{}".format(*cfg.context),
              "--epochs", str(cfg.epochs), "--hidden", str(cfg.hidden), "--seed", str(cfg.seed)]
    if cfg.model:
        parts += ["--model", str(cfg.model)]
    return shlex.join(parts + ["--out", str(cfg.out)])


def run_train(args: argparse.Namespace) -> int:
    from vllm_kvevict.training.locret import train

    cfg = config_from_args(args)
    doc = train(cfg, command=canonical_command(cfg, args.tiny))
    h, before, t = doc["heldout"], doc["heldout_before_training"], doc["time_s"]
    print(f"held-out ({doc['data']['heldout_examples']} examples): loss {before['loss']:.4f} -> {h['loss']:.4f}, "
          f"Spearman {h['spearman']:.4f}, top-10% recall {h['recall_top10']:.4f}")
    print(f"time: backbone {t['backbone']:.0f} s, training {t['train']:.0f} s, total {t['total']:.0f} s")
    out = Path(cfg.out)
    print(f"wrote {out / 'retaining_heads.pt'}, {out / 'metrics.json'}, {out / 'loss.png'}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from vllm_kvevict.training.locret import check
    from vllm_kvevict.policies.locret import default_weights_path

    weights = args.weights or default_weights_path()
    info = check(weights, args.model)
    meta = info["meta"]
    if args.json:
        print(json.dumps({"weights": str(weights), **info}, indent=2))
        return 0
    s = info["shape"]
    print(f"{weights}: OK for {s['num_layers']} layers x {s['num_heads']} heads / {s['num_kv_heads']} KV heads, "
          f"head_dim {s['head_dim']}, d_R {s['hidden']} ({info['parameters']:,} parameters)")
    held = meta.get("heldout")
    if held:
        data = meta.get("data", {})
        print(f"held-out ({data.get('heldout_examples', '?')} examples, {data.get('heldout_prefix_tokens', '?')} "
              f"tokens): loss {held['loss']:.4f}, Spearman {held['spearman']:.4f}, "
              f"top-10% recall {held['recall_top10']:.4f}")
    else:
        print("no held-out metrics recorded in this file's meta")
    if meta.get("command"):
        print(f"trained with: {meta['command']}")
    return 0
