"""The collective weight sync's wire protocol (workers/weight_transfer.py) over a real gloo group.

The sender and two receivers run as threads of this process: each holds its own ProcessGroup over a
real TCPStore and real gloo sockets, the same objects the learner and the vLLM workers hold.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import torch

from workers.weight_transfer import (
    ALIGN,
    TensorMeta,
    WeightReceiver,
    WeightSender,
    local_address,
    open_group,
    plan_buckets,
    tensor_meta,
)

TIMEOUT_S = 30.0


def weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes and odd byte sizes, so packing has to align every tensor."""
    g = torch.Generator().manual_seed(seed)
    return [("embed.weight", torch.randn(37, 8, generator=g)),
            ("layers.0.norm.weight", torch.randn(3, generator=g).to(torch.bfloat16)),
            ("layers.0.proj.weight", torch.randn(5, 7, generator=g)),
            ("layers.0.count", torch.randint(0, 9, (3,), generator=g)),
            ("layers.1.proj.weight", torch.randn(64, 64, generator=g)),  # 16 kB: larger than a bucket
            ("norm.scale", torch.randn((), generator=g))]


def test_plan_keeps_order_aligns_and_bounds_buckets():
    metas = [tensor_meta(name, t) for name, t in weights(0)]
    buckets = plan_buckets(metas, bucket_bytes=2048)
    assert [m for b in buckets for m in b.tensors] == metas  # every tensor once, in order
    for bucket in buckets:
        assert all(o % ALIGN == 0 for o in bucket.offsets)
        assert bucket.nbytes == bucket.offsets[-1] + bucket.tensors[-1].nbytes
        assert bucket.nbytes <= 2048 or len(bucket.tensors) == 1  # only an oversize tensor exceeds it
    assert any(b.nbytes > 2048 for b in buckets) and len(buckets) >= 3
    assert plan_buckets(metas, bucket_bytes=10**9)[0].tensors == tuple(metas)
    assert plan_buckets([], 64) == []
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(metas, 0)


def test_tensor_meta_reads_zero3_full_shape():
    partitioned = torch.empty(0)
    partitioned.ds_shape = torch.Size([4, 6])  # what DeepSpeed ZeRO-3 sets on a partitioned parameter
    assert tensor_meta("w", partitioned) == TensorMeta("w", (4, 6), "float32")
    assert TensorMeta("w", (4, 6), "bfloat16").nbytes == 48


def test_unknown_backend_refused():
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with pytest.raises(ValueError, match=r"unknown value 'mpi'; allowed: \['gloo', 'nccl'\]"):
        open_group(store, 0, 2, "mpi", timeout=None)


def run_group(bucket_bytes: int, syncs: list[list[tuple[str, torch.Tensor]]], receivers: int = 2,
              close: bool = True, keep: list | None = None, host: str = "127.0.0.1") -> list:
    """Sender + `receivers` receivers in threads; each sync's tensors as every receiver got them (cloned).
    The ends are appended to `keep`, so that only close() can free what they hold."""
    keep = [] if keep is None else keep
    sender = WeightSender(host, TIMEOUT_S)
    keep.append(sender)
    metas = [tensor_meta(n, t) for n, t in syncs[0]]
    world = receivers + 1

    def receiver_side(rank: int):
        r = WeightReceiver(host, sender.port, rank, world, "gloo", metas, bucket_bytes, TIMEOUT_S,
                           torch.device("cpu"))
        keep.append(r)
        got = [[(name, t.clone()) for name, t in r.receive()] for _ in syncs]
        if close:
            r.close()
        return got, r.bytes_received

    with ThreadPoolExecutor(receivers) as pool:
        futures = [pool.submit(receiver_side, rank) for rank in range(1, world)]
        sender.join(world, "gloo", torch.device("cpu"))
        for named in syncs:
            tensors = dict(named)
            plan = plan_buckets(metas, bucket_bytes)
            sent = sender.send((b, [tensors[m.name] for m in b.tensors]) for b in plan)
            assert sent == sum(b.nbytes for b in plan)
        results = [f.result(timeout=TIMEOUT_S) for f in futures]
    if close:
        sender.close()
    return results


@pytest.mark.parametrize("bucket_bytes", [256, 1 << 20])
def test_every_receiver_gets_every_tensor_bit_exact(bucket_bytes):
    syncs = [weights(1), weights(2)]  # two syncs through one group, different values
    results = run_group(bucket_bytes, syncs)
    payload = sum(t.numel() * t.element_size() for _, t in syncs[0])
    for got, received in results:
        assert received >= 2 * payload  # alignment padding only adds
        for sent, arrived in zip(syncs, got):
            assert [n for n, _ in arrived] == [n for n, _ in sent]
            for (_, a), (_, b) in zip(arrived, sent):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def non_loopback_address() -> str | None:
    """This machine's address on its default route, or None when it has only loopback."""
    try:
        address = local_address("192.0.2.1")  # TEST-NET-1: never routed anywhere, only looked up
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_group_on_a_routable_address():
    """As across nodes: the store and gloo on the address other nodes reach this one at (gloo left to
    itself binds to what the hostname resolves to, often 127.0.1.1, and only works within the node)."""
    host = non_loopback_address()
    if host is None:
        pytest.skip("no non-loopback interface on this machine")
    syncs = [weights(5)]
    for got, _ in run_group(1 << 20, syncs, receivers=2, host=host):
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got[0], syncs[0]))


def test_closed_groups_leave_no_threads_or_sockets():
    process = psutil.Process()

    def census() -> tuple[int, int]:
        return process.num_threads(), len(process.net_connections("tcp"))

    kept: list = []  # the closed ends stay referenced: only close() may free their sockets and threads
    run_group(1 << 20, [weights(3)], receivers=1, keep=kept)  # warm-up: lazily started runtime threads
    before = census()
    for seed in range(5):
        run_group(1 << 20, [weights(seed)], receivers=1, keep=kept)
    assert census() == before
    # Control: the same groups left open do hold sockets and threads.
    open_ends: list = []
    run_group(1 << 20, [weights(4)], receivers=1, close=False, keep=open_ends)
    threads, sockets = census()
    assert sockets > before[1] and threads > before[0]
    for end in open_ends:
        end.close()
