"""Head-norm benchmark: ``bn`` vs ``syncbn`` vs ``async`` (heads/async_bn.py), side by side in one run.

    .venv/bin/python launch/bench_norm.py                 # spawns 2 CPU ranks joined by gloo
    torchrun --nproc_per_node 2 launch/bench_norm.py      # the same under torchrun (any backend it picks)

Measures, on this machine: step time (forward + backward) of the heads alone (``--heads`` ID heads on random
features of width ``--width``, ``--batch`` rows per rank) and of a full tiny-ViT refiner step (configs/demo.yaml,
forward + backward + AdamW step); the number and bytes of collectives per step (``dist.all_reduce`` /
``all_gather`` wrapped and counted); all-reduce latency and bandwidth. Kinds are interleaved round by round
(the machine is shared and noisy): compare the ratios, not the absolute times. Then it projects the cost of
the BN collectives for a paper-size run (8 heads x 5 BN layers x 2 head calls) at 64 and 512 GPUs with an
alpha-beta model, printed as a markdown table (``--alpha-us``, ``--bw-gbs`` set the constants).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


from scale_refiner.config import CHOICES
from scale_refiner.engine.distributed import spawn_gloo

KINDS = CHOICES["heads.norm"]
PAPER_WIDTHS = (2048, 2048, 256, 4096, 256)  # the 5 BN layers of one ID head (projector 3, predictor 2)


class CollectiveCounter:
    """Counts calls and bytes of dist.all_reduce / all_gather / all_gather_into_tensor (module attributes,
    which is what our code and torch.distributed.nn call)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor")

    def __init__(self):
        self.calls = []
        self.original = {n: getattr(dist, n) for n in self.NAMES}
        for name in self.NAMES:
            setattr(dist, name, self._wrap(name, self.original[name]))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            tensor = args[1] if name == "all_gather_into_tensor" else args[0]
            if isinstance(tensor, (list, tuple)):  # all_gather(list, tensor): count the input tensor
                tensor = args[1]
            self.calls.append((name, bool(kwargs.get("async_op", False)), tensor.numel() * tensor.element_size()))
            return fn(*args, **kwargs)
        return counted

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _heads(kind, count, width, hidden, out, pred_hidden):
    from scale_refiner.heads.async_bn import async_bn_scope
    from scale_refiner.heads.id_head import IDHead
    torch.manual_seed(0)
    with async_bn_scope():  # one coordinator (one bucket) per model
        return torch.nn.ModuleList(IDHead(width, hidden, out, pred_hidden, norm=kind) for _ in range(count))


def _refiner(kind, args):
    from scale_refiner.config import load_config
    from scale_refiner.heads.async_bn import async_bn_scope
    from scale_refiner.refiner import build_refiner
    cfg = load_config("configs/demo.yaml", [f"heads.norm={kind}", "queue.size=1024"])
    torch.manual_seed(0)
    with async_bn_scope():
        refiner = build_refiner(cfg, load_weights=False)
    refiner.train()
    opt = torch.optim.AdamW(refiner.parameters(), lr=1e-4)
    return refiner, opt, cfg


def _time(fn, steps):
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _allreduce_probe(rank, world, reps):
    """Median blocking all-reduce time for a few sizes; latency = 4 bytes, bandwidth = bus bandwidth at 16 MiB."""
    rows = []
    for nbytes in (4, 64 << 10, 1 << 20, 16 << 20):
        t = torch.ones(max(1, nbytes // 4))
        for _ in range(3):
            dist.all_reduce(t)
        n = reps if nbytes <= (1 << 20) else max(5, reps // 10)
        times = []
        for _ in range(n):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        med = torch.tensor(times)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)  # slowest rank
        rows.append((nbytes, statistics.median(med.tolist())))
    return rows


def _ring(m, p, alpha, bw):
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * m / bw


def _tree(m, p, alpha, bw):  # NCCL's double binary tree: latency ~ 2 log2(p) hops, bandwidth ~ ring's
    return 2 * math.log2(p) * alpha + 2 * m / bw


def allreduce_time(m, p, alpha, bw):
    return min(_ring(m, p, alpha, bw), _tree(m, p, alpha, bw))


def projection(alpha, bw, launch, heads=8, calls=2):
    sizes = [4 * (2 * c + 1) for c in PAPER_WIDTHS] * heads  # bytes of [sum, sum sq, n] per BN layer (fp32)
    rows = []
    for p in (64, 512):
        sync_each = sum(allreduce_time(m, p, alpha, bw) + launch for m in sizes)
        sync = 2 * calls * sync_each  # forward + backward, per head call, on the critical path
        bucket = sum(sizes)
        async_one = allreduce_time(bucket, p, alpha, bw) + launch  # one per step (manual flush), overlapped
        rows.append(dict(gpus=p, sync_n=2 * calls * len(sizes), sync_bytes=2 * calls * sum(sizes), sync_ms=1e3 * sync,
                         async_n=1, async_bytes=bucket, async_ms=1e3 * async_one))
    return rows


def _rank(rank, world, args, results):
    counter = CollectiveCounter()
    torch.manual_seed(1234 + rank)
    out = {"heads": {}, "refiner": {}, "collectives": {}, "refiner_collectives": {}}
    # heads alone -------------------------------------------------------------------------------------------
    models = {k: _heads(k, args.heads, args.width, args.hidden, args.out, args.pred_hidden) for k in KINDS}
    x = torch.randn(args.batch, args.width)

    def head_step(model):
        model.zero_grad(set_to_none=True)
        loss = sum(z.pow(2).mean() + p.pow(2).mean() for z, p in (h(x) for h in model))
        loss.backward()

    for k in KINDS:  # warm-up (step 0 of async does its one-off blocking reduces here)
        for _ in range(2):
            head_step(models[k])
        counter.take()
        head_step(models[k])
        out["collectives"][k] = counter.take()
    times = {k: [] for k in KINDS}
    for _ in range(args.rounds):
        for k in KINDS:
            dist.barrier()
            times[k] += _time(lambda model=models[k]: head_step(model), args.steps)
    out["heads"] = {k: statistics.median(v) for k, v in times.items()}
    counter.take()
    del models
    # full tiny-ViT refiner step ---------------------------------------------------------------------------------
    if args.refiner:
        state = {k: _refiner(k, args) for k in KINDS}
        cfg = state["bn"][2]
        b = args.refiner_batch
        g = torch.randn(2, b, cfg.model.in_chans, cfg.augment.global_size, cfg.augment.global_size)
        loc = torch.randn(cfg.augment.num_local, b, cfg.model.in_chans, cfg.augment.local_size,
                          cfg.augment.local_size)
        step_no = [0]

        def refiner_step(k):
            refiner, opt, _ = state[k]
            index = torch.arange(b) + rank * b + step_no[0] * world * b
            loss, _ = refiner(g, loc, index, topk=20, step=step_no[0], group=dist.group.WORLD)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in refiner.parameters():  # data-parallel gradient average, one flat all-reduce
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.flatten() for p in refiner.parameters()])
            dist.all_reduce(flat)
            opt.step()

        for k in KINDS:
            for _ in range(2):
                refiner_step(k)
            counter.take()
            refiner_step(k)
            out["refiner_collectives"][k] = counter.take()
        rtimes = {k: [] for k in KINDS}
        for _ in range(args.rounds):
            for k in KINDS:
                dist.barrier()
                rtimes[k] += _time(lambda: refiner_step(k), max(1, args.steps // 2))
            step_no[0] += 1
        out["refiner"] = {k: statistics.median(v) for k, v in rtimes.items()}
        from scale_refiner.heads.async_bn import coordinator_of
        coordinator_of(state["async"][0]).sync()
    out["probe"] = _allreduce_probe(rank, world, args.probe_reps)
    counter.take()
    if rank == 0:
        results.update(out)


def _summarise(calls):
    n = len(calls)
    nb = sum(c[2] for c in calls)
    n_async = sum(1 for c in calls if c[1])
    return n, n_async, nb


def report(out, args, world):
    lines = [f"## bench_norm: {world} CPU ranks (gloo), torch {torch.__version__}", ""]
    lines += [f"Heads alone: {args.heads} ID heads (projector {args.width}->{args.hidden}->{args.hidden}->{args.out}, "
              f"predictor {args.out}->{args.pred_hidden}->{args.out}), {args.batch} rows per rank, forward + backward; "
              f"median of {args.rounds} rounds x {args.steps} steps, kinds interleaved.", ""]
    lines += ["| norm | heads step ms | vs bn | collectives / step (async) | BN-collective bytes / step |"
              " refiner step ms | vs bn | refiner collectives / step (async) |",
              "|---|---|---|---|---|---|---|---|"]
    for k in KINDS:
        n, na, nb = _summarise(out["collectives"][k])
        row = f"| {k} | {1e3 * out['heads'][k]:.1f} | {out['heads'][k] / out['heads']['bn']:.2f} | {n} ({na}) | {nb:,} |"
        if out["refiner"]:
            rn, rna, _ = _summarise(out["refiner_collectives"][k])
            row += f" {1e3 * out['refiner'][k]:.1f} | {out['refiner'][k] / out['refiner']['bn']:.2f} | {rn} ({rna}) |"
        else:
            row += " - | - | - |"
        lines.append(row)
    lines += ["", "Refiner step: configs/demo.yaml (vit_mini_patch4, 3 heads 512/128/1024, 2 global 32 px + 4 local "
              f"16 px crops), {args.refiner_batch} samples per rank, forward + backward + gradient all-reduce + AdamW; "
              "its collectives include the NNA prediction gathers, the queue gathers and the gradient reduce, "
              "common to all kinds.", ""]
    lines += ["All-reduce on this machine (blocking, median, slowest rank):", "",
              "| bytes | time us | algbw MB/s | busbw MB/s |", "|---|---|---|---|"]
    for nbytes, t in out["probe"]:
        alg = nbytes / t / 1e6
        lines.append(f"| {nbytes:,} | {1e6 * t:.1f} | {alg:.1f} | {alg * 2 * (world - 1) / world:.1f} |")
    alpha, bw, launch = args.alpha_us * 1e-6, args.bw_gbs * 1e9, args.launch_us * 1e-6
    lines += ["", f"Projection, paper-size heads (8 heads x 5 BN layers, widths {PAPER_WIDTHS}, x 2 head calls), fp32 "
              "statistics. Model: T(m, p) = min(ring, tree) + launch; ring = 2(p-1) alpha + 2 (p-1)/p m / B; "
              f"tree = 2 log2(p) alpha + 2 m / B; alpha = {args.alpha_us} us per hop, B = {args.bw_gbs} GB/s per GPU "
              f"(InfiniBand NDR/HDR-class bus bandwidth), launch = {args.launch_us} us per collective. syncbn: 2 blocking "
              "all-reduces per BN layer per head call (forward statistics, backward gradient sums), all on the critical "
              "path; async: 1 all-reduce of the bucket per step (manual flush), overlapped with the backward, so "
              "its exposed cost is ~0 while it is shorter than the backward.", "",
              "| GPUs | syncbn collectives / step | syncbn bytes | syncbn time on critical path ms | "
              "async collectives / step | async bytes | async time ms (overlapped) | speed-up of the BN comms |",
              "|---|---|---|---|---|---|---|---|"]
    for r in projection(alpha, bw, launch):
        lines.append(f"| {r['gpus']} | {r['sync_n']} | {r['sync_bytes']:,} | {r['sync_ms']:.2f} | {r['async_n']} | "
                     f"{r['async_bytes']:,} | {r['async_ms']:.3f} | {r['sync_ms'] / r['async_ms']:.0f}x |")
    return "\n".join(lines)


def _rank_results(rank, world, args):
    results = {}
    _rank(rank, world, args, results)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--out", type=int, default=128)
    ap.add_argument("--pred-hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--refiner", type=int, default=1, help="0 to skip the full refiner step")
    ap.add_argument("--refiner-batch", type=int, default=16)
    ap.add_argument("--probe-reps", type=int, default=200)
    ap.add_argument("--alpha-us", type=float, default=5.0)
    ap.add_argument("--bw-gbs", type=float, default=40.0)
    ap.add_argument("--launch-us", type=float, default=10.0)
    args = ap.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group()
        torch.set_num_threads(args.threads)
        results = {}
        _rank(dist.get_rank(), dist.get_world_size(), args, results)
        if dist.get_rank() == 0:
            print(report(results, args, dist.get_world_size()))
        dist.destroy_process_group()
        return
    results = spawn_gloo(_rank_results, args.world, args, threads=args.threads)
    print(report(results, args, args.world))


if __name__ == "__main__":
    main()
