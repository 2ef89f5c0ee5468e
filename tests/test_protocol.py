"""The wire protocol on its own: every message survives encode/decode, and bad lines are refused."""

from __future__ import annotations

import dataclasses

import pytest

from engine.wire import protocol
from engine.wire.protocol import ProtocolError, decode, encode

JOB = protocol.JobSpec("20260101-000000-ab12", "/home/x/jobs/20260101-000000-ab12", "train", "cat",
                       {"steps": 10, "lr": 5e-4}, resumed=True, attempts=2)
GROUP = protocol.SweepGroup(1, 3, ["20260101-000000-m002", "20260101-000000-m003"])
GROUPED_JOB = protocol.JobSpec("20260101-000000-ab12", "/home/x/jobs/20260101-000000-ab12", "sweep", "cat",
                               {"seeds": [1, 2, 3, 4]}, group=GROUP)
STATUS_EVENT = {"seq": 3, "t": 1.5, "type": "status", "status": "running"}
WORKER = {"worker": 1, "device": "cuda:1", "backend": "local", "node": None, "pid": 14, "state": "running",
          "job": "a", "kind": "train", "concept": "cat", "members": None, "step": 3, "steps": 10,
          "steps_per_s": 9.5, "name": "NVIDIA H200", "source": "nvidia-smi",
          "memory": {"vram_total": 8 * 2**30, "vram_allocated": 2**30, "rss": 2**29}}

# One example of every message, with every field set away from its default where it has one.
EXAMPLES = [
    protocol.Ping(),
    protocol.Status(device=False),
    protocol.Submit(kind="train", concept="cat", params={"steps": 10}),
    protocol.Submit(resume="20260101-000000-ab12", params={"steps": 20}),
    protocol.Cancel("20260101-000000-ab12"),
    protocol.Jobs(),
    protocol.Subscribe("20260101-000000-ab12", after_seq=7, follow=False),
    protocol.Stop(force=True),
    protocol.ErrorAnswer("no run 'x'", user=True),
    protocol.PingAnswer(pid=12, version="0.1.0+abc", protocol=1),
    protocol.StatusAnswer(
        pid=12, version="0.1.0+abc", home="/home/x", started=1.0, uptime=2.5, queue=1, queued=["b"],
        running={"id": "a", "status": "running", "step": 3}, worker_pid=13, device={"device": "cpu"},
        clients=2, idle_seconds=1800.0, environment={"CUDA_VISIBLE_DEVICES": "0"},
        storage={"writable": False, "error": "disk full", "unsaved": ["a"]}, workers=[WORKER],
        backend={"kind": "local", "devices": ["cuda:0", "cuda:1"]}),
    protocol.SubmitAnswer("a", "/home/x/jobs/a", 2),
    protocol.CancelAnswer("cancelling"),
    protocol.JobsAnswer([{"id": "a", "status": "done"}], ["b"], "c", storage={"writable": True},
                        running_jobs=["c", "d"]),
    protocol.StopAnswer(),
    protocol.EventBatch([STATUS_EVENT, {"seq": 4, "t": 2.0, "type": "step", "step": 1, "loss": 0.5}]),
    protocol.StreamEnd("failed", reason="boom", unsaved="the disk is full"),
    JOB,
    GROUP,
    protocol.RunJob(JOB),
    protocol.RunJob(GROUPED_JOB),
    protocol.CancelJob("a"),
    protocol.ProbeDevice(),
    protocol.Hello(pid=99),
    protocol.Event("a", STATUS_EVENT),
    protocol.Progress("a", step=3, steps=10, fields={"embedding": "/x.safetensors", "members": ["m1"]}),
    protocol.Finished("a", "failed", error="boom", unsaved="no space left"),
    protocol.DeviceReport({"device": "cuda:0", "vram_total": 8 * 2**30}),
]


def _message_classes(base=protocol.Message) -> set[type]:
    found = set()
    for cls in base.__subclasses__():
        found |= {cls} | _message_classes(cls)
    return found


def test_every_message_type_has_an_example():
    assert {type(m) for m in EXAMPLES} == {c for c in _message_classes() if c.__module__ == "engine.wire.protocol"}


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one line, whatever the payload
    again = type(message).from_wire(decode(line))
    assert again == message
    if message.TAG:  # a tagged message is found from the line alone, by its conversation's parser
        assert _parser(message)(decode(line)) == message


def _parser(message):
    if type(message) in protocol.REQUESTS.values():
        return protocol.parse_request
    if type(message) in protocol.WORKER_COMMANDS.values():
        return protocol.parse_worker_command
    return protocol.parse_worker_message


def test_defaults_fill_missing_optional_fields_and_unknown_fields_are_ignored():
    assert protocol.parse_request({"op": "subscribe", "run_id": "a"}) == protocol.Subscribe("a", 0, True)
    assert protocol.parse_request({"op": "ping", "from_the_future": 1}) == protocol.Ping()
    progress = protocol.parse_worker_message({"msg": "progress", "run_id": "a", "model": {"spec": "x"}})
    assert progress == protocol.Progress("a", None, None, {"model": {"spec": "x"}})


@pytest.mark.parametrize("line, match", [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", "JSON object"),
    (b'{"op": "launch"}\n', "unknown op"),
    (b'{"op": "cancel"}\n', "missing field 'run_id'"),
    (b'{"op": "subscribe", "run_id": "a", "after_seq": "7"}\n', "after_seq"),
    (b'{"op": "stop", "force": 1}\n', "force"),
    (b'{"op": "submit", "params": [1]}\n', "params"),
])
def test_malformed_requests_are_refused_with_a_reason(line, match):
    with pytest.raises(ProtocolError, match=match):
        protocol.parse_request(decode(line))


def test_nested_and_worker_messages_are_checked():
    with pytest.raises(ProtocolError, match="JobSpec: missing field 'kind'"):
        protocol.parse_worker_command({"op": "run", "job": {"run_id": "a", "run_dir": "/x"}})
    with pytest.raises(ProtocolError, match="unknown msg 'shout'"):
        protocol.parse_worker_message({"msg": "shout"})
    with pytest.raises(ProtocolError, match="expected msg='hello'"):
        protocol.Hello.from_wire({"msg": "event", "pid": 3})
    with pytest.raises(ProtocolError, match="pid"):
        protocol.Hello.from_wire({"msg": "hello", "pid": True})  # a bool is not a pid
    job = {"run_id": "a", "run_dir": "/x", "kind": "sweep"}
    assert protocol.JobSpec.from_wire({**job, "group": None}).group is None  # an optional message may be null
    with pytest.raises(ProtocolError, match="SweepGroup: missing field 'count'"):
        protocol.JobSpec.from_wire({**job, "group": {"index": 1}})


def test_messages_are_immutable_values():
    with pytest.raises(dataclasses.FrozenInstanceError):
        protocol.Cancel("a").run_id = "b"


def test_paths_live_in_the_engine_folder(tmp_path):
    for path in (protocol.socket_path(tmp_path), protocol.pid_path(tmp_path), protocol.log_path(tmp_path),
                 protocol.lock_path(tmp_path)):
        assert path.parent == protocol.engine_dir(tmp_path) == tmp_path / "engine"
    deep = tmp_path / ("d" * 120) / "engine.sock"
    deep.parent.mkdir()
    with protocol.socket_address(deep) as address:
        assert len(address) < 108 and address.endswith("/engine.sock")
