"""The Prometheus endpoint: prometheus_client's real HTTP server on loopback, reading a real store."""

from __future__ import annotations

import socket

import pytest
from sd_testutil import scrape_metrics as _scrape

from selfdistill.config import parse_policy
from selfdistill.errors import PolicyError
from selfdistill.prometheus import MetricsServer
from selfdistill.records import PairRecord, TaskIn
from selfdistill.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store.create(tmp_path / "selfdistill.db")
    s.ensure_base_checkpoint()
    yield s
    s.close()


def fill(store: Store) -> int:
    """A row in every table the endpoint reads: a round that failed (its training run failed, the
    teacher was unavailable), then one running its generate phase, whose id it returns."""
    failed = store.create_round("base")
    store.finish_training_run(store.start_training_run(failed, 1, {}), "failed", {}, "out of memory")
    store.event("teacher_unavailable", f"round {failed}: teacher down", level="warning", round_id=failed)
    store.update_round(failed, status="failed", decision="fail", finished_at=1700000000.0)

    store.add_tasks([TaskIn(source="t", prompt=f"q{i}", answer=str(i)) for i in range(10)], heldout_fraction=0.3)
    tid = store.tasks(split="train")[0].id
    rid = store.create_round("base")
    store.record_phase(rid, "sample", 0.0, {}, "generate")
    gids = store.add_generations([{"round_id": rid, "task_id": tid, "checkpoint_id": "base", "purpose": "train",
                                   "sample_index": i, "prompt": "q", "text": "a", "completion_tokens": 7} for i in range(3)])
    store.add_training_data(rid, [PairRecord(task_id=tid, prompt="q", chosen="a", rejected="b", margin=1.0, weight=1.0,
                                             source="verifier", chosen_gen_id=gids[0], rejected_gen_id=gids[1])], [])
    store.add_evaluation("base", "heldout", {"accuracy": 0.25, "n": 4}, [])
    store.add_judge_health("self", False, 0.4, 0.1, 1, {})
    store.add_teacher_usage(rid, "t", "label", "generate", 3, 30, 9, 0.1)
    store.add_teacher_usage(rid, "t", "label", "generate", 1, 10, 3, 0.1)
    return rid


def test_metrics_follow_the_store_between_scrapes(store):
    server = MetricsServer(store.path, "svc", "127.0.0.1", 0)
    try:
        m = _scrape(server.url)
        assert m[("selfdistill_info", (("current_checkpoint", "base"), ("name", "svc")))] == 1
        assert m[("selfdistill_round", ())] == 0
        assert ("selfdistill_generations_total", (("purpose", "train"),)) not in m

        rid = fill(store)

        m = _scrape(server.url)
        assert m[("selfdistill_round", ())] == rid
        assert m[("selfdistill_round_phase", (("phase", "generate"),))] == 1
        assert m[("selfdistill_round_phase", (("phase", "sample"),))] == 0
        assert m[("selfdistill_rounds_total", (("decision", ""),))] == 1
        assert m[("selfdistill_rounds_total", (("decision", "fail"),))] == 1
        assert m[("selfdistill_last_round_finished_timestamp_seconds", ())] == 1700000000.0
        assert m[("selfdistill_training_runs_total", (("status", "failed"),))] == 1
        assert m[("selfdistill_events_total", (("kind", "teacher_unavailable"), ("level", "warning")))] == 1
        assert m[("selfdistill_generations_total", (("purpose", "train"),))] == 3
        assert m[("selfdistill_generated_tokens_total", (("purpose", "train"),))] == 21
        assert m[("selfdistill_training_rows_total", (("kind", "pair"), ("source", "verifier")))] == 1
        assert m[("selfdistill_phase_seconds_count", (("phase", "sample"),))] == 1
        assert m[("selfdistill_heldout_accuracy", (("checkpoint", "base"),))] == 0.25
        assert m[("selfdistill_judge_healthy", (("judge", "self"),))] == 0
        assert m[("selfdistill_teacher_tokens_total", (("purpose", "label"),))] == 52
        assert m[("selfdistill_teacher_requests_total", (("purpose", "label"),))] == 4
        assert sum(v for (name, _), v in m.items() if name == "selfdistill_tasks") == 10
        free, size = m[("selfdistill_state_disk_free_bytes", ())], m[("selfdistill_state_disk_size_bytes", ())]
        assert 0 < free <= size
    finally:
        server.close()


def test_a_busy_port_is_one_line_naming_the_key(store):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(PolicyError) as e:
            MetricsServer(store.path, "svc", "127.0.0.1", port)
    msg = str(e.value)
    assert "\n" not in msg and f"127.0.0.1:{port}" in msg and "monitoring.prometheus_port" in msg


@pytest.mark.parametrize("port,ok", [(None, True), (0, True), (9464, True), (-1, False), (70000, False)])
def test_the_port_is_checked_by_the_policy(port, ok):
    doc = {"tasks": {"sources": [{"type": "jsonl", "path": "t.jsonl"}]}}
    if port is not None:
        doc["monitoring"] = {"prometheus_port": port}
    if ok:
        assert parse_policy(doc).monitoring.prometheus_port == port
    else:
        with pytest.raises(PolicyError, match="monitoring.prometheus_port"):
            parse_policy(doc)
