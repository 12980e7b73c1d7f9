"""`arbor search`: run one search strategy on a prompt or a problems file and print the best completions.

    arbor search --model PATH --strategy beam --beams 4 --prompt "12+34="
    arbor search --model PATH --strategy mcts --simulations 8 --problems probs.jsonl --json
    arbor search --model PATH --strategy step_beam --prompt "12+34=" --tree tree.html

With --json the last line printed is one JSON object per prompt (a JSON list for --problems):
{"completion", "token_ids", "score", "generated_tokens", "forward_passes", ...}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from arbor.cli import app


def _row(result) -> dict:
    best = result.best
    return {
        "id": result.problem.id,
        "prompt": result.problem.prompt,
        "completion": best.completion,
        "token_ids": best.token_ids,
        "score": best.score,
        "mean_logprob": best.mean_logprob,
        "min_logprob": best.min_logprob,
        "mean_entropy": best.mean_entropy,
        "finished": best.finished,
        "verified": best.verified,
        "candidates": len(result.candidates),
        "generated_tokens": result.generated_tokens,
        "forward_passes": result.forward_passes,
        "strategy": result.strategy,
    }


@app.command("search")
def search_command(
    model: Path = typer.Option(..., "--model", help="a save_pretrained model folder (with its tokenizer)"),
    strategy: str = typer.Option("beam", help="greedy, best_of_n, beam, step_beam, diverse_beam or mcts"),
    prompt: Optional[str] = typer.Option(None, help="one prompt"),
    problems: Optional[Path] = typer.Option(None, help="a JSONL file of problems"),
    beams: int = typer.Option(4, help="beam width (beam, step_beam, diverse_beam)"),
    n: int = typer.Option(8, help="samples for best_of_n"),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(1.0, help="sampling temperature (best_of_n, step_beam, mcts)"),
    groups: int = typer.Option(2, help="diverse_beam groups"),
    diversity_penalty: float = typer.Option(1.0),
    length_penalty: float = typer.Option(1.0),
    children: int = typer.Option(4, help="children per expansion (step_beam, mcts)"),
    simulations: int = typer.Option(8, help="mcts simulations"),
    c_puct: float = typer.Option(1.0),
    max_step_tokens: int = typer.Option(4, help="a tree step ends after this many tokens or at the delimiter"),
    scorer: Optional[str] = typer.Option(None, help="e.g. mean_logprob, min_logprob, neg_entropy, verifier+mean_logprob"),
    use_verifier: bool = typer.Option(False, help="let the checker rank finished answers (problems with answers)"),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu"),
    tree: Optional[Path] = typer.Option(None, help="write an HTML view of the search tree here"),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line"),
):
    """Search for the best completion of a prompt (or of every problem in a JSONL file)."""
    from agent.policy import Policy, PolicyLoadError
    from tasks import Problem
    from tasks.jsonl import read_problems
    from search import STRATEGIES, SearchConfig, run_search
    from search.tree_html import tree_from_candidates, tree_to_html

    if (prompt is None) == (problems is None):
        raise typer.BadParameter("give exactly one of --prompt or --problems")
    if strategy not in STRATEGIES:
        raise typer.BadParameter(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if problems is not None:
        items, errors = read_problems(problems)
        for e in errors:
            typer.echo(f"skipped {e}", err=True)
        if not items:
            raise typer.BadParameter(f"{problems} holds no valid problem")
    else:
        items = [Problem(prompt=prompt, id="prompt")]
    try:
        cfg = SearchConfig(
            strategy=strategy, n=n, temperature=temperature, max_new_tokens=max_new_tokens, use_verifier=use_verifier,
            seed=seed, beams=beams, length_penalty=length_penalty, groups=groups, diversity_penalty=diversity_penalty,
            max_step_tokens=max_step_tokens, children=children, simulations=simulations, c_puct=c_puct, scorer=scorer,
            keep_tree=tree is not None,
        )
        policy = Policy.load(model, device=device)
    except (ValueError, PolicyLoadError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    results = run_search(items, cfg, policy)
    rows = [_row(r) for r in results]
    for r in rows:
        typer.echo(
            f"{r['prompt']!r} -> {r['completion']!r}  score={r['score']:.4f} mean_logprob={r['mean_logprob']:.4f} "
            f"min_logprob={r['min_logprob']:.4f} verified={r['verified']} tokens={r['generated_tokens']} passes={r['forward_passes']}"
        )
    if tree is not None:
        tok = policy.tokenizer
        roots = [r.tree or tree_from_candidates(tok(r.problem.prompt, add_special_tokens=False).input_ids, r.candidates) for r in results]
        tree.write_text(tree_to_html(roots, tok, [f"{r.problem.id}: {strategy}" for r in results]), encoding="utf-8")
        typer.echo(f"tree written to {tree}")
    if as_json:
        typer.echo(json.dumps(rows if problems is not None else rows[0]))
