"""The one rule that decides promotion, and an operator's promotion and rollback (the API and the CLI).

The loop (agent/loop.py), the store-driven train cycle (agent/train_cycle.py) and an operator all promote by
`beats`; the write itself is one compare-and-set, `promote_in`, which the store calls: a candidate judged
against its parent is promoted only while that parent is still the promoted version. No torch here: the HTTP
service decides promotions without loading a model stack.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from agent.config import LoopConfig
from agent.schema import PolicyVersionRow, utc_now

ANY_PROMOTED = object()  # promote without a compare: whatever is promoted is retired


def beats(candidate_score: float, current_score: float, margin: float) -> bool:
    """The promotion rule: a candidate must beat the current policy's gate score by more than `margin`."""
    return candidate_score > current_score + margin


def promote_in(s, version: str, expected: str | None | object) -> bool:
    """The one write of a promotion, inside the caller's transaction: a compare-and-set on the promoted version.
    Promotes `version` and retires `expected` only if `expected` is still the promoted version (None: nothing is
    promoted; ANY_PROMOTED: no compare). A decision taken against one promoted version (a gate that compared a
    candidate with its parent, an operator's rollback) never overrides a promotion written since.

    Writes before it reads: each UPDATE's WHERE is evaluated when it writes, so a racing promotion is seen (PostgreSQL
    re-checks the row after the lock; SQLite serialises writers), where a row read first could be a stale snapshot.
    Two promotions at once: the one-promoted unique index refuses the later one (IntegrityError: retry)."""
    if expected is ANY_PROMOTED:
        s.execute(update(PolicyVersionRow).where(PolicyVersionRow.status == "promoted", PolicyVersionRow.version != version)
                  .values(status="retired"))
    elif expected is not None and expected != version:
        retired = s.execute(update(PolicyVersionRow).where(PolicyVersionRow.version == expected,
                                                            PolicyVersionRow.status == "promoted").values(status="retired"))
        if retired.rowcount != 1:
            return False
    elif expected is None:
        try:
            with s.begin_nested():  # the unique index refuses it when a version is promoted
                return _set_promoted(s, version)
        except IntegrityError:
            return False
    return _set_promoted(s, version)


def _set_promoted(s, version: str) -> bool:
    s.flush()
    if s.execute(update(PolicyVersionRow).where(PolicyVersionRow.version == version)
                 .values(status="promoted", promoted_at=utc_now())).rowcount != 1:
        raise KeyError(f"no policy version {version!r}")
    return True


def promote_margin(settings) -> float:
    """The deployment's margin (ARBOR_PROMOTE_MARGIN), else LoopConfig's default."""
    return settings.promote_margin if settings.promote_margin is not None else LoopConfig.promote_margin


class PromotionRefused(ValueError):
    """An operator's promotion or rollback that the rules refuse (one line: why, and what to do)."""


class UnknownVersion(KeyError):
    """A policy version the store does not hold."""

    def __str__(self) -> str:
        return str(self.args[0])


def promote_by_operator(store, version: str, margin: float) -> dict:
    """Promote `version` by the gate's rule: its recorded gate score must beat the promoted version's by more than
    `margin`. A version that was promoted before (retired) passed the gate once and may come back; one never gated (no
    gate score) is refused. The write is a compare-and-set on the promoted version this decision read."""
    rows = {r.version: r for r in store.policies()}
    row = rows.get(version)
    if row is None:
        raise UnknownVersion(f"no policy version {version!r}")
    if row.status == "promoted":
        raise PromotionRefused(f"{version} is already the promoted version")
    if not Path(row.path).is_dir():
        raise PromotionRefused(f"{version}'s checkpoint {row.path} is missing: it cannot be served")
    current = next((r for r in rows.values() if r.status == "promoted"), None)
    if row.status != "retired" and current is not None:
        score = (row.metrics or {}).get("gate_score")
        if score is None:
            raise PromotionRefused(f"{version} was never gated (no gate score): register your own model with "
                                   "`arbor policies add PATH`")
        reference = (current.metrics or {}).get("gate_score")
        if reference is None:  # the promoted version was never gated (v0, an added model): what the gate measured
            reference = (row.metrics or {}).get("current_gate_score", 0.0)
        if not beats(score, reference, margin):
            raise PromotionRefused(f"{version}'s gate score {score:.3f} does not beat {current.version}'s "
                                   f"{reference:.3f} by more than the promote margin {margin:g}: not promoted")
    previous = current.version if current else None
    if not store.promote_policy(version, expected=previous):
        raise PromotionRefused(f"the promoted version changed while {version} was being checked: try again")
    return {"promoted": version, "previous": previous}


def rollback(store) -> dict:
    """Promote the version that was promoted before the current one; the current one is marked rejected (so a second
    rollback goes one further back)."""
    rows = store.policies()
    current = next((r for r in rows if r.status == "promoted"), None)
    if current is None:
        raise PromotionRefused("no version is promoted: nothing to roll back")
    earlier = sorted((r for r in rows if r.status == "retired" and r.promoted_at is not None and Path(r.path).is_dir()),
                     key=lambda r: r.promoted_at)
    if not earlier:
        raise PromotionRefused(f"{current.version} is the only version ever promoted: nothing to roll back to")
    previous = earlier[-1]
    if not store.promote_policy(previous.version, expected=current.version):
        raise PromotionRefused(f"the promoted version changed while rolling back from {current.version}: try again")
    store.set_policy_status(current.version, "rejected", {"rolled_back_at": dt.datetime.now(dt.timezone.utc).isoformat()})
    return {"promoted": previous.version, "previous": current.version}
