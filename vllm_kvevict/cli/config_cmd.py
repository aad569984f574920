"""`vllm-kvevict check-config FILE...`: validate policy presets before a server reads them.

A bad preset stops `vllm serve` at start-up. In Kubernetes that is a pod crash-looping after the
rollout, so CI and `kubectl apply` users want the same check earlier, on the files they ship. It takes
preset files (`configs/*.yaml`) and Kubernetes YAML (multi-document, e.g. `kubectl kustomize DIR | vllm-kvevict
check-config -`): for each ConfigMap, every data value whose key ends in `.yaml`/`.yml` is a preset.
Presets go through `PolicyConfig.from_dict`, the schema the server uses, so the errors are the
server's: they name the bad field and value and say what is allowed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterator

from vllm_kvevict.policies.config import PolicyConfig

PRESET_SUFFIXES = (".yaml", ".yml")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "check-config",
        help="validate KV policy presets: preset YAML files or Kubernetes YAML with ConfigMaps holding them",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="a preset or Kubernetes YAML file; '-' reads stdin")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.files:
        try:
            for where, config in check_file(name):
                print(f"OK {where}: {describe(config)}")
        except ValueError as exc:
            failed += 1
            print(f"FAIL {exc}", file=sys.stderr)
    if failed:
        raise ValueError(f"{failed} of {len(args.files)} file(s) failed validation (see above)")
    return 0


def describe(config: PolicyConfig) -> str:
    return config.policy if config.budget is None else f"{config.policy}, budget {config.budget}"


def check_file(name: str) -> list[tuple[str, PolicyConfig]]:
    """Every preset in one file as (where, config); ValueError naming the file (and key) on the first bad one."""
    import yaml

    if name == "-":
        text = sys.stdin.read()
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"{name}: no such file")
        text = path.read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ValueError(f"{name}: not valid YAML: {exc}") from None
    if not any(_is_k8s(d) for d in docs):
        # a preset file: one mapping (an empty file is `none`, as `--kv-config` reads it)
        if len(docs) > 1:
            raise ValueError(f"{name}: a preset is one YAML document, found {len(docs)}")
        return [(name, _check(docs[0] if docs else {}, name))]
    found = []
    for obj in _objects(docs, name):
        if obj.get("kind") != "ConfigMap":
            continue
        cm = f"ConfigMap {(obj.get('metadata') or {}).get('name')!r}"
        for key, value in sorted((obj.get("data") or {}).items()):
            if not str(key).endswith(PRESET_SUFFIXES):
                continue
            where = f"{name}: {cm}, key {key!r}"
            try:
                data = yaml.safe_load(value) if isinstance(value, str) else value
            except yaml.YAMLError as exc:
                raise ValueError(f"{where}: not valid YAML: {exc}") from None
            found.append((where, _check({} if data is None else data, where)))
    if not found:
        raise ValueError(
            f"{name}: no policy preset found: expected a ConfigMap with a data key ending in "
            f"{' or '.join(PRESET_SUFFIXES)} (or a preset file)"
        )
    return found


def _check(data: Any, where: str) -> PolicyConfig:
    try:
        return PolicyConfig.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _is_k8s(doc: Any) -> bool:
    # presets never carry these keys (PolicyConfig rejects unknown keys), manifests always do
    return isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc


def _objects(docs: list[Any], name: str) -> Iterator[dict]:
    for doc in docs:
        if not _is_k8s(doc):
            raise ValueError(f"{name}: a document without apiVersion/kind among Kubernetes objects: {str(doc)[:80]!r}")
        if doc["kind"].endswith("List"):  # `kubectl get -o yaml` output
            yield from _objects(doc.get("items") or [], name)
        else:
            yield doc
