"""The studio's one door to the concept library on disk, owned by the App (`app.library`).

Screens and dialogs read concepts through it and ask it to change them (add, rename, delete,
add or remove images, caption them); they never construct `engine.store.library.Library` themselves.
It also draws an image's mask over it for showing (`mask_overlay`, a PNG in a temp folder).  Every
change it makes is announced once, through `on_change` (the App publishes `LibraryChanged`),
from whichever thread made it.  Embedding import and export are engine work: the dialogs hand
back requests (`ImportRequest`, `ExportRequest`) and the App runs `tistudio` for them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from engine.store.library import Concept, Library
from engine.store.records import ConceptSummary, library_summaries, summarize


class LibraryService:
    def __init__(self, home: os.PathLike | str, tokenizer: Callable[[], object | None] = lambda: None,
                 on_change: Callable[[], None] = lambda: None):
        self.home = Path(home)
        self._tokenizer = tokenizer  # the model's tokenizer once loaded (the one-token initializer check)
        self._on_change = on_change
        self._overlays: Path | None = None  # where mask overlays are drawn (made when first needed)

    @property
    def _library(self) -> Library:
        return Library(self.home)

    # --- reading ---------------------------------------------------------------------------------

    def names(self) -> tuple[str, ...]:
        """Every concept's name, sorted as the library lists them; () when it cannot be read."""
        try:
            return tuple(c.name for c in self._library.list())
        except (OSError, ValueError):
            return ()

    def get(self, name: str) -> Concept:
        """The concept called `name`; UserError naming what exists when there is none."""
        return self._library.get(name)

    def summaries(self) -> list[ConceptSummary]:
        """Every concept with its images and runs, by name (engine.store.records)."""
        return library_summaries(self.home)

    def summary(self, name: str) -> ConceptSummary:
        """The concept with its images and runs, read once (engine.store.records)."""
        return summarize(self.get(name))

    def captions(self, name: str) -> dict[str, str]:
        """{stored image name: caption} of the concept's images that have one."""
        from engine.store.annotations import captions_of

        return captions_of(self.get(name).images)

    def masked(self, name: str) -> set[str]:
        """The concept's images that have a mask (by stored name)."""
        from engine.store.annotations import mask_of

        return {p.name for p in self.get(name).images if mask_of(p) is not None}

    def mask_overlay(self, image: Path) -> Path | None:
        """A stored image with what its mask ignores tinted red, as a PNG to show; None without a mask."""
        from engine.store.annotations import mask_of, overlay

        mask = mask_of(image)
        if mask is None:
            return None
        if self._overlays is None:
            self._overlays = Path(tempfile.mkdtemp(prefix="tistudio-masks-"))
            atexit.register(shutil.rmtree, self._overlays, True)
        path = self._overlays / f"{abs(hash(str(image.resolve())))}-{image.name}"
        overlay(image, mask).save(path, format="PNG")
        return path

    def export_tensorboard(self, run_id: str, folder: Path) -> list[Path]:
        """Write the run's history (each member's, for a sweep) as TensorBoard logs under `folder`
        (engine.store.tensorboard, as `tistudio runs export RUN --tensorboard DIR`); the folders written."""
        from engine.store.tensorboard import export_run

        return export_run(self.home, run_id, folder)

    # --- changing --------------------------------------------------------------------------------

    def add(self, name: str, folder: Path, init: str, *, property: str = "object",
            description: str | None = None, masks: Path | None = None) -> Concept:
        concept = self._library.add(name, folder, init, property=property, description=description,
                                    tokenizer=self._tokenizer(), masks=masks)
        self._on_change()
        return concept

    def rename(self, name: str, new: str) -> Concept:
        concept = self._library.rename(name, new, tokenizer=self._tokenizer())
        self._on_change()
        return concept

    def delete(self, name: str) -> None:
        self._library.delete(name)
        self._on_change()

    def edit_images(self, name: str, add: Iterable[Path] = (), remove: Iterable[str] = (),
                    captions: dict[str, str | None] | None = None) -> tuple[list, list]:
        """Add image files or folders (with the caption files beside them, kohya's layout), set the
        `captions` given ({stored name: caption}; blank or None removes one), then remove stored
        images by file name: (added, removed).  Every new image is decoded before any is written;
        a caption over 1,000 characters is refused; the removal is all or none.  When a later part
        is refused after images were added, the error says how many were."""
        from engine.errors import UserError
        from engine.store.annotations import check_caption

        add, remove = list(add), list(remove)
        for image, caption in (captions or {}).items():  # every caption checked before anything is written
            check_caption(caption, f"the caption of {image}")
        library, added = self._library, []
        try:
            if add:
                added = library.add_images(name, add)
            for image, caption in (captions or {}).items():
                library.set_caption(name, image, caption)
            removed = library.remove_images(name, remove) if remove else []
        except UserError as exc:
            if added:
                self._on_change()
                raise UserError(f"{exc} ({len(added)} image(s) were added)") from None
            raise
        self._on_change()
        return added, removed
