"""`?`: the keys of every screen, where settings live, what the image protocol is."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Markdown

HELP = """\
**Anywhere** (when no text field has the focus; **Esc** leaves a field)

| key | does |
| --- | --- |
| 1 2 3 4 5 | Library, Train, Generate, Metrics, Gallery |
| ? | this help |
| ctrl+p | command palette: every action, themes, image protocol |
| q | quit (runs keep going in the engine) |
| tab / shift+tab | move between fields |

**1 Library**: n new concept · i import an embedding · x export (diffusers,
A1111, kohya, ComfyUI) · r rename · d delete · e add or remove its training
images · t train the selected concept · g generate with it · m its metrics ·
v inspect its word (norms against the vocabulary, cosine to the initializer,
nearest tokens, its runs compared; shown in the concept's panel)

**2 Train**: s start a run with the form's settings · r resume the selected
run · c cancel it · enter on a run shows its history · f edit the form ·
l low VRAM on/off (for cards with little memory: about half the speed) ·
Regularize keeps the word editable (init-l2, norm, directional).  Beside
the loss: the vector's norm (the grey line: the vocabulary's median) and
its cosine to the initializer; under 90 columns v flips it with the preview

**3 Generate**: p edit the prompt (→ accepts the suggested concept token) ·
enter or g generates · SD on the left, SD+TI on the right · below the prompt:
the negative prompt, size, sampler, batch size and Use: NAME@RUN:STEP pins a
concept to a saved embedding (→ completes them; empty: its latest)

**4 Metrics** (the whole study): Run picks the word (NAME@RUN:STEP, or
the latest finished run) · e evaluate it (Table 1, each prompt as written)
· x the steps experiment (the curve over checkpoints) · i initializer words
· s seeds · r regularisers (Table 1 for each method) · y synthesis batches
(the word in new scenes or styles) · v next view: Table 1, Compare (any two
evaluations with Δ), Study (every experiment's table and grid) · c concept
· p run

**5 Gallery**: every generated, evaluation and experiment image (and the
grids), newest first, with the record it was saved with (prompt, seed,
sampler, model, the words it used) · c, r, k filter by concept, run, kind ·
u refresh

Closing the studio never stops a run: the engine keeps it going, and the
studio shows its whole history when it opens again.
"""


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape", "close", "Close"), Binding("question_mark", "close", "Close", show=False),
                Binding("q", "close", "Close", show=False)]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; background: $background 60%; }
    HelpScreen > #help { width: 84; max-width: 100%; height: 100%; max-height: 40; border: round $primary;
                         background: $surface; padding: 0 1; }
    HelpScreen #help-title { text-style: bold; color: $primary; height: 1; }
    HelpScreen #help-info { color: $text-muted; height: auto; }
    """

    def compose(self) -> ComposeResult:
        app = self.app
        info = []
        if hasattr(app, "describe_settings"):
            info = app.describe_settings()
        with Vertical(id="help"):
            yield Label("tistudio — help (Esc closes)", id="help-title")
            with VerticalScroll():
                yield Markdown(HELP)
                yield Label("\n".join(info), id="help-info", markup=False)

    def action_close(self) -> None:
        self.dismiss(None)
