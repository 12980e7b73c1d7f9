"""`arbor search`: run one search strategy on a prompt or a problems file and print the best completions.

    arbor search --model PATH --strategy beam --beams 4 --prompt "12+34="
    arbor search --model PATH --strategy mcts --simulations 8 --problems probs.jsonl --json
    arbor search --model PATH --strategy step_beam --prompt "12+34=" --tree tree.html
    arbor search --model PATH --memory --problems long.jsonl     # prompts past the model's trained window

With --json the last line printed is one JSON object per prompt (a JSON list for --problems):
{"completion", "token_ids", "score", "generated_tokens", "forward_passes", ...}.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from agent.settings import Settings
from arbor.options import load_settings, option
from arbor.submission import JOB_SEARCH

CLI_SEARCH = JOB_SEARCH  # the search of `arbor search` unless a flag says otherwise, as a submitted job's


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
        "stages": result.stages,
        "strategy": result.strategy,
    }


def search_command(
    model: Path = typer.Option(..., "--model", help="a save_pretrained model folder (with its tokenizer), or a LoRA "
                               "adapter version's folder (loaded over its base)"),
    strategy: str = option(CLI_SEARCH, "strategy"),
    prompt: Optional[str] = typer.Option(None, help="one prompt"),
    problems: Optional[Path] = typer.Option(None, help="a JSONL file of problems"),
    beams: int = option(CLI_SEARCH, "beams"),
    n: int = option(CLI_SEARCH, "n"),
    max_new_tokens: int = option(CLI_SEARCH, "max_new_tokens"),
    temperature: float = option(CLI_SEARCH, "temperature"),
    groups: int = option(CLI_SEARCH, "groups"),
    diversity_penalty: float = option(CLI_SEARCH, "diversity_penalty"),
    length_penalty: float = option(CLI_SEARCH, "length_penalty"),
    children: int = option(CLI_SEARCH, "children"),
    simulations: int = option(CLI_SEARCH, "simulations"),
    c_puct: float = option(CLI_SEARCH, "c_puct"),
    max_step_tokens: int = option(CLI_SEARCH, "max_step_tokens"),
    scorer: Optional[str] = option(CLI_SEARCH, "scorer"),
    accept_score: Optional[float] = option(CLI_SEARCH, "accept_score"),
    repairs: int = option(CLI_SEARCH, "repairs"),
    use_verifier: bool = option(CLI_SEARCH, "use_verifier"),
    seed: int = option(CLI_SEARCH, "seed"),
    recycling: bool = option(CLI_SEARCH, "recycling"),
    memory: bool = option(CLI_SEARCH, "memory"),
    prompt_format: Optional[str] = option(CLI_SEARCH, "prompt_format"),
    system_prompt: Optional[str] = option(CLI_SEARCH, "system_prompt"),
    device: Optional[str] = option(Settings, "device"),
    dtype: Optional[str] = option(Settings, "dtype"),
    tree: Optional[Path] = typer.Option(None, help="write an HTML view of the search tree here"),
    as_json: bool = typer.Option(False, "--json", help="end with one JSON line"),
):
    """Search for the best completion of a prompt (or of every problem in a JSONL file)."""
    from agent.adapters import load_adapter_policy
    from agent.versions import read_base
    from agent.policy import Policy, PolicyLoadError
    from agent.registry import load_value_beside
    from tasks import Problem
    from tasks.jsonl import read_problems
    from search import run_search
    from search.tree_html import tree_from_candidates, tree_to_html

    if (prompt is None) == (problems is None):
        raise typer.BadParameter("give exactly one of --prompt or --problems")
    if problems is not None:
        items, errors = read_problems(problems)
        for e in errors:
            typer.echo(f"skipped {e}", err=True)
        if not items:
            raise typer.BadParameter(f"{problems} holds no valid problem")
    else:
        items = [Problem(prompt=prompt, id="prompt")]
    try:
        cfg = replace(
            CLI_SEARCH, strategy=strategy, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
            use_verifier=use_verifier, seed=seed, beams=beams, length_penalty=length_penalty, groups=groups,
            diversity_penalty=diversity_penalty, max_step_tokens=max_step_tokens, children=children,
            simulations=simulations, c_puct=c_puct, scorer=scorer, accept_score=accept_score,
            repairs=repairs, keep_tree=tree is not None, recycling=recycling, memory=memory,
            prompt_format=prompt_format, system_prompt=system_prompt,
        )
        settings = load_settings(device=device, dtype=dtype)
        if read_base(model) is not None:  # a LoRA adapter version's folder: over its base
            policy = load_adapter_policy(model, model.name, device=settings.device, dtype=settings.dtype)
        else:
            policy = Policy.load(model, device=settings.device, dtype=settings.dtype)
        cfg.prompt_format_for(policy).check(policy.tokenizer)
        policy.value_model = load_value_beside(model, policy)  # a registry version's, for --scorer value
        cfg.build_scorer(policy)  # 'value' without a value model fails here, in one line
        if memory:
            policy.memory_cache_factory()  # a model that cannot run the context memory fails here, in one line
    except (ValueError, PolicyLoadError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    results = run_search(items, cfg, policy)
    rows = [_row(r) for r in results]
    for r in rows:
        typer.echo(
            f"{r['prompt']!r} -> {r['completion']!r}  score={r['score']:.4f} mean_logprob={r['mean_logprob']:.4f} "
            f"min_logprob={r['min_logprob']:.4f} verified={r['verified']} tokens={r['generated_tokens']} "
            f"passes={r['forward_passes']}"
        )
    if tree is not None:
        tok = policy.tokenizer
        shown = cfg.prompt_format_for(policy)
        roots = [r.tree or tree_from_candidates(tok(shown.apply(tok, r.problem.prompt), add_special_tokens=False)
                                                .input_ids, r.candidates) for r in results]
        tree.write_text(tree_to_html(roots, tok, [f"{r.problem.id}: {strategy}" for r in results]), encoding="utf-8")
        typer.echo(f"tree written to {tree}")
    if as_json:
        typer.echo(json.dumps(rows if problems is not None else rows[0]))
