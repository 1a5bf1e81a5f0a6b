"""Where a dataset's cache goes: node selector terms, placement, sticky choices.

Pure functions over plain objects (Kubernetes nodes as dicts, facts as numbers), so the
choice is easy to test and the same on every replay.
"""

from __future__ import annotations

from typing import Any

from cairn.kube.api import Obj, labels

Term = dict[str, Any]


def _expression_matches(node_labels: dict[str, str], expr: dict[str, Any]) -> bool:
    key, op, values = expr.get("key", ""), expr.get("operator", "In"), expr.get("values") or []
    have = key in node_labels
    value = node_labels.get(key)
    if op == "In":
        return have and value in values
    if op == "NotIn":
        return not have or value not in values
    if op == "Exists":
        return have
    if op == "DoesNotExist":
        return not have
    if op in ("Gt", "Lt"):
        try:
            number, bound = int(value or ""), int(values[0])
        except (ValueError, IndexError):
            return False
        return number > bound if op == "Gt" else number < bound
    return False


def term_matches(node: Obj, term: Term) -> bool:
    """One NodeSelectorTerm: every matchExpression (and matchFields on metadata.name)."""
    node_labels = labels(node)
    if not all(_expression_matches(node_labels, e) for e in term.get("matchExpressions") or []):
        return False
    fields = {"metadata.name": node.get("metadata", {}).get("name", "")}
    return all(_expression_matches(fields, e) for e in term.get("matchFields") or [])


def affinity_allows(node: Obj, node_affinity: dict[str, Any] | None) -> bool:
    """A Dataset's nodeAffinity: `required.nodeSelectorTerms` are ORed (none: any node)."""
    terms = ((node_affinity or {}).get("required") or {}).get("nodeSelectorTerms") or []
    return not terms or any(term_matches(node, t) for t in terms)


def selector_allows(node: Obj, selector: dict[str, str] | None) -> bool:
    node_labels = labels(node)
    return all(node_labels.get(k) == v for k, v in (selector or {}).items())


def schedulable(node: Obj) -> bool:
    if node.get("spec", {}).get("unschedulable"):
        return False
    for cond in node.get("status", {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return True  # a node that says nothing of readiness is taken at its word


def choose_nodes(
    *,
    nodes: list[Obj],
    current: list[str],
    replicas: int,
    node_affinity: dict[str, Any] | None,
    node_selector: dict[str, str] | None,
    taken: set[str],
    available: dict[str, int],
    dead: set[str],
) -> list[str]:
    """The cache nodes a runtime should have: the current ones that still qualify first
    (a cache is expensive to move), then the eligible nodes with the most free space
    (`available`, from the node plugins' capacity reports), by name on ties; scaling in
    drops the newest. `taken`: nodes another dataset holds exclusively (or this one is
    exclusive and they hold another); `dead`: nodes whose plugin stopped reporting."""
    by_name = {n.get("metadata", {}).get("name", ""): n for n in nodes}

    def eligible(name: str) -> bool:
        node = by_name.get(name)
        return (node is not None and name not in taken and name not in dead
                and schedulable(node) and selector_allows(node, node_selector)
                and affinity_allows(node, node_affinity))  # fmt: skip

    chosen = [n for n in current if eligible(n)][:replicas]
    others = sorted((n for n in by_name if n not in chosen and eligible(n)),
                    key=lambda n: (-available.get(n, 0), n))  # fmt: skip
    return chosen + others[: max(replicas - len(chosen), 0)]


def shares(paths: list[tuple[str, int]], nodes: list[str]) -> dict[str, list[str]]:
    """A DataLoad's work: each (path, replicas) goes to `replicas` nodes, round robin, so
    the nodes share the load; node -> its paths."""
    out: dict[str, list[str]] = {}
    if not nodes:
        return out
    turn = 0
    for path, copies in paths:
        for i in range(min(max(copies, 1), len(nodes))):
            out.setdefault(nodes[(turn + i) % len(nodes)], []).append(path)
        turn += 1
    return out
