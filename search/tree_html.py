"""A search tree as one self-contained HTML page: nested collapsible nodes with their text, confidence
(mean log-prob of the step), visits and value; the chosen path is highlighted and open."""

from __future__ import annotations

import html

from search.tree import Node

_STYLE = """
body { font-family: ui-monospace, monospace; font-size: 14px; }
details { margin-left: 1.2em; border-left: 1px dotted #bbb; padding-left: .4em; }
summary { cursor: pointer; }
.best > summary { background: #fff3b0; font-weight: bold; }
.tok { white-space: pre; background: #eef; padding: 0 .2em; }
.meta { color: #666; }
.done { color: #070; } .cut { color: #a00; }
"""


def _summary(node: Node, tokenizer, is_root: bool) -> str:
    text = tokenizer.decode(node.token_ids, skip_special_tokens=True)
    conf = sum(node.logprobs) / len(node.logprobs) if node.logprobs else 0.0
    state = ' <span class="done">[EOS]</span>' if node.finished else (' <span class="cut">[cut]</span>' if node.truncated else "")
    score = f" score={node.score:.3f}" if node.score is not None else ""
    meta = f"conf={conf:.3f} visits={node.visits} value={node.value:.3f} prior={node.prior:.3f}{score}"
    label = "prompt" if is_root else "step"
    return f'{label} <span class="tok">{html.escape(repr(text)[1:-1])}</span>{state} <span class="meta">{meta}</span>'


def _node_html(root: Node, tokenizer) -> str:
    # an explicit stack, not recursion: a token trie is as deep as its longest completion (thousands of nodes)
    parts, stack = [], [root]
    while stack:
        node = stack.pop()
        if node is None:
            parts.append("</details>")
            continue
        cls = ' class="best"' if node.on_best_path else ""
        opened = " open" if node.on_best_path or node is root else ""
        parts.append(f"<details{cls}{opened}><summary>{_summary(node, tokenizer, node is root)}</summary>")
        stack.append(None)  # closes this node after its children
        stack.extend(reversed(sorted(node.children, key=lambda c: -c.visits)))  # most visited popped first
    return "".join(parts)


def tree_to_html(roots: list[Node], tokenizer, titles: list[str]) -> str:
    body = "".join(f"<h3>{html.escape(t)}</h3>{_node_html(r, tokenizer)}" for r, t in zip(roots, titles))
    return f"<!doctype html><meta charset='utf-8'><title>Arbor search tree</title><style>{_STYLE}</style>{body}"


def tree_from_candidates(prompt_ids: list[int], candidates) -> Node:
    """A token trie of a strategy's candidates (for strategies that keep no tree: greedy, best-of-N, beams);
    visits = candidates through a node, the first (best) candidate's path marked."""
    root = Node(token_ids=list(prompt_ids))
    for rank, c in enumerate(candidates):
        node = root
        node.visits += 1
        for t, lp in zip(c.token_ids, c.logprobs or [0.0] * len(c.token_ids)):
            nxt = next((k for k in node.children if k.token_ids == [t]), None)
            if nxt is None:
                nxt = Node(token_ids=[t], logprobs=[lp], parent=node)
                node.children.append(nxt)
            node = nxt
            node.visits += 1
            node.on_best_path = node.on_best_path or rank == 0
        node.finished = node.finished or c.finished
        node.score = c.score if node.score is None else node.score
    root.on_best_path = True
    return root
