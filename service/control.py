"""A small named Ray actor per run: the driver's stop flag and the data pipeline's row counts.

Ray Data's decode tasks `add` their row counts; the driver sets the stop flag on SIGTERM/SIGINT;
rank 0's `StopWatcher` polls the actor from a thread (never from the training step) and sets the
flag itself when too many rows are bad.
"""

from __future__ import annotations

import threading

import ray

from .errors import StopReason

MIN_ROWS_FOR_BAD_FRACTION = 50
"""The bad-row fraction is judged only once this many rows were seen (noise on tiny samples)."""
POLL_S = 0.5
"""How often rank 0's watcher asks the control actor for the stop flag and the row counts."""


class RunControl:
    def __init__(self) -> None:
        self.rows_seen = 0
        self.rows_bad = 0
        self.rows_not_downloaded = 0  # img2dataset's failed downloads: not data, not bad
        self.reasons: dict[str, int] = {}
        self.stop_reason: StopReason | None = None
        self.detail = ""

    # --- data statistics
    def add(
        self,
        total: int,
        bad: int,
        reasons: dict[str, int] | None = None,
        not_downloaded: int = 0,
    ) -> None:
        """`total` rows read, of which `bad` could not be used and `not_downloaded` were failed
        downloads (service.rows.not_downloaded; not among the bad)."""
        self.rows_seen += total
        self.rows_bad += bad
        self.rows_not_downloaded += not_downloaded
        for k, v in (reasons or {}).items():
            self.reasons[k] = self.reasons.get(k, 0) + v

    def get(self) -> dict:
        return {
            "rows_seen": self.rows_seen,
            "rows_bad": self.rows_bad,
            "rows_not_downloaded": self.rows_not_downloaded,
            "bad_reasons": self.reasons,
        }

    def too_many_bad(self, max_bad_fraction: float) -> bool:
        """Judged on the downloaded rows only: failed downloads never count."""
        seen = self.rows_seen - self.rows_not_downloaded
        return seen >= MIN_ROWS_FOR_BAD_FRACTION and self.rows_bad / seen > max_bad_fraction

    # --- which worker group is the live one (a lost node makes Ray start a new one)
    def new_generation(self) -> int:
        self.generation = getattr(self, "generation", 0) + 1
        return self.generation

    def current_generation(self) -> int:
        return getattr(self, "generation", 0)

    # --- stopping
    def request_stop(self, reason: StopReason, detail: str = "") -> None:
        if self.stop_reason is None:
            self.stop_reason, self.detail = StopReason(reason), detail

    def should_stop(self) -> bool:
        return self.stop_reason is not None

    def reason(self) -> tuple[StopReason | None, str]:
        return self.stop_reason, self.detail


CONTROL_PREFIX = "maskclip-control-"


def control_name(run_name: str) -> str:
    """The named control actor of `run_name`'s driver in this process (`maskclip sweep` finds
    its trials' actors by the prefix)."""
    import os

    return f"{CONTROL_PREFIX}{run_name}-{os.getpid()}"


def control_actor(name: str, create: bool = False):
    """The run's control actor; created on the driver's own node: on a cluster, a zero-CPU
    actor may land on any worker node, and the loss (or preemption) of that node would take the
    stop flag and the restarted workers' first call with it."""
    if create:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        return (
            ray.remote(RunControl)
            .options(
                name=name,
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=4,
                scheduling_strategy=here,
            )
            .remote()
        )
    return ray.get_actor(name)


def bad_rows_message(stats: dict, max_bad_fraction: float) -> str:
    """One line: how many rows could not be used, by reason, against the allowed fraction."""
    reasons = sorted(stats["bad_reasons"].items(), key=lambda kv: (-kv[1], kv[0]))
    detail = ", ".join(f"{k}: {v}" for k, v in reasons)
    missing = stats.get("rows_not_downloaded", 0)
    seen = stats["rows_seen"] - missing
    pct = 100 * stats["rows_bad"] / max(1, seen)
    rows = f"{seen} downloaded rows" if missing else f"{seen} rows"
    return (
        f"data.train: {stats['rows_bad']} of {rows} ({pct:.1f}%) could not be used ({detail}); "
        f"data.max_bad_fraction is {max_bad_fraction:g}"
    )


class StopWatcher:
    """Rank 0: a daemon thread that polls the control actor every POLL_S seconds, so the
    training step reads a plain flag (`stop_requested`) and never waits on an actor call.
    It also stops the run once more than `max_bad_fraction` of the rows seen were bad."""

    def __init__(self, control, max_bad_fraction: float):
        self.control = control
        self.max_bad_fraction = max_bad_fraction
        self.stats = {"rows_seen": 0, "rows_bad": 0, "rows_not_downloaded": 0, "bad_reasons": {}}
        self.reason: StopReason | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maskclip-stop-watcher", daemon=True)
        self._thread.start()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        while not self._done.wait(POLL_S):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the actor going away ends the run anyway
                return

    def poll(self) -> None:
        self.stats = ray.get(self.control.get.remote())
        if not self._stop.is_set() and ray.get(
            self.control.too_many_bad.remote(self.max_bad_fraction)
        ):
            message = bad_rows_message(self.stats, self.max_bad_fraction)
            ray.get(self.control.request_stop.remote(StopReason.DATA, message))
        if ray.get(self.control.should_stop.remote()):
            self.reason, _ = ray.get(self.control.reason.remote())
            self._stop.set()

    def close(self) -> None:
        self._done.set()


# --------------------------------------------------------------------------- preemption
#
# A node about to go away (a spot reclaim, a drained Kubernetes node, a deleted pod) gets a
# notice: the worker pod's preStop hook runs `maskclip node-preempt` (`preempt_node` below),
# which drains the node through Ray's GCS with reason PREEMPTION and a deadline. Ray Train's
# own PreemptionWatcher sees the drain and marks every worker of the group; each worker reads
# that mark in the step (`preemption_notice`: a local read, no call), the ranks agree in the
# step's all-reduce, and the group saves one checkpoint at once. Rank 0 records it in the GCS
# key-value store (`record_preemption_checkpoint`), where the hook sees it and returns: the pod
# then stops, and Ray Train restarts the group from that checkpoint with the workers it can
# still place (elastic, scaling.min_workers) or waits for a node.

PREEMPTION_KV_NAMESPACE = b"maskclip-preemption"
PREEMPTION_POLL_ENV = "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"
PREEMPTION_POLL_S = 1.0
"""How often Ray Train's watcher reads the drained nodes (Ray's default is 5 s); the driver sets
it and Ray Train passes it to its controller."""


def preemption_notice():
    """This worker's preemption notice (Ray Train's PreemptionInfo) or None: the attribute Ray
    Train's watcher sets on the worker, read without a call (ray.train.get_preemption_info()
    would be a barrier across ranks)."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        return get_train_context().preemption_context.preemption_info
    except Exception:  # noqa: BLE001 - an older Ray, Train V1, or no train context: no notice
        return None


def _kv_key(node_id: str) -> bytes:
    return f"checkpointed:{node_id}".encode()


def record_preemption_checkpoint(notice, step: int) -> None:
    """Rank 0, once the checkpoint asked for by a notice is on storage: tell each preempted
    node's hook (a GCS key per node: the step and the time). `notice` is None when another
    rank's notice came first: the nodes being drained are then asked from the GCS."""
    import json
    import time

    from ray.experimental import internal_kv

    value = json.dumps({"step": step, "time": time.time()})
    if notice is not None:
        node_ids = notice.preempted_node_ids
    else:
        node_ids = list(ray._private.state.state.get_draining_nodes())
    for node_id in node_ids:
        internal_kv._internal_kv_put(
            _kv_key(node_id), value, overwrite=True, namespace=PREEMPTION_KV_NAMESPACE
        )


def _local_node_id(nodes: dict) -> str:
    """The alive Ray node of this machine (one Ray node per pod): the one whose address is ours."""
    from ray.util import get_node_ip_address

    ip = get_node_ip_address()
    mine = [
        node_id.hex()
        for node_id, info in nodes.items()
        if info.state == 0 and info.node_manager_address == ip and not info.is_head_node
    ]
    if len(mine) != 1:
        from .errors import ClusterError

        raise ClusterError(
            f"node-preempt: {len(mine)} Ray worker nodes at {ip}; pass --node-id to choose one"
        )
    return mine[0]


def preempt_node(
    address: str, node_id: str | None, within_s: float, poll_s: float = 0.5
) -> tuple[str, dict | None, float]:
    """Drain `node_id` (default: this machine's Ray node) with reason PREEMPTION and a deadline
    `within_s` seconds from now, then wait until a run on it recorded its checkpoint, the node is
    gone (nothing ran there: a drained idle node exits at once) or `within_s` passed.
    Returns (node id, {"step", "time"} of the checkpoint or None, seconds waited)."""
    import json
    import time

    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    from .errors import ClusterError

    start = time.time()
    gcs = GcsClient(address=address)
    try:
        nodes = gcs.get_all_node_info(timeout=10)
    except Exception as e:  # noqa: BLE001 - the head is gone already: nothing left to tell
        raise ClusterError(f"node-preempt: cannot reach the Ray head at {address} ({e})") from None
    node_id = node_id or _local_node_id(nodes)
    deadline_ms = int((start + within_s) * 1000)
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    accepted, why = gcs.drain_node(node_id, reason, "maskclip node-preempt", deadline_ms)
    if not accepted:
        raise ClusterError(f"node-preempt: Ray refused to drain node {node_id}: {why}")
    key = _kv_key(node_id)
    while True:
        raw = gcs.internal_kv_get(key, PREEMPTION_KV_NAMESPACE, timeout=10)
        if raw:
            record = json.loads(raw)
            if record["time"] >= start:
                return node_id, record, time.time() - start
        alive = {k.hex(): v.state == 0 for k, v in gcs.get_all_node_info(timeout=10).items()}
        if not alive.get(node_id, False) or time.time() - start >= within_s:
            return node_id, None, time.time() - start
        time.sleep(poll_s)
