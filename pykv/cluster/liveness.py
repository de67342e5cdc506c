"""Which dead member the metadata leader may take out of the shard map, and when (pure rules).

The server measures how long each member has been silent (pykv.server.node probes them from
the metadata leader, with timers started at its election); :func:`decide_removal` applies the
rules a user relies on to those figures:

- a member silent for ``dead_after`` seconds or more is dead; one heard from within
  ``live_within`` seconds is live; one in between is neither (suspect: not counted live,
  not removed yet);
- a dead member is removed only while at least ``replicas`` live members remain, so that
  every partition can be given R live replicas: with 3 nodes and R=3, nothing is removed;
- one member at a time: nothing is removed while the shards still move after the last map
  change, unless that change is itself ``dead_after`` old (its moves may wait on another
  dead member, which only a further removal can unblock);
- of several dead members the longest silent goes first (then the lowest id), so that the
  choice is the same on every run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pykv.errors import InvalidArgument


@dataclass(frozen=True)
class Removal:
    """The verdict of one look at the members: whom to remove (or None) and why."""

    node: int | None
    dead: tuple[int, ...]
    live: tuple[int, ...]
    reason: str


def decide_removal(
    nodes: Sequence[int],
    silence: Mapping[int, float],
    *,
    replicas: int,
    dead_after: float,
    live_within: float,
    moving: bool = False,
    map_age: float = 0.0,
) -> Removal:
    """Whom of ``nodes`` (the map's members) to remove now, given each one's ``silence``.

    ``silence[n]`` is how long (seconds) the leader has heard nothing from ``n``; a node
    missing from it counts as just heard from. ``moving`` says the shards are not yet where
    the current map places them, ``map_age`` how long ago (seconds) the leader first saw
    the current map.
    """
    if dead_after <= 0 or live_within <= 0:
        raise InvalidArgument("dead_after and live_within must be positive")
    quiet = {n: silence.get(n, 0.0) for n in nodes}
    dead = tuple(sorted((n for n in nodes if quiet[n] >= dead_after), key=lambda n: (-quiet[n], n)))
    live = tuple(sorted(n for n in nodes if quiet[n] < live_within))
    if not dead:
        return Removal(None, dead, live, "no member is dead")
    if len(live) < replicas:
        return Removal(None, dead, live, f"only {len(live)} live members for {replicas} replicas")
    if moving and map_age < dead_after:
        return Removal(None, dead, live, "shards still move after the last map change")
    return Removal(dead[0], dead, live, f"silent for {quiet[dead[0]]:.1f}s")


__all__ = ["Removal", "decide_removal"]
