"""The Metrics screen's Table 1 view: SD vs SD+TI with the difference, editability per prompt as
the user wrote it, and the curve over checkpoints; and which Table 1 and reports the screen shows
(the disk's, with what finished jobs returned laid over)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable

from engine.store.records import eval_label, report_of_result, written_prompt
from tistudio.formatting import escape
from tistudio.widgets.charts import CurveChart
from tistudio.widgets.study import num, signed


class Table1View(Horizontal):
    def compose(self) -> ComposeResult:
        with Vertical(id="metrics-tables"):
            table1 = DataTable(id="table1", cursor_type="row", zebra_stripes=False)
            table1.border_title = "Table 1"
            yield table1
            detail = DataTable(id="per-prompt", cursor_type="row", zebra_stripes=True)
            detail.border_title = "Editability per prompt"
            yield detail
        yield CurveChart(id="curve")

    def on_mount(self) -> None:
        t1 = self.query_one("#table1", DataTable)
        t1.add_column("Model", key="model")
        t1.add_column("Reconstruction", key="rec")
        t1.add_column("Editability", key="edit")
        t1.add_column("Edit./image", key="edit_img")
        pp = self.query_one("#per-prompt", DataTable)
        pp.add_column("Prompt", key="prompt")
        pp.add_column("SD", key="sd")
        pp.add_column("SD+TI", key="ti")
        pp.add_column("Δ", key="diff")

    def show(self, name: str | None, table: dict | None, run: str | None, step: int | None,
             token: str | None = None) -> None:
        """Table 1 of the picked word (`table`), or a line saying how to make one."""
        t1 = self.query_one("#table1", DataTable)
        pp = self.query_one("#per-prompt", DataTable)
        t1.clear()
        pp.clear()
        if not table:  # Table 1's border says which evaluation it shows, or how to make one
            pick = f"{name}@{run}" + (f":{step}" if step is not None else "") if run else None
            t1.border_subtitle = (f"no evaluation of {pick} yet: press e to evaluate it" if pick else
                                  "no evaluation yet: press e to evaluate" if name else "no concept: create one on 1")
            return
        rows = {r.get("model"): r for r in table.get("rows", []) if isinstance(r, dict)}
        sd, ti = rows.get("SD", {}), rows.get("SD+TI", {})
        for label, row in (("SD", sd), ("SD+TI", ti)):
            t1.add_row(label, num(row.get("reconstruction")), num(row.get("editability")),
                       num(row.get("editability_per_image")), key=label)
        t1.add_row("Δ (TI − SD)", _diff(sd.get("reconstruction"), ti.get("reconstruction")),
                   _diff(sd.get("editability"), ti.get("editability")),
                   _diff(sd.get("editability_per_image"), ti.get("editability_per_image")), key="diff")
        for i, p in enumerate(table.get("per_prompt", [])):
            if not isinstance(p, dict):
                continue
            a = (p.get("SD") or {}).get("editability")
            b = (p.get("SD+TI") or {}).get("editability")
            pp.add_row(written_prompt(p, token) or f"prompt {i + 1}", num(a), num(b), _diff(a, b), key=str(i))
        t1.border_subtitle = (escape(eval_label(table)) + f" · {table.get('images_per_set', '?')} images/set"
                              + (f" · CLIP {escape(_clip_name(table))}" if _clip_name(table) else ""))

    def set_curve(self, points: list[dict], note: str = "") -> None:
        chart = self.query_one("#curve", CurveChart)
        chart.set_points(points)
        chart.border_subtitle = note


def with_job_results(tables: list[dict], reports: list, jobs: list[dict]) -> tuple[list[dict], list]:
    """Add what finished jobs returned that the disk does not hold (yet, or any more)."""
    dirs = {str(t.get("dir")) for t in tables}
    ids = {r.id for r in reports}
    for job in jobs:
        result = job.get("result") if isinstance(job.get("result"), dict) else {}
        if job.get("kind") == "eval" and isinstance(result.get("table"), dict):
            table = {"dir": result.get("report_dir"), **result["table"]}
            if str(table.get("dir")) not in dirs:
                tables.append(table)
        elif job.get("kind") == "experiment":
            report = report_of_result(result)
            if report is not None and report.id not in ids:
                reports.append(report)
                ids.add(report.id)
    return tables, reports

def table_for(tables: list[dict], run: str | None, step: int | None) -> dict | None:
    """The newest Table 1 of the picked word (any, for the latest run)."""
    if run is None:
        return tables[-1] if tables else None
    for table in reversed(tables):
        final = table.get("final", True)
        if table.get("run") == run and ((step is None and final) or (step is not None and not final
                                                                      and table.get("step") == step)):
            return table
    return None


def _diff(a, b) -> str:
    return signed(b - a) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "–"


def _clip_name(table: dict) -> str | None:
    clip = table.get("clip")
    return clip.get("name") if isinstance(clip, dict) else clip
