"""Hit ratio of the eviction policies on synthetic serving traces (issue: eviction policies, selectable per tier).

A cache of equal-size chunks (capacity counted in chunks) is driven exactly as the tiers drive a policy:
``insert`` on a miss (after evicting the first candidate while full), ``touch`` on a hit, ``remove`` on an
eviction, ``link(parent, child)`` for consecutive chunks of every prompt-shaped request and
``observe(chunk, mass)`` with each chunk's attention mass after the request. Contenders: ``lru``,
``s3fifo``, ``prefix``, ``attention`` (all with their default parameters, the same on every trace) and
Belady's MIN (offline: evicts the chunk whose next use is farthest; it must admit every miss, like the
others), the upper bound on the hit ratio.

Reported per trace and policy: the chunk hit ratio, its gap to Belady in percentage points, "SSD bytes
read" (misses x chunk size: what a DRAM tier in front of an SSD tier sends down), and the *prefix* hit ratio
(hits before a request's first miss: what a prefix-matching engine can use without recomputing; Belady is not
an upper bound for that one). No figure here is timed or asserted on, except that attention-aware eviction
must beat LRU on the attention trace (exit status 1 otherwise).

Traces (seeded, deterministic):

a) chat      multi-turn sessions: each turn re-reads the session's whole prefix and extends it by 1-3 chunks
b) sysprompt a few long shared system prompts (Zipf popularity) + unique user suffixes of 2-12 chunks
c) docqa     long-document QA: Zipf(1.0) popularity over 3,000 documents of 8-48 chunks + a question chunk
d) docqa+scan (c) with a one-off scan mixed into its middle third: every other request a never-seen document
e) attention 400 documents of 32-64 chunks (Zipf 0.9) whose attention concentrates on a sink chunk and 3 topic
             chunks; a document's first request and 5% of the later ones re-read the whole prefix, the rest fetch
             only the high-attention chunks (Quest-style sparse retrieval), so future use follows attention

In (a)-(d) attention is diffuse (the first chunk gets 0.2 of the mass, the rest shares 0.8 with log-normal
noise): the attention-aware policy gets a signal that does not predict reuse there.

    python benchmarks/bench_hitratio.py [--scale 1.0] [--out docs/hitratio.png]

Writes benchmarks/results/hitratio.json and docs/hitratio.png. About 10-20 s on 2 cores at --scale 1.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import save

from kvpool.storage.eviction import EvictionPolicy, make_policy

ROOT = Path(__file__).resolve().parents[1]
# 8B-class layout: 32 layers x 8 KV heads x 128 x (K, V) x fp16 x 256 tokens
CHUNK_BYTES = 32 * 8 * 128 * 2 * 2 * 256
POLICY_NAMES = ["lru", "s3fifo", "prefix", "attention"]
ALL = POLICY_NAMES + ["belady"]


@dataclass
class Request:
    keys: list[int]
    mass: list[float]
    contiguous: bool = True  # a prompt prefix: consecutive keys are parent -> child


@dataclass
class Trace:
    name: str
    desc: str
    capacity: int
    requests: list[Request] = field(default_factory=list)


def diffuse_mass(rng: random.Random, n: int) -> list[float]:
    if n == 1:
        return [1.0]
    w = [rng.lognormvariate(0.0, 0.5) for _ in range(n - 1)]
    s = sum(w)
    return [0.2] + [0.8 * x / s for x in w]


def zipf_sampler(rng: random.Random, n: int, alpha: float) -> Callable[[], int]:
    cum, acc = [], 0.0
    for i in range(n):
        acc += 1.0 / (i + 1) ** alpha
        cum.append(acc)
    perm = list(range(n))
    rng.shuffle(perm)  # popularity unrelated to id order

    def draw() -> int:
        import bisect

        return perm[bisect.bisect_left(cum, rng.random() * acc)]

    return draw


class Ids:
    def __init__(self) -> None:
        self.next = 0

    def new(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


# --- traces ----------------------------------------------------------------------------------------------


def trace_chat(seed: int, scale: float) -> Trace:
    rng, ids = random.Random(seed), Ids()
    t = Trace("chat", "multi-turn chat: 64 live sessions, each turn re-reads the prefix + 1-3 new chunks", 400)

    def new_session() -> list[Any]:
        return [ids.new(rng.randint(2, 6)), rng.randint(3, 25)]  # prefix, turns left

    sessions = [new_session() for _ in range(64)]
    for _ in range(int(7000 * scale)):
        i = min(int(rng.expovariate(1 / 20)), 63)  # recently active sessions come back sooner
        s = sessions.pop(i)
        s[0] = s[0] + ids.new(rng.randint(1, 3))
        t.requests.append(Request(list(s[0]), diffuse_mass(rng, len(s[0]))))
        s[1] -= 1
        sessions.insert(0, s if s[1] > 0 else new_session())
    return t


def trace_sysprompt(seed: int, scale: float) -> Trace:
    rng, ids = random.Random(seed), Ids()
    lens = [48, 32, 40, 24, 16, 36, 20, 28]
    prompts = [ids.new(n) for n in lens]
    t = Trace("sysprompt", f"{len(lens)} shared system prompts ({sum(lens)} chunks, Zipf 1.0) + unique "
              "2-12 chunk suffixes", 160)
    draw = zipf_sampler(rng, len(prompts), 1.0)
    for _ in range(int(16000 * scale)):
        keys = prompts[draw()] + ids.new(rng.randint(2, 12))
        t.requests.append(Request(keys, diffuse_mass(rng, len(keys))))
    return t


def _docs(rng: random.Random, ids: Ids, n: int, lo: int, hi: int) -> list[list[int]]:
    return [ids.new(rng.randint(lo, hi)) for _ in range(n)]


def trace_docqa(seed: int, scale: float, scan: bool) -> Trace:
    rng, ids = random.Random(seed), Ids()
    docs = _docs(rng, ids, 3000, 8, 48)
    draw = zipf_sampler(rng, len(docs), 1.0)
    n = int(5000 * scale)
    name, desc = "docqa", "long-document QA: 3,000 docs of 8-48 chunks, Zipf(1.0), + 1 question chunk"
    if scan:
        name, desc = "docqa+scan", "(c) + a one-off scan of new 24-64 chunk docs in every other request of the middle third"
    t = Trace(name, desc, 1200)
    scan_rng = random.Random(seed + 1)  # the scan does not perturb the base trace's draws
    for r in range(n):
        keys = docs[draw()] + ids.new(1)
        t.requests.append(Request(keys, diffuse_mass(rng, len(keys))))
        if scan and n // 3 <= r < 2 * n // 3 and r % 2 == 0:
            keys = ids.new(scan_rng.randint(24, 64))
            t.requests.append(Request(keys, diffuse_mass(scan_rng, len(keys))))
    return t


def trace_attention(seed: int, scale: float) -> Trace:
    rng, ids = random.Random(seed), Ids()
    docs = _docs(rng, ids, 400, 32, 64)
    topics = [[0] + sorted(rng.sample(range(1, len(d)), 3)) for d in docs]  # sink + 3 topic chunks
    draw = zipf_sampler(rng, len(docs), 0.9)
    seen: set[int] = set()
    t = Trace("attention", "400 docs of 32-64 chunks, Zipf(0.9); attention on sink + 3 topic chunks; first and 5% "
              "of later requests re-read the whole prefix, the rest fetch the high-attention chunks", 800)
    for _ in range(int(12000 * scale)):
        d = draw()
        doc, top = docs[d], topics[d]
        if d not in seen or rng.random() < 0.05:
            seen.add(d)
            keys, idx = list(doc), list(range(len(doc)))
            contiguous = True
        else:  # sparse retrieval of what the model attends to (+ now and then one other chunk)
            idx = list(top)
            if rng.random() < 0.3:
                idx.append(rng.randrange(len(doc)))
            idx = sorted(set(idx))
            keys, contiguous = [doc[i] for i in idx], False
        topic_set = set(top)
        rest = [i for i in idx if i not in topic_set]
        mass = []
        for i in idx:
            if i == 0:
                m = 0.35
            elif i in topic_set:
                m = 0.55 / 3
            else:
                m = 0.10 / len(rest)
            mass.append(m * rng.uniform(0.8, 1.2))
        t.requests.append(Request(keys, mass, contiguous))
    return t


# --- simulation ------------------------------------------------------------------------------------------


@dataclass
class Result:
    hits: int = 0
    misses: int = 0
    prefix_hits: int = 0

    @property
    def accesses(self) -> int:
        return self.hits + self.misses


def simulate(policy: EvictionPolicy, trace: Trace, kb: list[bytes]) -> Result:
    cap, cached, res = trace.capacity, set[bytes](), Result()
    insert, touch, remove, link, observe = policy.insert, policy.touch, policy.remove, policy.link, policy.observe
    for req in trace.requests:
        keys = [kb[i] for i in req.keys]
        broken = False
        for key in keys:
            if key in cached:
                touch(key)
                res.hits += 1
                if not broken:
                    res.prefix_hits += 1
                continue
            res.misses += 1
            broken = True
            if len(cached) >= cap:
                victim = next(iter(policy.candidates()))
                cached.remove(victim)
                remove(victim)
            cached.add(key)
            insert(key, CHUNK_BYTES)
        if req.contiguous:
            for a, b in itertools.pairwise(keys):
                link(a, b)
        for key, m in zip(keys, req.mass):
            observe(key, m)
    return res


def belady(trace: Trace) -> Result:
    seq = [k for r in trace.requests for k in r.keys]
    n = len(seq)
    nxt = [0] * n
    last: dict[int, int] = {}
    for i in range(n - 1, -1, -1):
        nxt[i] = last.get(seq[i], n + i)  # never again: beyond the end, distinct
        last[seq[i]] = i
    cap, res = trace.capacity, Result()
    when: dict[int, int] = {}  # cached key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), lazily deleted
    pos = 0
    for r in trace.requests:
        broken = False
        for key in r.keys:
            if key in when:
                res.hits += 1
                if not broken:
                    res.prefix_hits += 1
            else:
                res.misses += 1
                broken = True
                if len(when) >= cap:
                    while True:
                        neg, v = heapq.heappop(heap)
                        if when.get(v) == -neg:
                            del when[v]
                            break
            when[key] = nxt[pos]
            heapq.heappush(heap, (-nxt[pos], key))
            pos += 1
    return res


def run(scale: float) -> dict[str, Any]:
    traces = [
        trace_chat(1, scale),
        trace_sysprompt(2, scale),
        trace_docqa(3, scale, scan=False),
        trace_docqa(3, scale, scan=True),
        trace_attention(5, scale),
    ]
    out: dict[str, Any] = {"chunk_bytes": CHUNK_BYTES, "scale": scale, "traces": {}}
    for tr in traces:
        t0 = time.perf_counter()
        universe = max(k for r in tr.requests for k in r.keys) + 1
        kb = [i.to_bytes(8, "little") for i in range(universe)]
        results = {name: simulate(make_policy(name), tr, kb) for name in POLICY_NAMES}
        results["belady"] = belady(tr)
        n_acc = results["belady"].accesses
        unique = len({k for r in tr.requests for k in r.keys})
        best = results["belady"].hits / n_acc
        rows = {}
        for name, r in results.items():
            assert r.accesses == n_acc
            hr = r.hits / n_acc
            rows[name] = {
                "hit_ratio": hr,
                "gap_to_belady_pp": 100 * (best - hr),
                "prefix_hit_ratio": r.prefix_hits / n_acc,
                "misses": r.misses,
                "ssd_bytes_read": r.misses * CHUNK_BYTES,
            }
        out["traces"][tr.name] = {
            "description": tr.desc,
            "capacity_chunks": tr.capacity,
            "requests": len(tr.requests),
            "accesses": n_acc,
            "unique_chunks": unique,
            "policies": rows,
            "seconds": time.perf_counter() - t0,
        }
    return out


def report(out: dict[str, Any]) -> None:
    GiB = 1 << 30
    print(f"chunk = {CHUNK_BYTES >> 20} MiB; hit ratio % (gap to Belady, pp) | prefix hit ratio % | SSD GiB read")
    print(f"{'trace':11s} {'cap':>5s} {'accesses':>9s}  " + "  ".join(f"{n:>17s}" for n in ALL))
    for name, t in out["traces"].items():
        p = t["policies"]
        cells = []
        for n in ALL:
            r = p[n]
            gap = "" if n == "belady" else f"({r['gap_to_belady_pp']:+5.1f})"
            cells.append(f"{100 * r['hit_ratio']:6.1f} {gap:>8s}  ")
        print(f"{name:11s} {t['capacity_chunks']:5d} {t['accesses']:9d}  " + "  ".join(f"{c:>17s}" for c in cells))
        print(f"{'  prefix':27s}  " + "  ".join(f"{100 * p[n]['prefix_hit_ratio']:17.1f}" for n in ALL))
        print(f"{'  SSD GiB':27s}  " + "  ".join(f"{p[n]['ssd_bytes_read'] / GiB:17,.0f}" for n in ALL))


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["traces"])
    colours = {"lru": "#7f7f7f", "s3fifo": "#1f77b4", "prefix": "#2ca02c", "attention": "#d62728",
               "belady": "white"}
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / len(ALL)
    for ax, metric, ylabel in (
        (axes[0], "hit_ratio", "chunk hit ratio (%)"),
        (axes[1], "prefix_hit_ratio", "prefix hit ratio (%): hits before a request's first miss"),
    ):
        for j, pol in enumerate(ALL):
            xs = [i + (j - (len(ALL) - 1) / 2) * width for i in range(len(names))]
            vals = [100 * out["traces"][t]["policies"][pol][metric] for t in names]
            ax.bar(xs, vals, width, label=pol if pol != "belady" else "Belady MIN (offline)",
                   color=colours[pol], edgecolor="black", linewidth=0.6, hatch="//" if pol == "belady" else "")
            for x, v in zip(xs, vals):
                ax.text(x, v + 0.5, f"{v:.0f}", ha="center", va="bottom", fontsize=6.5)
        ax.set_xticks(range(len(names)),
                      [f"{t}\n(cap {out['traces'][t]['capacity_chunks']})" for t in names], fontsize=8)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.set_ylim(0, 105)
    axes[0].legend(fontsize=8, loc="upper left", ncols=2)
    axes[0].set_title("Chunk hit ratio (Belady is the upper bound)", fontsize=10)
    axes[1].set_title("Usable-prefix hit ratio (Belady is not a bound here)", fontsize=10)
    fig.suptitle("Eviction policies on synthetic KV-cache serving traces (equal-size chunks, capacity in chunks)",
                 fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="trace length multiplier")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "hitratio.png")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = run(args.scale)
    report(out)
    print(f"results: {save('hitratio', out)}")
    plot(out, args.out)
    print(f"plot: {args.out}; {time.perf_counter() - t0:.1f} s")
    bad = [t for t, v in out["traces"].items()
           if any(v["policies"][n]["hit_ratio"] > v["policies"]["belady"]["hit_ratio"] + 1e-12 for n in POLICY_NAMES)]
    if bad:
        print(f"BUG: a policy beat Belady on {bad}")
    att = out["traces"]["attention"]["policies"]
    if att["attention"]["hit_ratio"] <= att["lru"]["hit_ratio"]:
        print("attention-aware eviction did not beat LRU on the attention trace")
        sys.exit(1)
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
