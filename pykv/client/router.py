"""Routing requests to shard leaders: the shard map, leader hints, redirects and safe retries.

``Router`` is asyncio code shared by the clients and by nodes (a node asks a coordinator
shard for a 2PC decision through one). It learns the shard map from any reachable address
(asking the next when one is silent for a moment), then sends each request to the node it
believes leads the shard: the last that answered for it, or a ``[REDIRECT, hint]``'s. An
unreachable node or a redirect without a hint makes it try the shard's other replicas,
with a short backoff, until the deadline; a node that falls silent during an attempt (frozen,
or cut off; one that answers a PING is only slow, and waited for) is passed over for a while. Retrying is safe because every command is idempotent by transaction id on the
replicas (pykv.replica.shard): a commit that did apply returns its first outcome again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pykv.client.transport import EXPORT, META_GROUP, PING, READ, SCAN, SHARD_MAP, Redirect, unwrap
from pykv.cluster.ring import HashRing
from pykv.errors import (
    InvalidArgument,
    OutcomeUnknown,
    StoreClosed,
    Timeout,
    Unavailable,
    WrongCluster,
)
from pykv.net.framing import CLUSTER_MAX_FRAME
from pykv.net.protocol import Connection, parse_address

_READS = frozenset((READ, SCAN, EXPORT))  # request kinds that change nothing on the shard
# Seconds before connecting again to an address where a node of another cluster answered.
WRONG_CLUSTER_RECHECK = 5.0
# Seconds a map request waits for an answer before the next address is asked as well.
MAP_ASK_STAGGER = 0.25


@dataclass
class ShardMapView:
    """What a node tells clients: ring parameters, replica sets, addresses, leader hints."""

    version: int
    partitions: int
    vnodes: int
    replicas: int
    nodes: dict[int, str]
    shards: list[list[int]]
    leaders: list[int | None] = field(default_factory=list)
    meta: list[int] = field(default_factory=list)  # the metadata group's members
    encoded: bytes | None = None  # the pykv.cluster.shardmap.ShardMap, encoded

    @classmethod
    def from_wire(cls, raw: dict) -> ShardMapView:
        return cls(
            version=raw["version"],
            partitions=raw["partitions"],
            vnodes=raw["vnodes"],
            replicas=raw["replicas"],
            nodes={int(k): v for k, v in raw["nodes"].items()},
            shards=[list(s) for s in raw["shards"]],
            leaders=list(raw.get("leaders") or [None] * raw["partitions"]),
            meta=list(raw.get("meta") or []),
            encoded=raw.get("map"),
        )

    def ring_for_keys(self) -> HashRing:
        """A ring that maps keys to partitions (placement of partitions comes from ``shards``)."""
        return HashRing([0], partitions=self.partitions, vnodes=1, replicas=1)


def split_addresses(addresses: str | Iterable[str]) -> list[str]:
    """Addresses given as a list, one string, or strings of addresses separated by commas
    (as etcd's --endpoints takes them): one flat list, unchecked."""
    given = [addresses] if isinstance(addresses, str) else list(addresses)
    if not all(isinstance(a, str) for a in given):
        raise InvalidArgument(f"addresses must be 'HOST:PORT' strings, not {addresses!r}")
    return [a.strip() for text in given for a in text.split(",") if a.strip()]


def seed_addresses(addresses: str | Iterable[str]) -> list[str]:
    """The addresses a client is given (split_addresses), each checked as "HOST:PORT".
    InvalidArgument for none, or for one that is not HOST:PORT."""
    seeds = split_addresses(addresses)
    if not seeds:
        raise InvalidArgument("connect needs at least one address")
    for address in seeds:
        parse_address(address)
    return seeds


def check_timeout(timeout: float) -> None:
    """InvalidArgument unless ``timeout`` (seconds) is above 0 (NaN is not)."""
    if not timeout > 0:
        raise InvalidArgument(f"timeout must be a number of seconds above 0, not {timeout!r}")


class Router:
    """Leader-aware request routing for one cluster (runs on one event loop)."""

    def __init__(
        self,
        seeds: list[str],
        *,
        timeout: float = 10.0,
        connect_timeout: float = 2.0,
        attempt_timeout: float = 0.75,
        max_frame: int = CLUSTER_MAX_FRAME,
        cluster: str | None = None,
    ) -> None:
        if not seeds:
            raise InvalidArgument("connect needs at least one address")
        check_timeout(timeout)
        self.seeds = list(seeds)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_frame = max_frame
        # The cluster every node reached must belong to, named in each HELLO: a node's own;
        # for a client, the one of the first shard map it gets (so a client never talks on to
        # another cluster started later on the same addresses, nor mixes two clusters' nodes
        # given among its seeds).
        self.cluster = cluster
        # Addresses where a node of another cluster answered: asked again only after
        # WRONG_CLUSTER_RECHECK seconds (each refusal is logged at both ends), with the time.
        self._wrong: dict[str, tuple[float, WrongCluster]] = {}
        # An attempt ends once its node has said nothing at all for this long (asked with a
        # PING meanwhile), and another replica is tried: a leader that is frozen (SIGSTOP, a
        # long GC pause) keeps its connections open but answers nothing, and waiting the
        # whole deadline on it would stall the client that long. A node that answers the
        # PING is waited for: its request is only slow (a read waiting on the keys of a
        # transaction being settled), and passing it over would only make the wait longer.
        self.attempt_timeout = attempt_timeout
        # Nodes that fell silent during an attempt, and until when to pass them over. Followers keep
        # naming a frozen leader in redirects until they elect another, and following such a
        # hint costs another whole attempt timeout. One attempt timeout is about when an
        # election is over; a leader that was only slow is back in line after it.
        self.suspect_for = attempt_timeout
        self._suspects: dict[int, float] = {}
        self.timeouts: Counter[int] = Counter()  # attempts that timed out (node silent), per node
        self.map: ShardMapView | None = None
        self._ring: HashRing | None = None
        self._leaders: dict[int, int] = {}
        self._conns: dict[str, Connection] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self._map_lock: asyncio.Lock | None = None
        self.map_fetches = 0  # shard maps fetched (refresh_map): calls waiting on one share it
        self._asking: set[asyncio.Future] = set()  # map requests of a fetch that ended without them
        self.closed = False

    # --- connections ------------------------------------------------------------------------

    async def connection(self, address: str, timeout: float | None = None) -> Connection:
        """The open connection to ``address``, or a new one (Unavailable when it is not up
        within ``timeout``, at most connect_timeout: a call's deadline bounds it).
        StoreClosed once the router is closed: a call under way then ends rather than
        connect again, leaving a connection that nothing would close."""
        if self.closed:
            raise StoreClosed("the cluster client is closed")
        conn = self._conns.get(address)
        if conn is not None and not conn.closed:
            return conn
        wait = self.connect_timeout if timeout is None else max(0.0, min(timeout, self.connect_timeout))
        pending = self._connecting.get(address)
        if pending is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(pending), wait)
            except asyncio.TimeoutError:
                raise Unavailable(f"cannot connect to {address}: not connected within {wait:.3g}s") from None
        fut = asyncio.get_running_loop().create_future()
        self._connecting[address] = fut
        try:
            conn = await self._open(address, wait)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            self._connecting.pop(address, None)
        if self.closed:  # closed while this connection was being opened
            conn.close()
            raise StoreClosed("the cluster client is closed")
        self._conns[address] = conn
        fut.set_result(conn)
        return conn

    async def _open(self, address: str, timeout: float) -> Connection:
        now = asyncio.get_running_loop().time()
        until, wrong = self._wrong.get(address, (0.0, None))
        if wrong is not None and now < until:
            raise wrong
        try:
            conn = await Connection.open(address, timeout=timeout, max_frame=self.max_frame,
                                         cluster=self.cluster)
        except WrongCluster as exc:
            wrong = WrongCluster(f"{address}: {exc}: a node of another cluster answers there "
                                 f"(a wrong address, or another cluster started on its port)")
            self._wrong[address] = (now + WRONG_CLUSTER_RECHECK, wrong)
            raise wrong from None
        self._wrong.pop(address, None)
        return conn

    def _learn_cluster(self, address: str, theirs: str | None) -> None:
        """Learn the cluster from the first node's shard map; WrongCluster for a node of
        another one (met while the first requests were under way: a node refuses a HELLO
        that names another cluster)."""
        if theirs is None:
            return
        if self.cluster is None:
            self.cluster = theirs
        elif theirs != self.cluster:
            raise WrongCluster(f"{address}: the node belongs to cluster {theirs!r}, this client "
                               f"to cluster {self.cluster!r}")

    async def call_address(self, address: str, kind: int, body: Any, timeout: float) -> Any:
        conn = await self.connection(address, timeout)
        return unwrap(await conn.request(kind, body, timeout))

    # --- the shard map ------------------------------------------------------------------------

    async def refresh_map(self, timeout: float | None = None) -> ShardMapView:
        """Fetch the shard map from the first address that answers (seeds, then known nodes,
        nodes under suspicion last), within ``timeout`` seconds in all (a call's deadline; by
        default the client's). Calls that wait while another fetches take its map."""
        if self._map_lock is None:
            self._map_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        fetches = self.map_fetches
        async with self._map_lock:
            if self.map_fetches != fetches and self.map is not None:
                # Fetched while this call waited: asking again would only make every call
                # that failed at once wait in turn on the same silent node.
                return self.map
            candidates = self._map_sources()
            raw, errors, wrong = await self.ask_for_map(candidates, deadline)
            if raw is None:
                why = "no node answered for the shard map: " + "; ".join(errors)
                raise WrongCluster(why) if wrong == len(candidates) else Unavailable(why)
            view = ShardMapView.from_wire(raw)
            self.map_fetches += 1
            if self.map is None or view.version >= self.map.version:
                self.map = view
                self._ring = view.ring_for_keys()
                for shard, leader in enumerate(view.leaders):
                    if leader is not None:
                        self._leaders.setdefault(shard, leader)
            return self.map

    async def ask_for_map(self, addresses: list[str], deadline: float) -> tuple[Any, list[str], int]:
        """The first shard map (as the wire has it) that ``addresses`` answer: asked in turn,
        the next as soon as one fails or MAP_ASK_STAGGER passes without an answer (a frozen
        node answers nothing until its connect timeout), each within connect_timeout and the
        deadline (loop time). Returns (the map or None, the errors, how many of them were
        nodes of another cluster). An address that is not HOST:PORT is one more error."""
        loop = asyncio.get_running_loop()
        waiting = list(addresses)
        asking: dict[asyncio.Future, str] = {}
        errors: list[str] = []
        wrong = 0
        try:
            while waiting or asking:
                if waiting:
                    address = waiting.pop(0)
                    wait = min(self.connect_timeout, deadline - loop.time())
                    if wait <= 0:
                        errors.append(f"{address}: not asked (out of time)")
                        continue
                    asking[asyncio.ensure_future(self.call_address(address, SHARD_MAP, None, wait))] = address
                done, _ = await asyncio.wait(
                    asking, timeout=MAP_ASK_STAGGER if waiting else None, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    address = asking.pop(task)
                    try:
                        raw = task.result()
                        self._learn_cluster(address, raw.get("cluster"))
                    except (Unavailable, Timeout, OSError, WrongCluster, InvalidArgument) as exc:
                        errors.append(f"{address}: {exc}")
                        wrong += isinstance(exc, WrongCluster)
                        if isinstance(exc, Timeout):
                            self._timed_out(self._node_at(address))
                        continue
                    return raw, errors, wrong
            return None, errors, wrong
        finally:
            for task in asking:  # left to end by their own timeouts (a cancelled connect
                # would fail every other call waiting on it); close() cancels them
                self._asking.add(task)
                task.add_done_callback(self._asked)

    def _asked(self, task: asyncio.Future) -> None:
        """A map request no longer waited for has ended: its outcome is not needed."""
        self._asking.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved, so that asyncio does not log it

    def _map_sources(self) -> list[str]:
        """Where to ask for the shard map: the seeds, then every node of the map, those under
        suspicion last (a frozen first seed would otherwise cost every refresh its wait)."""
        addresses = list(dict.fromkeys(self.seeds + (list(self.map.nodes.values()) if self.map else [])))
        if not self._suspects:
            return addresses
        return sorted(addresses, key=lambda address: self._suspected(self._node_at(address)))

    def _node_at(self, address: str) -> int | None:
        """The id of the node the map places at ``address`` (None: not in the map)."""
        if self.map is not None:
            for node, node_address in self.map.nodes.items():
                if node_address == address:
                    return node
        return None

    async def ensure_map(self) -> ShardMapView:
        return self.map if self.map is not None else await self.refresh_map()

    def shard_of(self, key: str) -> int:
        assert self._ring is not None, "ensure_map() first"
        return self._ring.partition_of(key)

    # --- calls to a shard's leader ------------------------------------------------------------

    def _replicas(self, view: ShardMapView, shard: int) -> list[int]:
        if shard == META_GROUP:
            # The metadata group's voters as the node that gave the map saw them; any node
            # if it named none (it redirects to the leader it knows).
            return list(view.meta) or sorted(view.nodes)
        return view.shards[shard]

    def _first_candidate(self, view: ShardMapView, shard: int, leader: int | None) -> int:
        """``_candidates(view, shard, leader)[0]`` without building the list."""
        if self._suspects:
            return self._candidates(view, shard, leader)[0]
        if leader is not None and leader in view.nodes:
            return leader
        return self._replicas(view, shard)[0]

    def _candidates(self, view: ShardMapView, shard: int, leader: int | None) -> list[int]:
        """The nodes to try for shard, the leader hint first; nodes under suspicion only when
        every one is."""
        replicas = list(self._replicas(view, shard))
        if leader is not None and leader in view.nodes:
            # A redirect's hint wins even when the map does not list that node (yet, or any
            # more): during a move the group's members and the map's placement differ.
            if leader in replicas:
                replicas.remove(leader)
            replicas.insert(0, leader)
        if self._suspects:
            trusted = [node for node in replicas if not self._suspected(node)]
            return trusted or replicas
        return replicas

    def _suspected(self, node: int | None) -> bool:
        until = self._suspects.get(node)  # type: ignore[arg-type] - None is never a suspect
        if until is None:
            return False
        if asyncio.get_running_loop().time() < until:
            return True
        del self._suspects[node]
        return False

    def _timed_out(self, node: int | None) -> None:
        """An attempt on ``node`` got no reply, nor any word from it: count it and pass the
        node over."""
        if node is not None:
            self._suspects[node] = asyncio.get_running_loop().time() + self.suspect_for
            self.timeouts[node] += 1

    async def call(self, shard: int, kind: int, body: Any, *, timeout: float | None = None) -> Any:
        """Send ``body`` to the leader of ``shard``, following redirects until the deadline.

        Raises Timeout when the deadline passes with a request possibly applied, Unavailable
        when no replica could be reached at all, or the pykv error the shard returned.
        """
        loop = asyncio.get_running_loop()
        total = self.timeout if timeout is None else timeout
        deadline = loop.time() + total
        if self.map is None:
            await self.refresh_map(total)
        attempt = 0
        redirected = False
        hops = 0  # redirects followed in a row (stale hints can point in a circle)
        maybe_applied = False
        last_error: Exception | None = None
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            view = self.map
            assert view is not None
            leader = self._leaders.get(shard)
            # Right after a redirect the hinted leader is first in line; otherwise rotate.
            # (The first candidate needs no list: the common case, every request pays it.)
            if redirected or attempt == 0:
                node = self._first_candidate(view, shard, leader)
            else:
                candidates = self._candidates(view, shard, leader)
                node = candidates[attempt % len(candidates)]
            redirected = False
            address = view.nodes.get(node)
            if address is None:
                await self.refresh_map(remaining)
                attempt += 1
                continue
            try:
                conn = self._conns.get(address)
                if conn is None or conn.closed:
                    conn = await self.connection(address, remaining)
                reply = unwrap(await conn.request(kind, body, remaining, silence=self.attempt_timeout, probe=PING))
                if self._suspects:
                    self._suspects.pop(node, None)
                if leader != node and kind != EXPORT:  # (an export's later steps: its holder)
                    # It answered, so it leads: ask it first next time. (Without this, a call
                    # after the suspicion of a frozen old leader ran out went back to it, the
                    # first replica, and waited a whole attempt timeout again.)
                    self._leaders[shard] = node
                return reply
            except Redirect as exc:
                last_error = exc
                self._suspects.pop(node, None)
                if (
                    exc.leader is not None
                    and exc.leader != node
                    and exc.leader in self.map.nodes
                    and not self._suspected(exc.leader)
                ):
                    self._leaders[shard] = exc.leader
                    redirected = True
                    hops += 1
                    if hops <= 3:
                        continue  # straight to the hinted leader, no backoff
                    hops = 0
                self._leaders.pop(shard, None)
            except Unavailable as exc:
                # Leadership changed under a proposal, or the node is unreachable.
                last_error = exc
                maybe_applied = maybe_applied or "leadership" in str(exc) or "lost" in str(exc)
                if self._leaders.get(shard) == node:
                    del self._leaders[shard]
            except OutcomeUnknown:
                raise  # the shard's answer, not a silent node: asking again changes nothing
            except Timeout as exc:
                last_error = exc
                maybe_applied = True
                if loop.time() - conn.heard >= self.attempt_timeout:  # silent, not only slow
                    self._timed_out(node)
                if self._leaders.get(shard) == node:
                    del self._leaders[shard]
            attempt += 1
            if attempt % len(self._candidates(view, shard, leader)) == 0:
                # Every replica we know of said no: the placement may have moved on.
                with contextlib.suppress(Unavailable):
                    await self.refresh_map(deadline - loop.time())
            await asyncio.sleep(min(0.2, 0.005 * (2 ** min(attempt, 6))) * random.uniform(0.5, 1.0))
        if maybe_applied or isinstance(last_error, Timeout):
            # A read changes nothing: only a command's outcome can be unknown.
            unknown = "" if kind in _READS else "; the outcome is unknown"
            raise Timeout(f"shard {shard}: no leader answered within {total:.3g}s{unknown} (last error: {last_error})")
        raise Unavailable(f"shard {shard}: no reachable leader within {total:.3g}s ({last_error})")

    def leader_hint(self, shard: int) -> int | None:
        return self._leaders.get(shard)

    async def close(self) -> None:
        self.closed = True
        asking, self._asking = self._asking, set()
        for task in asking:
            task.cancel()
        await asyncio.gather(*asking, return_exceptions=True)
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
