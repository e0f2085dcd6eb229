"""The receiving end of the collective weight sync, inside vLLM's worker process.

vLLM mixes this class into its worker class when the engine is built with
`worker_extension_cls="workers.vllm_extension.WeightSyncExtension"` (vLLM's documented hook for RL
weight updates, used the same way by TRL's `WeightSyncWorkerExtension` and OpenRLHF's `WorkerWrap`);
the driver reaches its methods through `LLM.collective_rpc("klrl_...")`, which runs them on every
worker of the engine (one per tensor-parallel rank). Every method name starts with `klrl_` because
vLLM refuses an extension attribute that its worker class already has.

It imports only torch and the wire protocol (`workers/weight_transfer.py`), never klrl's orchestrator,
because with tensor parallelism vLLM imports it in worker processes of its own.
"""
from __future__ import annotations

import torch

from workers.weight_transfer import TensorMeta, WeightReceiver


class WeightSyncExtension:
    """Methods added to vLLM's worker: join the trial's weight-sync group, receive a sync, leave."""

    def klrl_device_type(self) -> str:
        """'cuda' or 'cpu': the orchestrator picks NCCL only when every member is on a GPU."""
        return torch.device(self.device).type

    def klrl_open_weight_sync(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                              metas: list[TensorMeta], bucket_bytes: int, timeout_s: float) -> int:
        """Join the group as rank rank_offset + this worker's rank in the engine; returns that rank."""
        self.klrl_close_weight_sync()
        rank = rank_offset + self.rank
        self._klrl_receiver = WeightReceiver(host, port, rank, world_size, backend, metas, bucket_bytes, timeout_s,
                                             torch.device(self.device))
        return rank

    def klrl_receive_weights(self) -> int:
        """Receive one full set of weights and load it as it arrives; returns the bytes received.

        `reload_weights` is the entry the object-store path uses too: vLLM maps Hugging Face names onto
        its fused layers and redoes the CPU weight repacking; here it consumes a generator, so each layer
        is processed while the next buckets are still on the wire.
        """
        receiver = getattr(self, "_klrl_receiver", None)
        if receiver is None:
            raise RuntimeError("klrl weight sync: this vLLM worker has not joined a weight-sync group")
        before = receiver.bytes_received
        stream = receiver.receive()
        self.reload_weights(weights_iterator=stream)
        # The sender broadcasts every bucket whatever the consumer does; a loader that stopped early
        # would leave the group one collective behind, so drain it and say so.
        leftover = sum(1 for _ in stream)
        if leftover:
            raise RuntimeError(f"klrl weight sync: vLLM's loader left {leftover} received tensors unread")
        return receiver.bytes_received - before

    def klrl_close_weight_sync(self) -> None:
        receiver = getattr(self, "_klrl_receiver", None)
        if receiver is not None:
            receiver.close()
        self._klrl_receiver = None
