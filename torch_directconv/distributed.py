"""The gradient all-reduce of DistributedDataParallel between processes of one host, through shared
memory.

gloo all-reduces over TCP even between two processes of one machine: each byte crosses the loopback
socket, and gloo's threads take the cores that the backward needs. ResNet-50's 102 MB of gradients
cost two processes on two cores about 170 ms a step that way; through a shared segment the sum is a
few passes over memory (csrc/dist/shm_allreduce.h has the protocol).

    net = DistributedDataParallel(model, gradient_as_bucket_view=True)
    allreduce = tdc.distributed.ShmAllReduce()      # collective: every rank calls it
    net.register_comm_hook(None, allreduce.hook)

The hook computes what DDP's default does, the mean of each gradient bucket over the processes, and
every process gets the same bits. Where the segment cannot serve (the ranks span several hosts, no
/dev/shm, a bucket that is not float32) it all-reduces through the process group instead, as DDP
would, and `reason` says why.
"""

from __future__ import annotations

import datetime
import os
import secrets
import socket

import torch
import torch.distributed as dist

from . import _C

__all__ = ["ShmAllReduce"]

_ERROR_PREFIX = "torch_directconv shm all-reduce"


def _host_id() -> str:
    """The same for processes that share this kernel (and so its /dev/shm)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class ShmAllReduce:
    """The mean over the ranks of `group` (default: the whole world) through a shared-memory segment
    when they all run on this host, else through the group's own all_reduce.

    Making one is collective: every rank of the group must make it, in the same order as its other
    collectives. `chunk_mb` is the size of each rank's two buffers in the segment (the tensor passes
    through them chunk by chunk); `timeout` (seconds, default: the group's default of 30 minutes)
    bounds how long a rank waits for the others in a sum before it raises. A rank whose process has
    exited is seen within a tenth of a second.

    Attributes: `transport` is "shm" or the group's backend name; `reason` is None with "shm", else
    why the segment is not used.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, chunk_mb: float = 1.0, timeout: float | None = None):
        if not dist.is_initialized():
            raise RuntimeError("ShmAllReduce: torch.distributed is not initialised (call init_process_group first)")
        if not chunk_mb > 0:
            raise ValueError(f"ShmAllReduce: chunk_mb must be positive, got {chunk_mb!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"ShmAllReduce: timeout must be positive seconds, got {timeout!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.transport = dist.get_backend(group)
        self.reason: str | None = None
        self._shm = None
        if timeout is None:
            timeout = datetime.timedelta(minutes=30).total_seconds()
        chunk = max(16 * self.world, int(chunk_mb * 2**20 / 4) // 16 * 16)

        hosts: list[str | None] = [None] * self.world
        dist.all_gather_object(hosts, _host_id(), group=group)
        if len(set(hosts)) > 1:
            self.reason = f"the {self.world} ranks run on {len(set(hosts))} hosts"
            return
        if self.world == 1:
            self.reason = "a single process: nothing to reduce"
            return
        # Rank 0 makes the segment before the others look for it, so a failure is everyone's at once.
        made: list = [None]
        if self.rank == 0:
            name = f"/torch_directconv-{os.getpid()}-{secrets.token_hex(6)}"
            try:
                self._shm = _C.ShmAllReduce(name, 0, self.world, chunk, timeout)
                made = [name]
            except (RuntimeError, ValueError) as e:
                made = [f"error: {e}"]
        dist.broadcast_object_list(made, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        error = None
        if made[0].startswith("error: "):
            error = made[0][len("error: ") :]
        elif self.rank != 0:
            try:
                self._shm = _C.ShmAllReduce(made[0], self.rank, self.world, chunk, timeout)
            except (RuntimeError, ValueError) as e:
                error = str(e)
        errors: list = [None] * self.world
        dist.all_gather_object(errors, error, group=group)
        if self._shm is not None and self.rank == 0:
            self._shm.unlink()  # every rank has it mapped, or has given up: nothing stays in /dev/shm
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            self._shm = None
            r, e = failed[0]
            self.reason = f"rank {r} could not map the segment: {e}"
            return
        self.transport = "shm"

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor <- the mean over the ranks of their `tensor`, in place; returns it. Every rank must
        call it with a tensor of the same size and dtype, in the same order."""
        if self._shm is not None and tensor.dtype == torch.float32 and tensor.is_contiguous() and tensor.is_cpu:
            self._shm.allreduce_mean_(tensor, float(self.world))
            return tensor
        tensor.div_(self.world)
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def hook(self, _state, bucket):  # unannotated: DDP rejects string annotations
        """A DDP communication hook (`register_comm_hook(None, allreduce.hook)`): the mean of the bucket."""
        buf = bucket.buffer()
        if self._shm is None or buf.dtype != torch.float32:
            return dist.all_reduce(buf.div_(self.world), group=self.group, async_op=True).get_future().then(
                lambda f: f.value()[0]
            )
        self._shm.allreduce_mean_(buf, float(self.world))
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(buf)
        return fut

    def __repr__(self) -> str:
        how = self.transport if self.reason is None else f"{self.transport} ({self.reason})"
        return f"ShmAllReduce(rank {self.rank} of {self.world}, {how})"


def is_shm_allreduce_error(e: BaseException) -> bool:
    """An error of a ShmAllReduce sum: another rank exited or did not arrive within the timeout."""
    return _ERROR_PREFIX in str(e)
