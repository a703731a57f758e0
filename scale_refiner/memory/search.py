"""Inner-product top-k search over one queue shard: a small abstraction with three exact/approximate backends.

    FaissFlat   exact; ``faiss.knn`` (the brute-force kernel behind ``IndexFlatIP``, run on the shard's storage
                in place, no index copy) for CPU tensors, ``faiss.knn_gpu`` for CUDA tensors when faiss-gpu is
                installed, else the torch matmul below.
    TorchMatmul exact; ``queries @ base.T`` then ``topk``, in query chunks so the score block stays bounded.
    IVFFlat     approximate (``faiss.IndexIVFFlat``, inner product). Stateful: it holds the entries itself and
                is kept current by ``update`` on every write (remove the overwritten ids, add the new ones), so
                a FIFO of 1M+ entries is not re-indexed each step. Trained on the first ``train_size`` entries
                written. Its recall against exact is measured by ``launch/bench_queue.py``. HNSW is not offered:
                it cannot delete entries, and a FIFO replaces every entry once per queue turn.

Contract of ``search(queries, base, k)``: ``queries`` (Q, d) and ``base`` (N, d) float32, ``1 <= k <= N``.
Returns ``scores`` (Q, k) float32 and ``ids`` (Q, k) int64 (row numbers of ``base``), best first. Masking is
the caller's business (see ``sharded_queue``: it searches only filled rows and asks for a few extra results
to drop the query's own dataset index). Exact backends differ from each other only by float rounding of the
dot products and by the order of exactly tied scores.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

try:
    import faiss
except ImportError:  # pragma: no cover - faiss is in requirements; torch matmul still works without it
    faiss = None

Result = Tuple[torch.Tensor, torch.Tensor]


class Search:
    name = "base"
    exact = True
    stateful = False  # True: holds its own copy of the entries (``update`` must see every write)

    def search(self, queries: torch.Tensor, base: Optional[torch.Tensor], k: int) -> Result:
        raise NotImplementedError

    def update(self, ids: torch.Tensor, vectors: torch.Tensor) -> None:  # exact backends read the shard itself
        pass


class TorchMatmul(Search):
    name = "torch"

    def __init__(self, chunk_elems: int = 1 << 26):
        self.chunk_elems = chunk_elems  # scores per chunk (256 MiB of fp32)

    def search(self, queries, base, k):
        rows = max(1, self.chunk_elems // max(1, base.shape[0]))
        scores, ids = [], []
        for start in range(0, queries.shape[0], rows):
            s, i = (queries[start:start + rows] @ base.T).topk(k, dim=1)
            scores.append(s)
            ids.append(i)
        return torch.cat(scores), torch.cat(ids)


class FaissFlat(Search):
    name = "faiss"

    def __init__(self):
        if faiss is None:
            raise ImportError("queue.search=faiss needs faiss-cpu or faiss-gpu installed")
        self._torch = TorchMatmul()
        self._gpu_res = None

    def search(self, queries, base, k):
        if queries.is_cuda:
            if hasattr(faiss, "knn_gpu") and faiss.get_num_gpus() > 0:
                import importlib
                importlib.import_module("faiss.contrib.torch_utils")  # lets knn_gpu take torch tensors
                if self._gpu_res is None:
                    self._gpu_res = faiss.StandardGpuResources()
                scores, ids = faiss.knn_gpu(self._gpu_res, queries.contiguous(), base.contiguous(), k,
                                            metric=faiss.METRIC_INNER_PRODUCT, device=queries.device.index or 0)
                return scores, ids.long()
            return self._torch.search(queries, base, k)
        xq = queries.detach().float().contiguous().numpy()
        xb = base.detach().float().contiguous().numpy()  # a view when base is contiguous fp32: no copy
        scores, ids = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
        return torch.from_numpy(scores), torch.from_numpy(ids).long()


class IVFFlat(Search):
    """Approximate: ids are the caller's row numbers, given through ``update``; ``base`` is ignored."""
    name = "ivf"
    exact = False
    stateful = True

    def __init__(self, dim: int, nlist: int = 1024, nprobe: int = 32, train_size: Optional[int] = None):
        if faiss is None:
            raise ImportError("queue.search=ivf needs faiss installed")
        self.dim, self.nlist, self.nprobe = dim, nlist, nprobe
        self.train_size = train_size if train_size is not None else 64 * nlist
        self.index = None
        self._pending_vec, self._pending_ids = [], []  # kept exactly (flat) until the index is trained
        self._flat = TorchMatmul()

    def _train(self) -> None:
        vectors = torch.cat(self._pending_vec)
        ids = torch.cat(self._pending_ids)
        # a later write to the same id replaces the earlier one
        last = {int(i): j for j, i in enumerate(ids.tolist())}
        keep = torch.tensor(sorted(last.values()), dtype=torch.long)
        vectors, ids = vectors[keep], ids[keep]
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, min(self.nlist, max(1, len(ids) // 39)),
                                   faiss.METRIC_INNER_PRODUCT)
        index.train(vectors.numpy())
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # fast remove_ids with arbitrary ids
        index.nprobe = self.nprobe
        index.add_with_ids(vectors.numpy(), ids.numpy())
        self.index = index
        self._pending_vec, self._pending_ids = [], []

    def update(self, ids, vectors):
        ids = ids.detach().cpu().long().contiguous()
        vectors = vectors.detach().cpu().float().contiguous()
        if self.index is None:
            self._pending_vec.append(vectors)
            self._pending_ids.append(ids)
            if sum(len(i) for i in self._pending_ids) >= self.train_size:
                self._train()
            return
        self.index.remove_ids(faiss.IDSelectorArray(ids.numpy()))
        self.index.add_with_ids(vectors.numpy(), ids.numpy())

    def search(self, queries, base, k):
        device = queries.device
        if self.index is None:  # warm-up: exact over what has been written so far
            vectors, ids = torch.cat(self._pending_vec), torch.cat(self._pending_ids)
            last = {int(i): j for j, i in enumerate(ids.tolist())}
            keep = torch.tensor(sorted(last.values()), dtype=torch.long)
            s, j = self._flat.search(queries.cpu().float(), vectors[keep], min(k, len(keep)))
            return s.to(device), ids[keep][j].to(device)
        scores, ids = self.index.search(queries.detach().cpu().float().contiguous().numpy(), k)
        return torch.from_numpy(scores).to(device), torch.from_numpy(ids).long().to(device)  # -1: too few found


def make_search(name: str, dim: int = 0, **kwargs) -> Search:
    if name == "faiss":
        return FaissFlat()
    if name == "torch":
        return TorchMatmul(**kwargs)
    if name == "ivf":
        return IVFFlat(dim, **kwargs)
    raise ValueError(f"queue.search={name!r} is not one of faiss, torch, ivf")
