"""NN-queue benchmark: sharded faiss lookup vs the replicated queue vs a torch matmul on the shard.

    .venv/bin/python launch/bench_queue.py                       # 2 CPU ranks (gloo), sizes 65536 1M 8M
    .venv/bin/python launch/bench_queue.py --sizes 65536 --reps 3

Per queue size (dim 256, 64 queries per rank, top-20) on every rank:
    sharded-faiss   ShardedNNQueue.lookup, search=faiss (all-gather queries, faiss flat on the 1/W shard,
                    all_to_all of the top-k, merge, pick, fetch the picked vectors from their owners)
    sharded-torch   the same with a torch matmul + topk on the shard
    sharded-ivf     the same with IVF-Flat (approximate; recall against exact printed); --ivf 0 skips it
    replicated      NNQueue.lookup on the whole queue every rank holds (the authors' way: a matmul), and its
                    enqueue is an all-gather of every rank's projections
Memory is the queue's buffers per rank (vectors fp32 + index, label, step int64). Queues are filled with
random unit vectors (a full queue; uniform random data is the hardest case for IVF's recall).
Then one step's queue work (lookups for every head and both views, plus the enqueue) in three patterns,
with its collectives, the bytes each rank sends and its share of a step: the replicated bank, the sharded queues
looked up one head and view at a time (the refiner's way before the queue bank), and the sharded bank (every
head and view in one lookup). Demo settings (queue 8192 x 128, 3 heads, 64 per rank on 2 ranks = batch 128)
against the demo refiner step measured here; paper settings (65,536 x 256, 8 heads, 64 per rank) against an
assumed GPU step (printed with its derivation). ``--sizes`` with no value skips the per-size table.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


from scale_refiner.engine.distributed import spawn_gloo
from scale_refiner.memory.bank import ReplicatedQueues
from scale_refiner.memory.queue import NNQueue
from scale_refiner.memory.search import IVFFlat, TorchMatmul, make_search
from scale_refiner.memory.sharded_queue import ShardedNNQueue


def _unit(n, d, gen, chunk=1 << 18):
    out = torch.empty(n, d)
    for s in range(0, n, chunk):
        out[s:s + chunk] = F.normalize(torch.randn(min(chunk, n - s), d, generator=gen), dim=1)
    return out


def _timed(fn, reps):
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the step
    return float(t)


def rq_view(rq):
    class View:  # the replicated queue seen as a one-rank shard for _fill_shard
        vectors, n_slots, dim = rq.vectors, rq.size, rq.vectors.shape[1]
        indices, labels, steps = rq.indices, rq.labels, rq.steps
        global_slot = staticmethod(lambda rows: rows)
    return View


def _buffers_bytes(q):
    return sum(b.numel() * b.element_size() for b in q.buffers())


def _fill_shard(sq, rank, gen, chunk=1 << 18):
    for s in range(0, sq.n_slots, chunk):  # in place: no second copy of the shard
        e = min(s + chunk, sq.n_slots)
        sq.vectors[s:e] = F.normalize(torch.randn(e - s, sq.dim, generator=gen), dim=1)
    rows = torch.arange(sq.n_slots)
    sq.indices[:sq.n_slots] = sq.global_slot(rows)
    sq.labels[:sq.n_slots] = sq.global_slot(rows) % 1000
    sq.steps.zero_()


def bench_size(rank, world, size, dim, batch, k, reps, ivf, replicated_ok, faiss_ok, out):
    gen = torch.Generator().manual_seed(rank)
    q = _unit(batch, dim, torch.Generator().manual_seed(100 + rank))
    idx = torch.arange(batch) + 10 ** 9 + rank * batch
    lab = torch.zeros(batch, dtype=torch.long)
    row = {"size": size}
    sq = ShardedNNQueue(size, dim, world=world, rank=rank, block=batch, search="faiss")
    _fill_shard(sq, rank, gen)
    row["mem_sharded"] = _buffers_bytes(sq)
    g = dist.group.WORLD
    if faiss_ok:
        sq.lookup(q, idx, k, lab, group=g)
        row["sharded-faiss"] = _timed(lambda sq=sq: sq.lookup(q, idx, k, lab, group=g), reps)
    sq.searcher = TorchMatmul()
    row["sharded-torch"] = _timed(lambda sq=sq: sq.lookup(q, idx, k, lab, group=g), reps)
    vecs = _unit(batch, dim, gen)
    row["enq-sharded"] = _timed(lambda sq=sq: sq.enqueue(vecs, idx, lab, 1, group=g), reps)
    sq.searcher = make_search("faiss")
    if ivf:
        nlist = max(16, min(1024, int(4 * sq.n_slots ** 0.5)))
        sq.searcher = IVFFlat(dim, nlist=nlist, nprobe=max(1, nlist // 16), train_size=40 * nlist)
        t0 = time.perf_counter()
        rows = (sq.indices >= 0).nonzero().squeeze(1)
        sq.searcher.update(rows, sq.vectors[rows])
        row["ivf_build"] = time.perf_counter() - t0
        ivf_searcher, sq.searcher = sq.searcher, TorchMatmul()
        _, exact = sq.lookup(q, idx, k, lab, group=g)  # exact top-k of the current shard
        sq.searcher = ivf_searcher
        row["sharded-ivf"] = _timed(lambda sq=sq: sq.lookup(q, idx, k, lab, group=g), reps)
        _, approx = sq.lookup(q, idx, k, lab, group=g)
        hits = sum(len(set(a) & set(b)) for a, b in zip(exact["topk_slots"].tolist(), approx["topk_slots"].tolist()))
        rec = torch.tensor([hits, batch * k], dtype=torch.float64)
        dist.all_reduce(rec)
        row["ivf_recall"] = float(rec[0] / rec[1])
        row["ivf_params"] = f"nlist {nlist}, nprobe {max(1, nlist // 16)}"
    del sq
    if replicated_ok:
        rq = NNQueue(size, dim)
        _fill_shard(rq_view(rq), 0, torch.Generator().manual_seed(7))
        rq.indices.copy_(torch.arange(size))
        row["mem_replicated"] = _buffers_bytes(rq)
        rq.lookup(q, idx, k, lab, global_queries=world * batch, offset=rank * batch)
        row["replicated"] = _timed(lambda: rq.lookup(q, idx, k, lab, global_queries=world * batch,
                                                     offset=rank * batch), reps)

        bank = ReplicatedQueues([rq])  # its enqueue: one all-gather of the rows with their index and label
        row["enq-replicated"] = _timed(lambda: bank.enqueue(vecs.unsqueeze(0), idx, lab, 1, g), reps)
        del rq
    out.append(row)


def demo_step_time(rank, world, batch, reps):
    """The demo refiner step (configs/demo.yaml: forward + backward + gradient all-reduce + AdamW), replicated
    queue, ``batch`` per rank."""
    from scale_refiner.config import load_config
    from scale_refiner.refiner import build_refiner
    cfg = load_config("configs/demo.yaml", [])
    torch.manual_seed(0)
    refiner = build_refiner(cfg, load_weights=False)
    refiner.train()
    opt = torch.optim.AdamW(refiner.parameters(), lr=1e-4)
    g = torch.randn(2, batch, cfg.model.in_chans, cfg.augment.global_size, cfg.augment.global_size)
    loc = torch.randn(cfg.augment.num_local, batch, cfg.model.in_chans, cfg.augment.local_size,
                      cfg.augment.local_size)
    n = [0]

    def step():
        index = torch.arange(batch) + rank * batch + n[0] * world * batch
        loss, _ = refiner(g, loc, index, topk=20, step=n[0], group=dist.group.WORLD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                          for p in refiner.parameters()])
        dist.all_reduce(flat)
        opt.step()
        n[0] += 1
    for _ in range(2):
        step()
    return _timed(step, reps)


# How a step's queue work is done (all with a full queue, 2 views, every head):
#   replicated        the replicated bank: heads x 2 local lookups, one all-gather to enqueue
#   sharded-per-head  the sharded queues one lookup per head and view (4 collectives each), one enqueue for all
#                     heads: what the refiner did before its queues became one bank
#   sharded           the sharded bank: every head and view in one lookup (4 collectives), one enqueue
PATTERNS = ("replicated", "sharded-per-head", "sharded")


def queue_step(rank, world, size, dim, heads, batch, k, reps, pattern, search="torch"):
    """One step's queue work: time (slowest rank, median), collectives and bytes this rank sent."""
    from scale_refiner.bench.collectives import CollectiveCounter
    from scale_refiner.memory.bank import build_queues
    gen = torch.Generator().manual_seed(rank)
    q = _unit(heads * 2 * batch, dim, gen).view(heads, 2, batch, dim)
    idx = torch.arange(batch) + 10 ** 9 + rank * batch
    group = dist.group.WORLD
    sharded = pattern != "replicated"
    bank = build_queues(heads, size, dim, sharded=sharded, world=world, rank=rank, block=batch, search=search)
    for queue in bank:
        if sharded:
            _fill_shard(queue, rank, gen)
        else:
            queue.vectors.copy_(_unit(size, dim, torch.Generator().manual_seed(7)))
            queue.indices.copy_(torch.arange(size))

    def work():
        if pattern == "sharded-per-head":
            for h, queue in enumerate(bank):
                for view in range(2):
                    queue.lookup(q[h, view], idx, k, idx, group=group)
        else:
            bank.lookup(q, idx, k, idx, 1, group)
        bank.enqueue(q[:, 0], idx, idx, 1, group)
    work()
    with CollectiveCounter() as counts:
        work()
    return {"time": _timed(work, reps), "collectives": counts.total, "bytes": counts.bytes_sent}


def _rank(rank, world, args, results):
    out = []
    for size in args.sizes:
        replicated_ok = size * args.dim * 4 * world <= args.replicated_max_gb * 2 ** 30
        bench_size(rank, world, size, args.dim, args.batch, args.k, args.reps, args.ivf and size <= args.ivf_max,
                   replicated_ok, size <= args.faiss_max, out)
        if rank == 0:
            print(f"done {size}: {out[-1]}", flush=True)
    share = {}
    if args.share:
        share["demo_step"] = demo_step_time(rank, world, 64, args.reps)
        for pattern in PATTERNS:
            share[("demo", pattern)] = queue_step(rank, world, 8192, 128, 3, 64, 20, args.reps, pattern)
            share[("paper", pattern)] = queue_step(rank, world, 65536, 256, 8, 64, 20, args.reps, pattern)
    if rank == 0:
        results.update(rows=out, share=share)


def _mib(b):
    return f"{b / 2 ** 20:,.0f} MiB"


def report(res, args, world):
    lines = [f"Queue lookup, {world} CPU ranks (gloo, 1 thread each), dim {args.dim}, {args.batch} queries per rank, "
             f"top-{args.k}; median of {args.reps}, slowest rank; ms per lookup (one head, one view)", "",
             "| entries | sharded faiss | sharded torch | sharded IVF (recall@k) | replicated matmul | enqueue "
             "sharded / replicated | memory per rank sharded / replicated |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        fa = f"{r['sharded-faiss'] * 1e3:.1f}" if "sharded-faiss" in r else "skipped (--faiss-max)"
        ivf = f"{r['sharded-ivf'] * 1e3:.1f} ({r['ivf_recall']:.3f}; {r['ivf_params']})" if "sharded-ivf" in r else "-"
        rep = f"{r['replicated'] * 1e3:.1f}" if "replicated" in r else "does not fit"
        enq = f"{r['enq-sharded'] * 1e3:.2f} / " + (f"{r['enq-replicated'] * 1e3:.2f}" if "enq-replicated" in r else "-")
        mem = _mib(r["mem_sharded"]) + " / " + (_mib(r["mem_replicated"]) if "mem_replicated" in r
                                                else _mib(r["mem_sharded"] * world) + " (not allocated)")
        lines.append(f"| {r['size']:,} | {fa} | {r['sharded-torch'] * 1e3:.1f} | {ivf} | "
                     f"{rep} | {enq} | {mem} |")
    s = res["share"]
    if s:
        # Paper step, assumed: ViT-H/14, 64 samples per GPU, 2 x 224 px (257 tokens) + 10 x 98 px (50 tokens);
        # ~24 D^2 + 4 N D flops per token per block forward, x3 forward + backward, at 125 TFLOP/s (40% of A100
        # bf16 peak).
        depth, width = 32, 1280
        per_tok = lambda n: depth * (24 * width ** 2 + 4 * n * width)  # noqa: E731
        flops = 3 * 64 * (2 * 257 * per_tok(257) + 10 * 50 * per_tok(50))
        paper_step = flops / 125e12
        lines += ["", f"One step's queue work (every head, 2 views: lookups + enqueue; full queue, top-20, 64 per rank, "
                      f"{world} CPU ranks, the default shard search (torch matmul + top-k); median of {args.reps}, "
                      f"slowest rank), and its share of a step (paper rows: CPU time against an assumed GPU "
                      f"step, so an upper bound):", "",
                  "| settings | step time | queue pattern | collectives per step | MiB sent per rank | ms | share |",
                  "|---|---|---|---:|---:|---:|---:|"]
        settings = {"demo": ("demo: 8192 x 128, 3 heads, batch 128 (2 x 64)",
                             s["demo_step"], "measured here: demo refiner fwd+bwd+AdamW"),
                    "paper": ("paper: 65,536 x 256, 8 heads, 64 per rank", paper_step,
                              f"assumed: ViT-H/14 GPU step, {flops / 1e12:.0f} TFLOP at 125 TFLOP/s")}
        for key, (label, step, how) in settings.items():
            for pattern in PATTERNS:
                r = s[(key, pattern)]
                lines.append(f"| {label} | {step * 1e3:.0f} ms ({how}) | {pattern} | {r['collectives']} | "
                             f"{r['bytes'] / 2 ** 20:.2f} | {r['time'] * 1e3:.1f} | {100 * r['time'] / step:.1f}% |")
    return "\n".join(lines)


def _rank_results(rank, world, args):
    results = {}
    _rank(rank, world, args, results)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", type=int, nargs="*", default=[65536, 2 ** 20, 2 ** 23])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ivf", type=int, default=1)
    ap.add_argument("--ivf-max", type=int, default=2 ** 20, help="largest queue to build IVF for (it copies the shard)")
    ap.add_argument("--faiss-max", type=int, default=2 ** 20, help="largest queue to time faiss flat on")
    ap.add_argument("--share", type=int, default=1)
    ap.add_argument("--replicated-max-gb", type=float, default=4.0,
                    help="skip the replicated queue when all ranks' copies together exceed this")
    args = ap.parse_args(argv)
    results = spawn_gloo(_rank_results, args.world, args, threads=args.threads)
    print(report(results, args, args.world))


if __name__ == "__main__":
    main()
