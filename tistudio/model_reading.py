"""What the studio knows of its model, read without torch: its family and how it predicts (from
its configs, for the status bar and the help screen), the options that qualify it (an SD 2.x
file's prediction type and resolution), and its tokenizer (the live one-token initializer check).
A mixin of the App (tistudio/app.py): these run in the App's thread workers."""

from __future__ import annotations

from textual import work

from engine.errors import one_line
from tistudio.messages import StatusChanged, TokenizerReady

PREDICTION_SOURCES = {"config": "its config", "flag": "as asked", "global_step": "from the file's global_step",
                      "guess": "guessed"}


def model_options():
    """What qualifies the studio's model ($TISTUDIO_PREDICTION_TYPE/$TISTUDIO_MODEL_RESOLUTION, set
    from --prediction-type, --model-resolution or the config file), and a problem to show, or None."""
    from engine.errors import UserError
    from engine.settings.model import ModelOptions

    try:
        return ModelOptions.from_env(), None
    except UserError as exc:
        return ModelOptions(), f"{exc}; reading the model as its files say"



class ModelReading:
    """The App's model: `model`, `model_options`, `model_family`, `model_reading`, `tokenizer`."""

    @work(thread=True, group="tokenizer", exit_on_error=False)
    def _load_tokenizer(self) -> None:
        from engine.sd.models import load_tokenizer

        self._read_model_info()
        try:
            tokenizer = load_tokenizer(self.model)
        except Exception as exc:  # noqa: BLE001 - the live check is a help, not a requirement
            message = f"cannot load the tokenizer of {self.model} ({one_line(exc, 160)}); initializers are checked " \
                      "when the concept is created"
            self._from_thread(self.notify, message, severity="warning")
            return
        self._from_thread(self._tokenizer_ready, tokenizer)

    def _read_model_info(self) -> None:
        """The family and how the model predicts, from its configs alone (no torch): the status
        bar shows the family; a guessed SD 2.x prediction type is said once, as a warning."""
        from engine.sd.models import model_info

        try:
            info = model_info(self.model, self.model_options)
        except Exception:  # noqa: BLE001 - a model the engine cannot read fails there, with its reason
            return
        reading = f"{info.prediction_type}, {info.resolution} px ({PREDICTION_SOURCES.get(info.prediction_source)})"
        self._from_thread(self._family_known, info.family_label, reading, info.note)

    def model_params(self) -> dict:
        """The job params naming the model: its spec and what qualifies it (engine.settings.model)."""
        return {"model": self.model, **self.model_options.params()}

    @work(thread=True, group="model-info", exit_on_error=False)
    def set_prediction_type(self, prediction_type: str | None) -> None:
        """Read the model as predicting `prediction_type` (None: as its files say) for the jobs
        this studio submits from now on (the palette's Model commands; not remembered)."""
        from engine.settings.model import ModelOptions

        self.model_options = ModelOptions(prediction_type, self.model_options.resolution)
        self._read_model_info()
        self._from_thread(self.notify, f"Model read as: {self.model_reading}", title="Model")

    def _family_known(self, label: str, reading: str = "", note: str = "") -> None:
        self.model_family, self.model_reading = label, reading
        if note:
            self.notify(note, severity="warning", title="Model")
        self.changed.publish(StatusChanged())

    def _tokenizer_ready(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.changed.publish(TokenizerReady())

