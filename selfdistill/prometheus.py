"""Prometheus metrics: the optional `/metrics` endpoint the daemon serves while it runs.

Turned on by `[monitoring] prometheus_port` in the policy (off by default; 0 picks a free port,
logged at start). Each scrape opens its own read-only connection to the store, so it never
blocks the daemon's writes (WAL) and reports exactly what `selfdistill status` and the canned
queries would: the store stays the one source of truth, and the endpoint keeps no counters of
its own that a restart could reset. The HTTP server and the text format are prometheus_client's.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

# (counter?, name, help, labels, SQL whose last column is the value and the others the labels)
BY_LABELS = [
    (True, "selfdistill_rounds", "Rounds by decision ('' while running).", ["decision"],
     "SELECT coalesce(decision, ''), count(*) FROM rounds GROUP BY 1"),
    (True, "selfdistill_generations", "Answers generated, by purpose (train, eval, ...).", ["purpose"],
     "SELECT purpose, count(*) FROM generations GROUP BY purpose"),
    (True, "selfdistill_generated_tokens", "Completion tokens generated, by purpose.", ["purpose"],
     "SELECT purpose, coalesce(sum(completion_tokens), 0) FROM generations GROUP BY purpose"),
    (True, "selfdistill_training_rows", "Pairs and SFT examples stored, by kind and signal source.", ["kind", "source"],
     "SELECT 'pair', source, count(*) FROM pairs GROUP BY source UNION ALL "
     "SELECT 'sft', source, count(*) FROM sft_examples GROUP BY source"),
    (True, "selfdistill_training_runs", "Training child runs, by outcome.", ["status"],
     "SELECT status, count(*) FROM training_runs GROUP BY status"),
    (True, "selfdistill_events", "Stored events by kind (promote, rollback, teacher_unavailable, ...).", ["kind", "level"],
     "SELECT kind, level, count(*) FROM events GROUP BY kind, level"),
    (True, "selfdistill_teacher_tokens", "Tokens the teacher was asked for (prompts and answers), by use.", ["purpose"],
     "SELECT purpose, coalesce(sum(prompt_tokens + completion_tokens), 0) FROM teacher_usage GROUP BY purpose"),
    (True, "selfdistill_teacher_requests", "Requests sent to the teacher, by use.", ["purpose"],
     "SELECT purpose, coalesce(sum(requests), 0) FROM teacher_usage GROUP BY purpose"),
    (False, "selfdistill_judge_healthy", "1 when a judge's latest health check passed.", ["judge"],
     "SELECT judge, healthy FROM judge_health WHERE id IN (SELECT max(id) FROM judge_health GROUP BY judge)"),
    (False, "selfdistill_tasks", "Tasks in the store, by split.", ["split"], "SELECT split, count(*) FROM tasks GROUP BY split"),
]


class StoreCollector:
    """A prometheus_client collector that reads the store at every scrape."""

    def __init__(self, db_path: Path, name: str):
        self.db_path = Path(db_path)
        self.name = name

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

        from selfdistill.records import PHASES
        from selfdistill.store import Store

        store = Store.open(self.db_path, readonly=True)
        try:
            q = store.query
            cur = store.current_checkpoint()["id"]
            info = GaugeMetricFamily("selfdistill_info", "The service and the checkpoint it serves (value 1).",
                                     labels=["name", "current_checkpoint"])
            info.add_metric([self.name, cur], 1)
            yield info

            acc = GaugeMetricFamily("selfdistill_heldout_accuracy", "Latest held-out accuracy of the base and of the served checkpoint.",
                                    labels=["checkpoint"])
            for label, ckpt in (("base", "base"), ("current", cur)):
                ev = store.latest_evaluation(ckpt, "heldout")
                if ev and ev["metrics"].get("accuracy") is not None:
                    acc.add_metric([label], float(ev["metrics"]["accuracy"]))
            yield acc

            phase = GaugeMetricFamily("selfdistill_round_phase", "1 for the phase the running round is in, 0 for the others.",
                                      labels=["phase"])
            running = q("SELECT id, phase FROM rounds WHERE status = 'running' ORDER BY id DESC LIMIT 1")
            for p in PHASES[:-1]:  # every phase a running round can be in ("done" ends it)
                phase.add_metric([p], 1 if running and running[0]["phase"] == p else 0)
            yield phase
            last = q("SELECT coalesce(max(id), 0) AS id, max(finished_at) AS fin FROM rounds")[0]
            yield GaugeMetricFamily("selfdistill_round", "Id of the newest round.", value=last["id"])
            if last["fin"] is not None:
                yield GaugeMetricFamily("selfdistill_last_round_finished_timestamp_seconds",
                                        "When a round last reached its decision (alert when it stops moving).", value=last["fin"])

            dur = SummaryMetricFamily("selfdistill_phase_seconds", "Time spent in each finished phase.", labels=["phase"])
            for r in q("SELECT phase, count(*) AS n, sum(duration_s) AS s FROM phases GROUP BY phase"):
                dur.add_metric([r["phase"]], count_value=r["n"], sum_value=r["s"] or 0.0)
            yield dur

            # the state directory's file system (the store, checkpoints, adapters): alert before it fills
            disk = shutil.disk_usage(self.db_path.parent)
            yield GaugeMetricFamily("selfdistill_state_disk_free_bytes", "Bytes free on the state directory's file system.", value=disk.free)
            yield GaugeMetricFamily("selfdistill_state_disk_size_bytes", "Size of the state directory's file system.", value=disk.total)

            # the rest: one family per query, whose last column is the value and the others its labels
            for counter, name, help_, labels, sql in BY_LABELS:
                fam = (CounterMetricFamily if counter else GaugeMetricFamily)(name, help_, labels=labels)
                for r in q(sql):
                    *lab, value = r.values()
                    fam.add_metric([str(x) for x in lab], value)
                yield fam
        finally:
            store.close()


class MetricsServer:
    """prometheus_client's HTTP server on (addr, port), serving only this store's metrics."""

    def __init__(self, db_path: Path, name: str, addr: str, port: int):
        from prometheus_client import CollectorRegistry, start_http_server

        from selfdistill.errors import PolicyError

        registry = CollectorRegistry(auto_describe=False)
        registry.register(StoreCollector(db_path, name))
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=registry)
        except OSError as e:
            raise PolicyError(
                f"monitoring: cannot serve metrics on {addr}:{port} ({e.strerror or e}); "
                "choose another monitoring.prometheus_port or address, or unset it"
            ) from None
        self.addr = addr
        self.port = self._server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
