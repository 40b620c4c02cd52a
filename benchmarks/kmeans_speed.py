"""K-Means as MoP runs it on a DeepSeek-V3-sized sample (65,536 x 7168, K = 64), on a GPU: mop_ray's kmeans
(n_init 3), then its parts: one Lloyd iteration with index_add_ sums vs one-hot matmul sums, and one k-means++
seeding. Gaussian rows and clustered rows (64 centres + noise).

    python benchmarks/kmeans_speed.py          (CUDA only; results: benchmarks/results/kmeans-probe-h200.txt)
"""

from __future__ import annotations

import time

import torch

from mop_ray.methods.mosaic import kmeans


def sync() -> None:
    torch.cuda.synchronize()


def lloyd_ms(data: torch.Tensor, k: int, variant: str, iters: int = 30) -> float:
    """Milliseconds per Lloyd iteration from random centres, cluster sums by ``index_add_`` or a one-hot matmul."""
    n = data.shape[0]
    x2 = data.pow(2).sum(-1)  # [N]
    c = data[torch.randperm(n, device=data.device)[:k]].clone()  # [k, H]
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        dist = x2[:, None] - 2 * data @ c.T + c.pow(2).sum(-1)[None]  # [N, k]
        labels = dist.argmin(-1)
        float(dist.gather(1, labels[:, None]).clamp_min(0).sum())  # the inertia check syncs, as kmeans does
        if variant == "index_add":
            sums = torch.zeros_like(c).index_add_(0, labels, data)
        else:
            sums = torch.zeros(k, n, device=data.device).scatter_(0, labels[None], 1.0) @ data
        counts = torch.bincount(labels, minlength=k).to(data.dtype)[:, None]
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)
    sync()
    return (time.perf_counter() - t) / iters * 1e3


def seeding_s(data: torch.Tensor, k: int) -> float:
    """One k-means++ seeding as kmeans does it (probabilities to the host, a CPU generator picks each centre)."""
    x2 = data.pow(2).sum(-1)
    gen = torch.Generator().manual_seed(0)
    sync()
    t = time.perf_counter()
    c = data[0]
    d2 = (x2 - 2 * data @ c + c.pow(2).sum()).clamp_min(0)
    for _ in range(k - 1):
        c = data[torch.multinomial((d2 / d2.sum()).cpu(), 1, generator=gen).item()]
        d2 = torch.minimum(d2, (x2 - 2 * data @ c + c.pow(2).sum()).clamp_min(0))
    sync()
    return time.perf_counter() - t


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, h, k = 65536, 7168, 64
    gaussian = torch.randn(n, h, generator=gen, device="cuda", dtype=torch.bfloat16).float()
    centres = torch.randn(k, h, generator=gen, device="cuda") * 3
    clustered = centres[torch.randint(0, k, (n,), generator=gen, device="cuda")] + torch.randn(n, h, generator=gen, device="cuda")
    for name, data in (("gaussian", gaussian), ("clustered", clustered)):
        kmeans(data[:4096], 8)  # warm-up
        sync()
        t = time.perf_counter()
        kmeans(data, k, seed=0)
        sync()
        print(f"{name}: mop_ray kmeans n_init=3: {time.perf_counter() - t:.3f} s", flush=True)
        for variant in ("index_add", "onehot"):
            print(f"  {variant}: {lloyd_ms(data, k, variant):.2f} ms per Lloyd iteration", flush=True)
        print(f"  k-means++ seeding (one init): {seeding_s(data, k):.3f} s", flush=True)


if __name__ == "__main__":
    main()
