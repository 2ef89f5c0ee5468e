"""TensorBoard logs of a run (the `tensorboard` extra): `tistudio runs export RUN --tensorboard DIR`
and `--tensorboard` on the commands that follow a run, read back with TensorBoard's own reader
(EventAccumulator), not ours."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.store.events import EventLog, events_path
from engine.store.paths import atomic_write_json, home_dir
from engine.store.runs import create_run
from engine.store.tensorboard import LiveBoard
from tistudio.cli import main


def board(folder: Path) -> EventAccumulator:
    """TensorBoard's reader over one run's folder, everything kept (no sampling)."""
    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    return reader


def scalars(reader: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(s.step, s.value) for s in reader.Scalars(tag)]


def f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard keeps a scalar as a float32


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def step(n: int, loss: float, **extra) -> dict:
    return {"type": "step", "step": n, "steps": 30, "loss": loss, "lr": 1e-3 * n, "norm": 0.5 + n / 100,
            "cos_init": 1 - n / 100, "norms": [0.5 + n / 100], "cos_inits": [1 - n / 100], "steps_per_s": 3.0,
            **extra}


def make_run(events: list[dict], concept: str | None = None, **record) -> str:
    """A run as the engine leaves it (run.json and events.jsonl), under a fresh home."""
    home = home_dir()
    run_dir = create_run(home, {"kind": record.pop("kind", "train"), "concept": concept, "params": {}})
    log = EventLog(events_path(run_dir))
    for event in events:
        log.append(event)
    log.close()
    if record:
        atomic_write_json(run_dir / "run.json", {**json.loads((run_dir / "run.json").read_text()), **record})
    return run_dir.name


def preview(tmp_path: Path, step_: int, colour) -> dict:
    path = tmp_path / f"step-{step_}.png"
    path.write_bytes(png(colour))
    return {"type": "preview", "step": step_, "path": str(path), "prompt": "a photo of <t>"}


def history(tmp_path):
    """A run interrupted after step 30, resumed from its step-10 checkpoint: steps 20 and 30 are
    logged twice, and the resumed values are the run's."""
    return [
        {"type": "train", "step": 0, "steps": 30, "family": "sd1"},
        step(10, 0.5), preview(tmp_path, 10, (255, 0, 0)), step(20, 0.4), step(30, 0.3),
        {"type": "status", "status": "interrupted"},
        step(20, 0.25, reg=0.01), step(30, 0.2, reg=0.02), preview(tmp_path, 30, (0, 255, 0)),
        {"type": "probe", "step": 30, "reconstruction": 0.71, "editability": 0.64, "seconds": 1.5},
        {"type": "status", "status": "done"},
    ]


def test_export_writes_loss_lr_vector_probes_and_previews_that_tensorboard_reads(tmp_path, capsys):
    run_id = make_run(history(tmp_path))
    out = tmp_path / "tb"
    assert main(["runs", "export", run_id, "--tensorboard", str(out)]) == 0, capsys.readouterr().err
    reader = board(out / run_id)
    assert scalars(reader, "train/loss") == [(10, f32(0.5)), (20, f32(0.25)), (30, f32(0.2))]
    assert scalars(reader, "train/lr") == [(10, f32(0.01)), (20, f32(0.02)), (30, f32(0.03))]
    assert scalars(reader, "train/reg") == [(20, f32(0.01)), (30, f32(0.02))]
    assert scalars(reader, "vector/norm") == [(10, f32(0.6)), (20, f32(0.7)), (30, f32(0.8))]
    assert scalars(reader, "vector/cos_init") == [(10, f32(0.9)), (20, f32(0.8)), (30, f32(0.7))]
    assert scalars(reader, "probe/reconstruction") == [(30, f32(0.71))]
    assert scalars(reader, "probe/editability") == [(30, f32(0.64))]
    images = reader.Images("preview")
    assert [(i.step, i.width, i.height) for i in images] == [(10, 24, 16), (30, 24, 16)]
    assert images[1].encoded_image_string == png((0, 255, 0))
    assert "steps_per_s" not in str(reader.Tags()["scalars"])  # only the figures named above

    # again: the folder's earlier event file is replaced, not added to (TensorBoard would show both)
    assert main(["runs", "export", run_id, "--tensorboard", str(out)]) == 0
    assert len(list((out / run_id).glob("*tfevents*"))) == 1
    assert [p.name for p in out.iterdir()] == [run_id]  # no staging folder left behind
    assert len(board(out / run_id).Scalars("train/loss")) == 3


def test_a_moved_data_directory_still_finds_its_previews(tmp_path, capsys):
    """A preview's recorded path is where the run was written (another mount, another node)."""
    run_id = make_run([step(10, 0.5), {"type": "preview", "step": 10, "path": "/elsewhere/previews/step-10.png"}])
    (home_dir() / "jobs" / run_id / "previews").mkdir()
    (home_dir() / "jobs" / run_id / "previews" / "step-10.png").write_bytes(png((0, 0, 255)))
    assert main(["runs", "export", run_id, "--tensorboard", str(tmp_path / "tb")]) == 0, capsys.readouterr().err
    [image] = board(tmp_path / "tb" / run_id).Images("preview")
    assert image.encoded_image_string == png((0, 0, 255))


def test_sdxl_runs_log_both_text_encoders(tmp_path, capsys):
    event = {**step(10, 0.5), "norms": [0.6, 1.6], "cos_inits": [0.9, 0.95]}
    run_id = make_run([event])
    assert main(["runs", "export", run_id, "--tensorboard", str(tmp_path / "tb")]) == 0, capsys.readouterr().err
    reader = board(tmp_path / "tb" / run_id)
    assert scalars(reader, "vector/norm") == [(10, f32(0.6))] and scalars(reader, "vector/norm_2") == [(10, f32(1.6))]
    assert scalars(reader, "vector/cos_init_2") == [(10, f32(0.95))]


def test_a_sweep_exports_one_folder_per_member(tmp_path, capsys):
    members = [make_run([step(5, 0.9 - k / 10)]) for k in range(2)]
    sweep = make_run([step(5, 0.9, run=members[0])], kind="sweep", members=members)
    assert main(["runs", "export", sweep, "--tensorboard", str(tmp_path / "tb")]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == sorted(members)
    assert [scalars(board(tmp_path / "tb" / m), "train/loss") for m in members] == [[(5, f32(0.9))], [(5, f32(0.8))]]


def test_a_run_without_steps_an_unknown_run_and_a_file_are_one_line_each(tmp_path, capsys):
    generate = make_run([{"type": "image", "path": "x.png"}], kind="generate")
    trained = make_run([step(5, 0.9)])
    afile = tmp_path / "afile"
    afile.write_text("mine")
    for argv, needle in ((["runs", "export", generate, "--tensorboard", str(tmp_path / "tb")], "no training steps"),
                         (["runs", "export", "nope", "--tensorboard", str(tmp_path / "tb")], "no run 'nope'"),
                         (["runs", "export", trained, "--tensorboard", str(afile)], "a file, not a folder")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "tb").exists() and afile.read_text() == "mine"


def test_without_the_package_each_option_says_how_to_install_it(tmp_path, capsys, monkeypatch, image_dir):
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)  # import fails
    run_id = make_run([step(5, 0.9)])
    assert main(["concept", "add", "toy", "--images", str(image_dir), "--init", "cat"]) == 0
    capsys.readouterr()
    for argv in (["runs", "export", run_id, "--tensorboard", str(tmp_path / "tb")],
                 ["train", "toy", "--steps", "2", "--tensorboard", str(tmp_path / "tb")],
                 ["attach", run_id, "--tensorboard", str(tmp_path / "tb")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install 'tistudio[tensorboard]'" in err, err
    assert not (tmp_path / "tb").exists()
    assert not list(home_dir().glob("concepts/toy/runs/*"))  # train submitted nothing


def test_detach_with_tensorboard_says_what_writes_them_instead(tmp_path, capsys, image_dir):
    assert main(["concept", "add", "toy", "--images", str(image_dir), "--init", "cat"]) == 0
    capsys.readouterr()
    assert main(["train", "toy", "--steps", "2", "--detach", "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tistudio attach RUN --tensorboard DIR" in err and "runs export" in err
    assert not list(home_dir().glob("concepts/toy/runs/*")) and not (tmp_path / "tb").exists()


class StreamingClient:
    """The engine's client as the follower sees it: the run's events one at a time, and after each
    a look at what TensorBoard already reads."""

    def __init__(self, events: list[dict], look):
        self.logged, self.look = events, look

    async def connect(self):
        pass

    async def close(self):
        pass

    async def events(self, run_id, after_seq=0):
        for event in self.logged:
            yield event
            self.look(event)


def test_train_tensorboard_writes_live_as_the_events_arrive(tmp_path, monkeypatch, capsys):
    """The follower of `tistudio train --tensorboard DIR` (and resume, attach): each step is in
    TensorBoard's reader once it has streamed by; when the run has ended, the folder holds the
    whole run, each step once."""
    import engine.wire.client as client_module
    from tistudio.commands import run_cmds, train_cmds

    run_id = make_run(history(tmp_path), status="done")
    logged = EventLog(events_path(home_dir() / "jobs" / run_id)).read()
    out = tmp_path / "tb"
    boards, seen_live = [], []

    def look(event):
        if event.get("type") == "step":
            boards[0].flush()
            seen_live.append(scalars(board(out / run_id), "train/loss")[-1])

    def recorded_board(folder, run):
        boards.append(LiveBoard(folder, run, home_dir()))
        return boards[-1]

    monkeypatch.setattr(client_module, "EngineClient", lambda: StreamingClient(logged, look))
    monkeypatch.setattr(run_cmds, "_board", recorded_board)
    assert train_cmds.after_submit(run_id, detach=False, tensorboard=str(out)) == 0, capsys.readouterr().err
    # as streamed: the steps the resumed run logs again arrive again
    assert seen_live == [(10, f32(0.5)), (20, f32(0.4)), (30, f32(0.3)), (20, f32(0.25)), (30, f32(0.2))]
    reader = board(out / run_id)
    assert scalars(reader, "train/loss") == [(10, f32(0.5)), (20, f32(0.25)), (30, f32(0.2))]
    assert [i.step for i in reader.Images("preview")] == [10, 30]
    assert len(list((out / run_id).glob("*tfevents*"))) == 1
