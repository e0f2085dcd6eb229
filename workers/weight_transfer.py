"""The wire protocol of the collective weight sync: a private process group, a bucket plan in layer
order, and the two ends that move one full set of weights through the group.

Torch only (no Ray, no vLLM): the learner's rank 0 holds the `WeightSender` (group rank 0) and each
vLLM worker holds a `WeightReceiver` (ranks 1..W-1) through `workers/vllm_extension.py`.

Why a group of its own, built from a TCPStore: the learner process already owns torch.distributed's
default group (DeepSpeed's, over the learner ranks) and each vLLM worker owns vLLM's; neither can join
a second default group, and `torch.distributed.new_group` needs every member of the default group.
vLLM 0.32's `stateless_init_torch_distributed_process_group` and TRL/OpenRLHF solve it the same way: a
`ProcessGroup` constructed straight from a store, outside torch.distributed's global state. Building
it here with torch alone keeps vLLM out of the learner. Collectives are called on the group object
(`group.broadcast(tensor, root)`, group ranks), because torch.distributed.broadcast maps global ranks
and refuses a group it did not register.

What travels: per bucket one flat uint8 tensor (every backend moves bytes; no dtype support matters)
holding consecutive parameters in the learner's `named_parameters()` order, which for a Hugging Face
decoder is layer order (embeddings, layer 0, layer 1, ..., final norm, head). vLLM's layerwise reload
processes a layer as soon as all of its tensors have arrived, so applying overlaps receiving. The
receiver posts bucket k+1 before handing out bucket k, and the sender packs bucket k+1 while bucket k
is on the wire, so packing, transfer and loading run side by side. The bucket size (BUCKET_BYTES in
workers/weight_sync.py) bounds the extra memory on both ends: two buffers on the sender, and on a
receiver the buckets still referenced by layers vLLM has not completed.
"""
from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch.distributed import PrefixStore, ProcessGroup, TCPStore

BACKENDS = ("gloo", "nccl")
ALIGN = 16  # bytes: each tensor starts at a multiple, so its byte slice can be viewed as any dtype
STORE_PREFIX = "klrl-weight-sync"


@dataclass(frozen=True)
class TensorMeta:
    """What a receiver needs to rebuild one tensor: its Hugging Face name, shape and dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype attribute name, e.g. 'float32', 'bfloat16'

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


def tensor_meta(name: str, tensor: torch.Tensor) -> TensorMeta:
    """The TensorMeta of a parameter; a ZeRO-3 partitioned one reports its full shape (`ds_shape`)."""
    shape = getattr(tensor, "ds_shape", tensor.shape)
    return TensorMeta(name, tuple(int(s) for s in shape), str(tensor.dtype).removeprefix("torch."))


@dataclass(frozen=True)
class Bucket:
    """Consecutive tensors sent as one flat byte buffer; tensor i starts at byte offsets[i]."""

    tensors: tuple[TensorMeta, ...]
    offsets: tuple[int, ...]
    nbytes: int

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor as a view into `buffer` (uint8, nbytes long), in the bucket's order."""
        return [buffer[o:o + m.nbytes].view(m.torch_dtype).view(m.shape) for m, o in zip(self.tensors, self.offsets)]


def plan_buckets(metas: Iterable[TensorMeta], bucket_bytes: int) -> list[Bucket]:
    """Tensors in the given order, grouped into buckets of at most `bucket_bytes` (a tensor larger than
    that gets a bucket of its own). Sender and receivers call this on the same metas and get the same
    plan, so only the metas cross the wire once per trial."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[Bucket] = []
    tensors: list[TensorMeta] = []
    offsets: list[int] = []
    end = 0
    for meta in metas:
        start = -(-end // ALIGN) * ALIGN
        if tensors and start + meta.nbytes > bucket_bytes:
            buckets.append(Bucket(tuple(tensors), tuple(offsets), end))
            tensors, offsets, start = [], [], 0
        tensors.append(meta)
        offsets.append(start)
        end = start + meta.nbytes
    if tensors:
        buckets.append(Bucket(tuple(tensors), tuple(offsets), end))
    return buckets


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"weight sync backend: unknown value {backend!r}; allowed: {list(BACKENDS)}")


def buffer_device(backend: str, device: torch.device) -> torch.device:
    """Where the wire buffers live: gloo moves host memory, NCCL moves device memory."""
    return torch.device("cpu") if backend == "gloo" else device


def local_address(peer_host: str) -> str:
    """The IP of this machine's interface that routes to `peer_host` (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((peer_host, 9))
        return probe.getsockname()[0]


def _gloo(store, rank: int, world_size: int, timeout: timedelta, local_host: str | None):
    """Gloo bound to `local_host`'s interface. Left to itself gloo binds to what the hostname resolves
    to, which on many hosts is 127.0.1.1 (/etc/hosts): fine on one node, unreachable from another.
    GLOO_SOCKET_IFNAME, when set, still decides (the operator knows the network)."""
    from torch.distributed.distributed_c10d import ProcessGroupGloo

    if local_host is None or os.environ.get("GLOO_SOCKET_IFNAME"):
        return ProcessGroupGloo(store, rank, world_size, timeout)
    options = ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [ProcessGroupGloo.create_device(hostname=local_host)]
    return ProcessGroupGloo(store, rank, world_size, options)


def open_group(store: TCPStore, rank: int, world_size: int, backend: str, timeout: timedelta,
               local_host: str | None = None) -> ProcessGroup:
    """A ProcessGroup over `store` that is not registered with torch.distributed (the same construction
    as vLLM's `stateless_init_torch_distributed_process_group`). Blocks until all world_size ranks have
    joined, or raises after `timeout`; every later collective also fails after `timeout`. `local_host`:
    the address gloo listens on for its peers (this member's side of the route between the nodes)."""
    check_backend(backend)
    prefix = PrefixStore(STORE_PREFIX, store)
    group = ProcessGroup(prefix, rank, world_size)
    if backend == "gloo":
        impl, kind, device = _gloo(prefix, rank, world_size, timeout, local_host), ProcessGroup.BackendType.GLOO, "cpu"
    else:
        from torch.distributed.distributed_c10d import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        impl, kind, device = ProcessGroupNCCL(prefix, rank, world_size, options), ProcessGroup.BackendType.NCCL, "cuda"
    group._set_default_backend(kind)
    impl._set_sequence_number_for_group()
    group._register_backend(torch.device(device), kind, impl)
    return group


class WeightSender:
    """Group rank 0: owns the rendezvous store and broadcasts buckets to every receiver.

    `listen` first (the OS picks a free port, so no other process can take it between choosing and
    binding), hand the port to the receivers, then `join` while they connect.
    """

    def __init__(self, host: str, timeout_s: float):
        self.timeout, self.host = timedelta(seconds=timeout_s), host
        self.store: TCPStore | None = TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=self.timeout)
        self.port = self.store.port
        self.group: ProcessGroup | None = None
        self.backend = ""

    def join(self, world_size: int, backend: str, device: torch.device) -> None:
        self.group = open_group(self.store, 0, world_size, backend, self.timeout, local_host=self.host)
        self.backend, self.device = backend, buffer_device(backend, device)
        self._buffers = [torch.empty(0, dtype=torch.uint8, device=self.device) for _ in range(2)]

    def send(self, buckets: Iterable[tuple[Bucket, list[torch.Tensor]]]) -> int:
        """Broadcast each (bucket, its tensors) in turn; returns the bytes sent. Two wire buffers are
        kept for the group's life and alternate: bucket k+1 is packed into one while bucket k is on
        the wire from the other, which is waited for before it is packed again."""
        if self.group is None:
            raise RuntimeError("weight sender: join() the group before sending")
        in_flight: list = []  # works of the last two buckets, oldest first
        sent = 0
        for k, (bucket, tensors) in enumerate(buckets):
            buffer = self._buffer(k % 2, bucket.nbytes)
            for view, tensor in zip(bucket.views(buffer), tensors):
                view.copy_(tensor.detach())
            in_flight.append(self.group.broadcast(buffer, 0))
            if len(in_flight) == 2:
                in_flight.pop(0).wait()
            sent += bucket.nbytes
        for work in in_flight:
            work.wait()
        return sent

    def _buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        if self._buffers[slot].numel() < nbytes:
            self._buffers[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._buffers[slot][:nbytes]

    def close(self) -> None:
        if self.group is not None:
            self.group.shutdown()
        self.group = self.store = None
        self._buffers = []


class WeightReceiver:
    """Group rank >= 1: joins the sender's store and yields the broadcast tensors by name."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str, metas: list[TensorMeta],
                 bucket_bytes: int, timeout_s: float, device: torch.device):
        timeout = timedelta(seconds=timeout_s)
        self.plan = plan_buckets(metas, bucket_bytes)
        self.device = buffer_device(backend, device)
        self.store: TCPStore | None = TCPStore(host, port, is_master=False, timeout=timeout)
        self.group: ProcessGroup | None = open_group(self.store, rank, world_size, backend, timeout,
                                                     local_host=local_address(host))
        self.bytes_received = 0

    def _post(self, bucket: Bucket) -> tuple[torch.Tensor, object]:
        buffer = torch.empty(bucket.nbytes, dtype=torch.uint8, device=self.device)
        return buffer, self.group.broadcast(buffer, 0)

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for every tensor of one sync, in the sender's order. Each bucket gets a fresh
        buffer: vLLM's layerwise reload keeps the views of a layer until the layer is complete, which
        can span buckets. The next bucket is posted before this one is handed out."""
        if self.group is None:
            raise RuntimeError("weight receiver: the group is closed")
        pending = self._post(self.plan[0]) if self.plan else None
        for i, bucket in enumerate(self.plan):
            buffer, work = pending
            work.wait()
            pending = self._post(self.plan[i + 1]) if i + 1 < len(self.plan) else None
            self.bytes_received += bucket.nbytes
            yield from zip((m.name for m in bucket.tensors), bucket.views(buffer))

    def close(self) -> None:
        if self.group is not None:
            self.group.shutdown()
        self.group = self.store = None
