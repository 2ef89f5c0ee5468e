"""The studio's command palette (ctrl+p): every screen, every action, themes, image protocols and
how the model is read; and the settings the help screen lists.  Data and small functions the
App (tistudio/app.py) calls; nothing here holds state."""

from __future__ import annotations

from typing import Iterable

from textual.app import SystemCommand

from tistudio.config import PROTOCOLS

SCREEN_NAMES = {"library": "Library", "train": "Train", "generate": "Generate", "metrics": "Metrics",
                "gallery": "Gallery"}

# (title, help, screen, action): each runs the action on its screen, showing it first
ACTIONS = [
        ("Library: new concept", "Create a concept from a folder of images", "library", "new_concept"),
        ("Library: import embedding", "Import an embedding file as a concept", "library", "import_embedding"),
        ("Library: export concept", "Write the selected concept's embedding for other tools", "library",
         "export_concept"),
        ("Library: rename concept", "Rename the selected concept", "library", "rename_concept"),
        ("Library: concept images", "Add or remove the selected concept's training images", "library",
         "edit_images"),
        ("Library: delete concept", "Delete the selected concept (asks first)", "library", "delete_concept"),
        ("Library: inspect word", "The word's norms against the vocabulary, cosine to its initializer, nearest "
         "tokens, and its runs compared", "library", "inspect_word"),
        ("Train: start run", "Start a training run with the form's settings", "train", "start"),
        ("Train: resume run", "Resume the selected failed, cancelled or interrupted run", "train", "resume"),
        ("Train: cancel run", "Cancel the selected (or the running) run", "train", "cancel_run"),
        ("Train: export run to TensorBoard", "Write the selected run's loss, learning rate, norm, probes and "
         "previews as TensorBoard logs (key b)", "train", "export_tensorboard"),
        ("Generate: generate images", "Generate with the prompt and settings on the Generate screen",
         "generate", "generate"),
        ("Generate: edit prompt", "Move to the prompt field", "generate", "edit_prompt"),
        ("Metrics: evaluate concept", "Table 1 for the picked word (the latest finished run by default)",
         "metrics", "evaluate"),
        ("Metrics: steps experiment", "Reconstruction and editability over the run's checkpoints", "metrics",
         "steps_experiment"),
        ("Metrics: initializer-word experiment", "One run per initializer word, side by side (section 4.2)",
         "metrics", "init_experiment"),
        ("Metrics: seed experiment", "One run per training seed, side by side (section 4.3)", "metrics",
         "seeds_experiment"),
        ("Metrics: regulariser experiment", "One run per regulariser: Table 1 for each method", "metrics",
         "regularize_experiment"),
        ("Metrics: synthesis batches", "The picked word in the study's new scenes or styles (section 5)",
         "metrics", "synthesis"),
        ("Gallery: refresh", "Read every generated, evaluation and experiment image again", "gallery",
         "reload"),
        ("Metrics: next view", "Table 1, Compare (two evaluations with Δ), Study (every experiment)", "metrics",
         "next_view"),
    ]


def system_commands(app) -> Iterable[SystemCommand]:
    """The studio's own palette entries (after Textual's)."""
    for key, (mode, name) in enumerate(SCREEN_NAMES.items(), start=1):
        yield SystemCommand(f"Screen: {name}", f"Show the {name} screen (key {key})",
                            lambda m=mode: app.action_show_screen(m))
    for title, help_text, mode, action in ACTIONS:
        yield SystemCommand(title, help_text, lambda m=mode, a=action: app.screen_action(m, a))
    for name in sorted(app.available_themes):
        if name.startswith("tistudio"):
            yield SystemCommand(f"Theme: {name}", "Switch to this theme (remembered)",
                                lambda n=name: setattr(app, "theme", n))
    for protocol in PROTOCOLS:
        yield SystemCommand(f"Images: {protocol}", "Draw images with this protocol (remembered)",
                            lambda p=protocol: app.set_image_protocol(p))
    for choice, what in (("epsilon", "an SD 2.x-base file (512 px)"), ("v_prediction", "SD 2.x at 768 px"),
                         (None, "as the model's own files say")):
        yield SystemCommand(f"Model: prediction type {choice or 'from the model'}",
                            f"Read the model as {what}, for the jobs started from now on (this session)",
                            lambda c=choice: app.set_prediction_type(c))
    yield SystemCommand("Help", "Keys and settings", app.action_help)


def describe_settings(app) -> list[str]:
    """Where the studio's settings come from, one line each (the help screen)."""
    from tistudio.config import config_path
    from tistudio.themes import theme_dirs
    from tistudio.widgets.images import resolved_protocol

    try:
        resolved = resolved_protocol(app.image_protocol)
    except Exception:  # noqa: BLE001
        resolved = app.image_protocol
    return [
        f"data home: {app.home}",
        f"model: {app.model}" + (f" ({app.model_family})" if app.model_family else ""),
        *([f"model predicts: {app.model_reading}  — ctrl+p Model: to change"] if app.model_reading else []),
        f"settings: {config_path()}",
        f"themes: {', '.join(str(d) for d in theme_dirs())}",
        f"images: {app.image_protocol}" + (f" (using {resolved})" if resolved != app.image_protocol else "")
        + "  — set TISTUDIO_IMAGE_PROTOCOL=auto|kitty|sixel|halfblock or image_protocol in the settings file",
        f"engine: {app.state.engine} {app.state.engine_detail}".rstrip(),
    ]
