"""Prometheus metrics: the optional `/metrics` endpoint the daemon serves while it runs.

Turned on by `[monitoring] prometheus_port` in the policy (off by default; 0 picks a free port,
logged at start). Each scrape opens its own read-only connection to the store, so it never
blocks the daemon's writes (WAL) and reports exactly what `selfdistill status` and the canned
queries would: the store stays the one source of truth, and the endpoint keeps no counters of
its own that a restart could reset. The HTTP server and the text format are prometheus_client's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

PHASES = ["sample", "generate", "score", "pair", "train", "evaluate", "decide", "promote"]


class StoreCollector:
    """A prometheus_client collector that reads the store at every scrape."""

    def __init__(self, db_path: Path, name: str):
        self.db_path = Path(db_path)
        self.name = name

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

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

            rounds = CounterMetricFamily("selfdistill_rounds", "Rounds by decision ('' while running).", labels=["decision"])
            for r in q("SELECT coalesce(decision, '') AS d, count(*) AS n FROM rounds GROUP BY d"):
                rounds.add_metric([r["d"]], r["n"])
            yield rounds

            phase = GaugeMetricFamily("selfdistill_round_phase", "1 for the phase the running round is in, 0 for the others.",
                                      labels=["phase"])
            running = q("SELECT id, phase FROM rounds WHERE status = 'running' ORDER BY id DESC LIMIT 1")
            for p in PHASES:
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

            gens = CounterMetricFamily("selfdistill_generations", "Answers generated, by purpose (train, eval, ...).", labels=["purpose"])
            toks = CounterMetricFamily("selfdistill_generated_tokens", "Completion tokens generated, by purpose.", labels=["purpose"])
            for r in q("SELECT purpose, count(*) AS n, coalesce(sum(completion_tokens), 0) AS t FROM generations GROUP BY purpose"):
                gens.add_metric([r["purpose"]], r["n"])
                toks.add_metric([r["purpose"]], r["t"])
            yield gens
            yield toks

            data = CounterMetricFamily("selfdistill_training_rows", "Pairs and SFT examples stored, by kind and signal source.",
                                       labels=["kind", "source"])
            for kind, table in (("pair", "pairs"), ("sft", "sft_examples")):
                for r in q(f"SELECT source, count(*) AS n FROM {table} GROUP BY source"):
                    data.add_metric([kind, r["source"]], r["n"])
            yield data

            runs = CounterMetricFamily("selfdistill_training_runs", "Training child runs, by outcome.", labels=["status"])
            for r in q("SELECT status, count(*) AS n FROM training_runs GROUP BY status"):
                runs.add_metric([r["status"]], r["n"])
            yield runs

            ev_kinds = CounterMetricFamily("selfdistill_events", "Stored events by kind (promote, rollback, teacher_unavailable, ...).",
                                           labels=["kind", "level"])
            for r in q("SELECT kind, level, count(*) AS n FROM events GROUP BY kind, level"):
                ev_kinds.add_metric([r["kind"], r["level"]], r["n"])
            yield ev_kinds

            judges = GaugeMetricFamily("selfdistill_judge_healthy", "1 when a judge's latest health check passed.", labels=["judge"])
            for r in q("SELECT judge, healthy FROM judge_health WHERE id IN (SELECT max(id) FROM judge_health GROUP BY judge)"):
                judges.add_metric([r["judge"]], r["healthy"])
            yield judges

            tasks = GaugeMetricFamily("selfdistill_tasks", "Tasks in the store, by split.", labels=["split"])
            for split, n in store.count_tasks().items():
                tasks.add_metric([split], n)
            yield tasks
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
