"""Several processes, one run: the few ``torch.distributed`` helpers the loop and the runner use.

Processes come from ``torchrun`` (or ``skillbank bench --nproc N``, which
re-launches itself through ``torch.distributed.run``); ``init_from_env`` joins the
process group it describes (gloo on CPU, NCCL on CUDA with one GPU per local
rank). Without a process group every helper is the single-process identity, so
callers need no branches: ``shard(n)`` is everything, ``all_sum`` returns its
input, ``barrier`` returns at once.

Training (``learners.base``): every rank draws the same seeded permutation and
takes the strided shard ``batch[rank::world]`` of each global batch (what
``DistributedSampler`` does per epoch, minus its padding, which would repeat
samples and break equivalence with one process). Each rank weights its loss by
its share of the global batch, so summing the gradients of the trainable
parameters (the frozen base is never reduced) gives exactly the single-process
mean, even for an uneven last batch. As DDP does, training starts from rank 0's
trainable weights (``broadcast_tensors``), so the ranks never drift apart.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    """A process group with more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by a launcher (torchrun sets WORLD_SIZE) for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group the launcher's environment describes; True if this call created it.

    No-op when not launched or already initialised. ``backend`` defaults to NCCL
    when CUDA is present, gloo otherwise; on CUDA the process takes GPU LOCAL_RANK.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def shutdown(created: bool = True) -> None:
    """Leave the process group (only the caller that created it should)."""
    if created and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device(dev: torch.device) -> torch.device:
    """A bare ``cuda`` becomes this process's GPU (``cuda:LOCAL_RANK``) under a process group."""
    if dev.type == "cuda" and dev.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return dev


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shard(n: int) -> slice:
    """This rank's rows of ``n``: the strided slice ``rank::world`` (sizes differ by at most one)."""
    return slice(rank(), n, world_size())


def _reduce_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over ranks (counts of correct answers, totals), in float64."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def sync_gradients(params: Sequence[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Sum the gradients of ``params`` and ``loss`` over ranks in one all-reduce; the summed loss.

    Each rank's loss is already weighted by its share of the global batch, so the
    sums are the global mean. A parameter without a gradient on every rank stays
    without one (AdamW then skips it, as it would in one process).
    """
    if not is_distributed():
        return loss.detach()
    dev = loss.device
    # float64 stays
    dtype = functools.reduce(torch.promote_types, [p.dtype for p in params], torch.float32)
    flags = torch.tensor([p.grad is not None for p in params], dtype=dtype, device=dev)
    parts = [loss.detach().to(dtype).reshape(1), flags]
    parts += [
        (p.grad if p.grad is not None else torch.zeros_like(p)).to(dtype).reshape(-1)
        for p in params
    ]
    flat = torch.cat(parts)
    dist.all_reduce(flat)
    total, flags, offset = flat[0], flat[1 : 1 + len(params)], 1 + len(params)
    for p, has in zip(params, flags.tolist(), strict=True):
        n = p.numel()
        if has:
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n
    return total


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s (one flat broadcast per dtype)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=src)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (any picklable value)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only while the others wait; every rank gets its result.

    An error on rank 0 is raised on every rank (instead of leaving the others
    waiting for a result that never comes).
    """
    if not is_distributed():
        return fn()
    result: tuple[bool, Any] = (True, None)
    error: Exception | None = None
    if is_main():
        try:
            result = (True, fn())
        except Exception as e:  # its text goes to the other ranks (an exception may not pickle)
            error, result = e, (False, f"{type(e).__name__}: {e}")
    barrier()
    ok, value = broadcast(result)
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. creating a bank and its schema), then the others."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()
