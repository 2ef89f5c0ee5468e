"""Modal dialogs: confirm, one text value, new concept, a concept's images, import, export, error details.

Each fits an 80×24 terminal (one-line compact fields) and answers through
`dismiss(result)`; Escape cancels (result None / False).  A dialog with several
answers returns a dataclass (ImportRequest, ExportRequest, ImagesEdited).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, SelectionList, Static

from tistudio.messages import StudioChange, TokenizerReady
from tistudio.widgets.forms import FieldRow, PathSuggester, split_list

ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class NewConceptForm:
    """The New concept dialog's fields, checked for presence (the library checks the rest)."""

    name: str
    folder: Path
    init: str
    property: str
    description: str | None
    masks: Path | None = None  # a folder of loss masks named as the images (optional)


@dataclass(frozen=True)
class ImportRequest:
    """Import `file` as a concept; empty name/token: the file's own (or the default)."""

    file: Path
    name: str = ""
    token: str = ""
    style: bool = False

    def cli_args(self) -> list[str]:
        """The arguments of `tistudio import` that carry it out."""
        args = [str(self.file), "--json"]
        if self.name:
            args += ["--name", self.name]
        if self.token:
            args += ["--token", self.token]
        if self.style:
            args.append("--style")
        return args


@dataclass(frozen=True)
class ExportRequest:
    """Write run `run`'s embedding (at `step`, None: the final one) to `out` in `format`."""

    out: Path
    format: str
    run: str
    step: int | None = None

    def cli_args(self, concept: str) -> list[str]:
        """The arguments of `tistudio export` that carry it out for `concept`."""
        args = [concept, "--out", str(self.out), "--format", self.format, "--run", self.run]
        if self.step is not None:
            args += ["--step", str(self.step)]
        return args


@dataclass(frozen=True)
class ImagesEdited:
    """What the Images dialog changed: the files it stored, the ones it removed, the images
    whose caption it changed."""

    added: tuple[Path, ...] = ()
    removed: tuple[Path, ...] = ()
    captioned: tuple[str, ...] = ()


class _Dialog(ModalScreen[ResultT]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    DEFAULT_CSS = """
    _Dialog { align: center middle; background: $background 60%; }
    _Dialog > #dialog { width: 72; max-width: 100%; height: auto; max-height: 100%; border: round $primary;
                        background: $surface; padding: 0 1; }
    _Dialog #dialog-title { text-style: bold; color: $primary; width: 100%; height: 1; margin-bottom: 1; }
    _Dialog .dialog-text { width: 100%; height: auto; margin-bottom: 1; }
    _Dialog .dialog-hint { width: 100%; height: auto; color: $text-muted; }
    _Dialog .dialog-error { width: 100%; height: auto; color: $error; }
    _Dialog .dialog-ok { width: 100%; height: auto; color: $success; }
    _Dialog #dialog-buttons { height: auto; width: 100%; align-horizontal: right; margin-top: 1; }
    _Dialog #dialog-buttons Button { margin-left: 2; }
    _Dialog VerticalScroll { height: auto; max-height: 16; }
    _Dialog SelectionList { height: auto; max-height: 10; }
    """
    cancel_result: object = None

    def action_cancel(self) -> None:
        self.dismiss(self.cancel_result)

    def buttons(self, ok: str, variant: str = "primary") -> Horizontal:
        return Horizontal(Button(ok, variant=variant, id="ok", compact=True),
                          Button("Cancel", id="cancel", compact=True), id="dialog-buttons")

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()


class ConfirmModal(_Dialog[bool]):
    """Yes or no; `dismiss(True)` only on the confirm button."""

    cancel_result = False

    def __init__(self, title: str, message: str, confirm: str = "OK", danger: bool = False):
        super().__init__()
        self._title, self._message, self._confirm, self._danger = title, message, confirm, danger

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._title, id="dialog-title")
            yield Static(self._message, classes="dialog-text", markup=False)
            yield self.buttons(self._confirm, "error" if self._danger else "primary")

    def on_mount(self) -> None:
        self.query_one("#cancel" if self._danger else "#ok").focus()

    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        self.dismiss(True)


class MessageModal(_Dialog[None]):
    """Details of an error that does not fit a notification (e.g. the engine's log tail)."""

    def __init__(self, title: str, message: str):
        super().__init__()
        self._title, self._message = title, message

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._title, id="dialog-title")
            with VerticalScroll():
                yield Static(self._message, classes="dialog-text", markup=False)
            yield Horizontal(Button("Close", id="cancel", variant="primary", compact=True), id="dialog-buttons")

    def on_mount(self) -> None:
        self.query_one("#cancel").focus()


class TextModal(_Dialog[str | None]):
    """One text value (rename): `dismiss(str)`; `check(value)` may return an error to show."""

    def __init__(self, title: str, label: str, value: str = "", ok: str = "OK", check=None, hint: str = "",
                 suggester=None):
        super().__init__()
        self._title, self._label, self._value, self._ok_label, self._check, self._hint = (
            title, label, value, ok, check, hint)
        self._suggester = suggester

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self._title, id="dialog-title")
            yield FieldRow(self._label, Input(self._value, id="value", compact=True, suggester=self._suggester))
            yield Static(self._hint, classes="dialog-hint", id="hint")
            yield Static("", classes="dialog-error", id="error")
            yield self.buttons(self._ok_label)

    def on_mount(self) -> None:
        self.query_one("#value", Input).focus()

    @on(Input.Submitted, "#value")
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        value = self.query_one("#value", Input).value.strip()
        problem = self._check(value) if self._check else None
        if problem:
            self.query_one("#error", Static).update(problem)
            return
        self.dismiss(value)


class NewConceptModal(_Dialog[str | None]):
    """Create a concept: name, image folder, initializer (checked live as one token), type, description,
    and an optional folder of loss masks (as `concept add --masks`; captions beside the images are
    always read).

    Dismisses with the new concept's name once the library has it."""

    def __init__(self, library, folder: str = ""):
        super().__init__()
        self.library = library  # tistudio.library_service.LibraryService: the one that writes
        self._folder = folder

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("New concept", id="dialog-title")
            yield FieldRow("Name", Input(placeholder="e.g. my-cat", id="name", compact=True))
            yield FieldRow("Image folder", Input(self._folder, placeholder="folder with 3-5 images", id="folder",
                                                 compact=True, suggester=PathSuggester(dirs_only=True)))
            yield FieldRow("Initializer", Input(placeholder="one word, e.g. cat", id="init", compact=True))
            yield Static("", classes="dialog-hint", id="init-check")
            yield FieldRow("Type", Select([("object", "object"), ("style", "style")], value="object",
                                         allow_blank=False, id="property", compact=True))
            yield FieldRow("Description", Input(placeholder="words SD uses instead of the token (optional)",
                                                id="description", compact=True))
            yield FieldRow("Masks folder", Input(placeholder="masks named as the images (optional)", id="masks",
                                                 compact=True, suggester=PathSuggester(dirs_only=True)))
            yield Static("The token will be <name>.  Tab moves between fields.", classes="dialog-hint",
                         id="token-hint")
            yield Static("", classes="dialog-error", id="error")
            yield self.buttons("Create")

    def on_mount(self) -> None:
        self.query_one("#name", Input).focus()
        self.app.changed.subscribe(self, self._on_changed)

    def _on_changed(self, change: StudioChange) -> None:
        if isinstance(change, TokenizerReady):
            self._check_init()

    @on(Input.Changed, "#name")
    def _name_changed(self, event: Input.Changed) -> None:
        from engine.store.library import default_token

        name = event.value.strip()
        self.query_one("#token-hint", Static).update(
            f"The token will be {default_token(name)}." if name else "The token will be <name>.")

    @on(Input.Changed, "#init")
    def _init_changed(self) -> None:
        self._check_init()

    def _check_init(self) -> bool:
        """Show whether the initializer is one token; True if it is (or cannot be checked yet)."""
        label = self.query_one("#init-check", Static)
        word = self.query_one("#init", Input).value.strip()
        label.remove_class("dialog-error", "dialog-ok")
        label.add_class("dialog-hint")
        if not word:
            label.update("")
            return False
        tokenizer = getattr(self.app, "tokenizer", None)
        if tokenizer is None:
            label.update("checking… (the tokenizer is loading)")
            return True
        from engine.errors import UserError
        from engine.store.library import check_initializer

        try:
            token_id = check_initializer(tokenizer, word)
        except UserError as exc:
            label.remove_class("dialog-hint")
            label.add_class("dialog-error")
            label.update(f"✗ {exc}")
            return False
        label.remove_class("dialog-hint")
        label.add_class("dialog-ok")
        label.update(f"✓ {word!r} is a single token (id {token_id})")
        return True

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "masks":
            self._create()
        else:
            self.focus_next()

    @on(Button.Pressed, "#ok")
    def _create(self) -> None:
        get = lambda i: self.query_one(f"#{i}", Input).value.strip()  # noqa: E731
        error = self.query_one("#error", Static)
        if not get("name"):
            error.update("Give the concept a name.")
            return
        if not get("folder"):
            error.update("Give the folder that holds the training images.")
            return
        if not get("init"):
            error.update("Give an initializer word (one token, e.g. cat).")
            return
        form = NewConceptForm(get("name"), Path(get("folder")).expanduser(), get("init"),
                              str(self.query_one("#property", Select).value), get("description") or None,
                              Path(get("masks")).expanduser() if get("masks") else None)
        error.update("creating…")
        self.query_one("#ok", Button).disabled = True
        self._add(form)

    @work(thread=True, exclusive=True, group="new-concept")
    def _add(self, form: NewConceptForm) -> None:
        from engine.errors import UserError

        try:
            concept = self.library.add(form.name, form.folder, form.init, property=form.property,
                                       description=form.description, masks=form.masks)
        except (UserError, OSError) as exc:
            self.app.call_from_thread(self._failed, str(exc))
            return
        self.app.call_from_thread(self.dismiss, concept.name)

    def _failed(self, message: str) -> None:
        self.query_one("#error", Static).update(message)
        self.query_one("#ok", Button).disabled = False


class ImagesModal(_Dialog[ImagesEdited | None]):
    """A concept's training images: add files or folders, tick stored ones to remove them, and
    caption them.  The highlighted image shows on the right, with what its mask ignores tinted
    red, and its caption in the Caption field (edits are kept per image until Apply).

    The library decodes every new image before writing any, checks every caption before
    writing one, and removes all ticked images or none; a refusal stays in the dialog.
    Dismisses with `ImagesEdited`."""

    DEFAULT_CSS = """
    ImagesModal #images-row { height: auto; }
    ImagesModal #remove { width: 1fr; }
    ImagesModal #image-preview { width: 18; margin-left: 1; }
    """

    def __init__(self, library, concept: str, images: list[Path]):
        super().__init__()
        self.library, self.concept, self.images = library, concept, images  # library: tistudio.library_service
        self.stored = self._read(library.captions)  # {image name: caption}
        self.masked = self._read(library.masked, set())
        self.edits: dict[str, str] = {}  # captions changed here, by image name
        self.current: str | None = images[0].name if images else None

    def _read(self, what, empty=None):
        try:
            return what(self.concept)
        except (OSError, ValueError):
            return {} if empty is None else empty

    def compose(self) -> ComposeResult:
        from engine.store.images import IMAGE_EXTENSIONS
        from tistudio.widgets.images import ImagePreview

        with Vertical(id="dialog"):
            yield Label(f"Images of {self.concept}", id="dialog-title")
            yield FieldRow("Add", Input(placeholder="image file or folder (more: comma-separated)", id="add",
                                        compact=True, suggester=PathSuggester(suffixes=tuple(IMAGE_EXTENSIONS))))
            yield Static("Tick the images to remove (space); the highlighted one's caption is below:"
                         if self.images else "No training images yet (an imported embedding has none).",
                         classes="dialog-hint")
            with Horizontal(id="images-row"):
                yield SelectionList[str](*[(self._label(p.name), p.name) for p in self.images], id="remove")
                yield ImagePreview(None, "", empty="no image", id="image-preview")
            yield FieldRow("Caption", Input(self.stored.get(self.current or "", ""), id="caption", compact=True,
                                            placeholder="(none: the templates alone)"))
            yield Static("", classes="dialog-error", id="error")
            yield self.buttons("Apply")

    def _label(self, name: str) -> Text:
        """The image's line: its name, whether it has a mask, its caption (as plain text, not markup)."""
        caption = self.edits.get(name, self.stored.get(name, ""))
        return Text(f"{name}{' [mask]' if name in self.masked else ''}  {caption[:40]}".rstrip())

    def on_mount(self) -> None:
        self.query_one("#add", Input).focus()
        self.query_one("#images-row").display = bool(self.images)
        self.query_one("#caption", Input).parent.display = bool(self.images)
        if self.current:
            self._show(self.current)

    @on(SelectionList.SelectionHighlighted, "#remove")
    def _highlighted(self, event: SelectionList.SelectionHighlighted) -> None:
        self.current = event.selection.value
        field = self.query_one("#caption", Input)
        with field.prevent(Input.Changed):
            field.value = self.edits.get(self.current, self.stored.get(self.current, ""))
        self._show(self.current)

    @work(exclusive=True, group="image-preview")
    async def _show(self, name: str) -> None:
        """The image (with its mask over it, when it has one) beside the list."""
        from tistudio.widgets.images import ImagePreview

        image = next(p for p in self.images if p.name == name)
        try:
            shown = self.library.mask_overlay(image) or image
        except OSError:
            shown = image
        await self.query_one("#image-preview", ImagePreview).set_image(shown, "mask over it" if shown != image
                                                                      else "")

    @on(Input.Changed, "#caption")
    def _caption_changed(self, event: Input.Changed) -> None:
        if self.current is None:
            return
        self.edits[self.current] = event.value
        selections = self.query_one("#remove", SelectionList)
        index = next(i for i, p in enumerate(self.images) if p.name == self.current)
        selections.replace_option_prompt_at_index(index, self._label(self.current))

    def _changed_captions(self) -> dict[str, str]:
        return {name: text for name, text in self.edits.items() if text.strip() != self.stored.get(name, "")}

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        add = [Path(p).expanduser() for p in split_list(self.query_one("#add", Input).value)]
        remove = list(self.query_one("#remove", SelectionList).selected)
        captions = self._changed_captions()
        if not add and not remove and not captions:
            self.query_one("#error", Static).update("Nothing to change: give images to add, tick some to remove, "
                                                    "or edit a caption.")
            return
        self.query_one("#error", Static).update("checking the images…" if add else "saving…")
        self.query_one("#ok", Button).disabled = True
        self._apply(add, remove, captions)

    @work(thread=True, exclusive=True, group="images")
    def _apply(self, add: list[Path], remove: list[str], captions: dict[str, str]) -> None:
        from engine.errors import UserError

        try:  # what was added stays (the error counts it); the removal is all or none
            added, removed = self.library.edit_images(self.concept, add, remove, captions)
        except (UserError, OSError) as exc:
            self.app.call_from_thread(self._failed, str(exc))
            return
        self.app.call_from_thread(self.dismiss, ImagesEdited(tuple(added), tuple(removed), tuple(sorted(captions))))

    def _failed(self, message: str) -> None:
        self.query_one("#error", Static).update(message)
        self.query_one("#ok", Button).disabled = False


class ImportModal(_Dialog[ImportRequest | None]):
    """Import an embedding file (diffusers, A1111, kohya, OneTrainer): `dismiss(ImportRequest)`."""

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Import an embedding", id="dialog-title")
            yield FieldRow("File", Input(placeholder="path/to/embedding.safetensors|.pt|.bin", id="file",
                                         compact=True, suggester=PathSuggester(
                                             suffixes=(".safetensors", ".pt", ".bin", ".ckpt"))))
            yield FieldRow("Name", Input(placeholder="(default: from the file)", id="name", compact=True))
            yield FieldRow("Token", Input(placeholder="(default: the file's, else <name>)", id="token",
                                          compact=True))
            yield FieldRow("Type", Select([("object", "object"), ("style", "style")], value="object",
                                         allow_blank=False, id="property", compact=True))
            yield Static("The file is read by `tistudio import` in a separate process.", classes="dialog-hint")
            yield Static("", classes="dialog-error", id="error")
            yield self.buttons("Import")

    def on_mount(self) -> None:
        self.query_one("#file", Input).focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        file = self.query_one("#file", Input).value.strip()
        if not file or not Path(file).expanduser().is_file():
            self.query_one("#error", Static).update("Give the path of an existing embedding file.")
            return
        self.dismiss(ImportRequest(Path(file).expanduser(), self.query_one("#name", Input).value.strip(),
                                   self.query_one("#token", Input).value.strip(),
                                   self.query_one("#property", Select).value == "style"))


class ExportModal(_Dialog[ExportRequest | None]):
    """Write a concept's embedding for other tools: `dismiss(ExportRequest)`."""

    FORMATS = [("diffusers (.safetensors)", "diffusers"), ("A1111 (.pt/.safetensors)", "a1111"),
               ("kohya (.safetensors)", "kohya"), ("ComfyUI (.safetensors)", "comfy"),
               ("A1111 PNG card (.png)", "a1111-png"), ("kohya XTI, per-layer words (.safetensors)", "kohya-xti")]

    def __init__(self, concept: str, runs: list[tuple[str, str]], default_out: str):
        super().__init__()
        self.concept, self.runs, self.default_out = concept, runs, default_out

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(f"Export {self.concept}", id="dialog-title")
            yield FieldRow("Run", Select(self.runs, value=self.runs[-1][1], allow_blank=False, id="run",
                                        compact=True))
            yield FieldRow("Step", Input(placeholder="(final)", id="step", compact=True))
            yield FieldRow("Format", Select(self.FORMATS, value="diffusers", allow_blank=False, id="format",
                                           compact=True))
            yield FieldRow("Write to", Input(self.default_out, id="out", compact=True, suggester=PathSuggester()))
            yield Static("", classes="dialog-error", id="error")
            yield self.buttons("Export")

    def on_mount(self) -> None:
        self.query_one("#out", Input).focus()

    @on(Select.Changed, "#format")
    def _format_changed(self, event: Select.Changed) -> None:
        """A card is a .png, the other formats are not: the file name follows the format."""
        out = self.query_one("#out", Input)
        path = Path(out.value.strip())
        card = event.value == "a1111-png"
        if out.value.strip() and (path.suffix.lower() == ".png") != card:
            out.value = str(path.with_suffix(".png" if card else ".safetensors"))

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        out = self.query_one("#out", Input).value.strip()
        step = self.query_one("#step", Input).value.strip()
        error = self.query_one("#error", Static)
        if not out:
            error.update("Give the file to write.")
            return
        if step and not step.isdigit():
            error.update("Step must be a whole number (or empty for the final embedding).")
            return
        self.dismiss(ExportRequest(Path(out).expanduser(), str(self.query_one("#format", Select).value),
                                   str(self.query_one("#run", Select).value), int(step) if step else None))
