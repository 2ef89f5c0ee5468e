"""The concept library: one directory per concept under $TISTUDIO_HOME/concepts.

    concepts/<name>/concept.toml   name, token, init, property, description, created
    concepts/<name>/images/        NNN.png training images (NNN.txt: a caption)
    concepts/<name>/masks/         NNN.png loss masks (engine.store.annotations)
    concepts/<name>/runs/<run-id>/ written by the training code

Images are added and removed later with `add_images` / `remove_images` (an imported
embedding arrives with none).

The directory name is the concept's name (the toml copy is informational), so
a concept can never be reached under two names.  Every change is built aside
and moved into place with a rename, and every check runs before the first
write, so a failed or interrupted command leaves the library as it was.
Directories starting with "." (build and trash areas) are never concepts.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import secrets
import shutil
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import tomli_w

from engine.errors import UserError
from engine.store import annotations as _annotations
from engine.store import images as _images
from engine.store.paths import atomic_write_text, ensure_private_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

PROPERTIES = ("object", "style")
TOML_NAME = "concept.toml"
MAX_NAME_LEN = 64
MAX_TOKEN_LEN = MAX_NAME_LEN + 2  # room for the default <name>
EDITABLE_FIELDS = ("description", "init", "property", "token")


@dataclass
class Concept:
    name: str
    token: str
    init: str
    property: str
    description: str
    created: str  # ISO 8601, UTC
    path: Path  # the concept directory

    @property
    def images(self) -> list[Path]:
        folder = self.path / "images"
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("*.png") if not p.name.startswith(".") and p.is_file())

    @property
    def runs_dir(self) -> Path:
        return self.path / "runs"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "token": self.token,
            "init": self.init,
            "property": self.property,
            "description": self.description,
            "images": len(self.images),
            "created": self.created,
            "path": str(self.path),
        }

    def _toml_fields(self) -> dict[str, str]:
        return {
            "name": self.name,
            "token": self.token,
            "init": self.init,
            "property": self.property,
            "description": self.description,
            "created": self.created,
        }


# --------------------------------------------------------------------------
# Field checks (no tokenizer needed)


def validate_name(name: str) -> str:
    """Return the name (NFC-normalised) if it is safe as a single directory name."""
    if not isinstance(name, str) or not name.strip():
        raise UserError("concept name is empty; pick a short name such as my-cat")
    # NFC so that a name typed on macOS (NFD) and on Linux is the same directory.
    name = unicodedata.normalize("NFC", name)
    shown = repr(name) if len(name) <= MAX_NAME_LEN else repr(name[:20] + "…")  # repr escapes control chars
    if len(name) > MAX_NAME_LEN:
        raise UserError(f"concept name {shown} is {len(name)} characters; use at most {MAX_NAME_LEN}")
    if "/" in name or "\\" in name:
        raise UserError(f"concept name {shown} contains a slash; use letters, digits, '-' or '_'")
    if name.startswith("."):
        raise UserError(f"concept name {shown} starts with '.'; start it with a letter or digit")
    if ".." in name:
        raise UserError(f"concept name {shown} contains '..'; use letters, digits, '-' or '_'")
    if any(_is_control(c) for c in name):
        raise UserError(f"concept name {shown} contains a control character; use letters, digits, '-' or '_'")
    if name != name.strip():
        raise UserError(f"concept name {shown} starts or ends with a space; remove the space")
    return name


def _is_control(char: str) -> bool:
    # Cc: C0/C1 controls incl. NUL; Cs: lone surrogates (not encodable as a
    # file name); Zl/Zp: line breaks that would break one-line output.
    return unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp")


def validate_property(prop: str) -> str:
    if prop not in PROPERTIES:
        raise UserError(f"property {prop!r} is not one of {', '.join(PROPERTIES)}; pick one of those")
    return prop


def validate_init_word(word: str) -> str:
    """The initializer must be a single, non-empty word (the tokenizer check is separate)."""
    if not isinstance(word, str) or not word.strip():
        raise UserError("initializer word is empty; give one plain word describing the concept, e.g. cat")
    word = word.strip()
    if len(word.split()) != 1 or any(_is_control(c) for c in word):
        raise UserError(f"initializer {word!r} is not a single word; give one plain word, e.g. cat")
    return word


def default_token(name: str) -> str:
    # Whitespace inside a placeholder token would let the tokenizer split it.
    return "<" + "-".join(name.split()) + ">"


def validate_token(token: str) -> str:
    if not isinstance(token, str) or not token.strip():
        raise UserError("placeholder token is empty; use something unusual such as <my-cat>")
    if token != token.strip() or len(token.split()) != 1 or any(_is_control(c) for c in token):
        raise UserError(f"placeholder token {token!r} contains spaces or control characters; use e.g. <my-cat>")
    if len(token) > MAX_TOKEN_LEN:
        raise UserError(f"placeholder token is {len(token)} characters; use at most {MAX_TOKEN_LEN}")
    if token.startswith("<|") and token.endswith("|>"):
        # CLIP's own special tokens look like this (<|endoftext|>).
        raise UserError(f"placeholder token {token} looks like a tokenizer special token; use e.g. <my-cat>")
    return token


# --------------------------------------------------------------------------
# Tokenizer checks, duck-typed: tokenizer(text, add_special_tokens=False)
# .input_ids, tokenizer.get_vocab(), optionally convert_ids_to_tokens and
# unk_token_id.  A transformers CLIPTokenizer fits.


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    # Some tokenizers return a batch ([[...]]) for a single string.
    if ids and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return [int(i) for i in ids]


def _token_strings(tokenizer, ids: list[int]) -> list[str]:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if convert is None:
        return [str(i) for i in ids]
    return [str(t).replace("</w>", "") for t in convert(ids)]


def check_initializer(tokenizer, word: str) -> int:
    """Return the single token id of `word`; UserError if it is not exactly one known token."""
    word = validate_init_word(word)
    ids = _encode(tokenizer, word)
    if len(ids) != 1:
        pieces = " + ".join(_token_strings(tokenizer, ids)) or "nothing"
        raise UserError(
            f"initializer {word!r} splits into {len(ids)} tokens ({pieces}); "
            "pick a simpler single word (single-token) such as cat, dog, toy or painting"
        )
    if ids[0] == getattr(tokenizer, "unk_token_id", None):
        raise UserError(f"initializer {word!r} is unknown to the tokenizer; pick a common English word such as cat")
    return ids[0]


def initializer_ids(tokenizer, init: str, vectors: int = 1) -> list[int]:
    """The token ids that start a word of `vectors` vectors, one per vector.

    One vector: `init` must be a single-token word (check_initializer).  N vectors:
    a single-token word repeated N times, or a phrase of exactly N tokens
    ("red teapot" for --vectors 2), each vector starting from its own token.
    """
    if vectors == 1:
        return [check_initializer(tokenizer, init)]
    if not isinstance(init, str) or not init.strip() or any(_is_control(c) for c in init):
        raise UserError("initializer is empty; give a word (or a phrase of --vectors tokens), e.g. cat")
    init = " ".join(init.split())
    ids = _encode(tokenizer, init)
    if len(ids) == 1 or len(ids) == vectors:
        if getattr(tokenizer, "unk_token_id", None) in ids:
            raise UserError(f"initializer {init!r} holds a token unknown to the tokenizer; use common English words")
        return ids * vectors if len(ids) == 1 else ids
    pieces = " + ".join(_token_strings(tokenizer, ids)) or "nothing"
    raise UserError(
        f"initializer {init!r} is {len(ids)} tokens ({pieces}) but --vectors is {vectors}; give one single-token "
        f"word (repeated) or a phrase of exactly {vectors} tokens"
    )


def token_in_vocab(tokenizer, token: str) -> bool:
    """True if `token` already means something to the tokenizer."""
    vocab = tokenizer.get_vocab()
    # CLIP stores whole words with an end-of-word marker ("cat</w>").
    if token in vocab or f"{token}</w>" in vocab:
        return True
    # CLIP also lower-cases prompts, so "Cat" is the existing token "cat</w>".
    ids = _encode(tokenizer, token)
    return len(ids) == 1 and ids[0] != getattr(tokenizer, "unk_token_id", None)


def check_new_token(tokenizer, token: str, taken: frozenset[str] = frozenset()) -> None:
    """UserError if `token` is already in the tokenizer's vocabulary."""
    token = validate_token(token)
    if token_in_vocab(tokenizer, token):
        suggestion = _suggest_token(token, lambda t: token_in_vocab(tokenizer, t) or t.casefold() in taken)
        raise UserError(f"token {token} is already in the tokenizer's vocabulary; pick another, e.g. {suggestion}")


def _suggest_token(token: str, is_taken) -> str:
    base = token.strip("<>") or "concept"
    for n in range(1, 1000):
        candidate = f"<{base}-{n}>"
        if not is_taken(candidate):
            return candidate
    return f"<{base}-{secrets.token_hex(3)}>"


# --------------------------------------------------------------------------
# concept.toml


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_concept(directory: Path) -> Concept:
    """Load one concept directory; UserError naming the file if it is unusable."""
    toml_path = directory / TOML_NAME
    try:
        data = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{toml_path} is missing; restore it or delete the concept") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        reason = " ".join(str(exc).split())
        raise UserError(f"{toml_path} is unreadable ({reason}); fix the file or delete the concept") from None
    return _concept_from_fields(directory, data, toml_path)


def _concept_from_fields(directory: Path, data: dict, toml_path: Path) -> Concept:
    def text(key: str, *aliases: str, default: str | None = None) -> str:
        for k in (key, *aliases):
            if k in data:
                value = data[k]
                # A hand-edited `created = 2024-01-01T00:00:00Z` parses as a datetime.
                return value.isoformat() if isinstance(value, (_dt.datetime, _dt.date)) else str(value)
        if default is None:
            raise UserError(f"{toml_path} has no {key!r} field; add it or delete the concept")
        return default

    init = text("init", "initializer")
    prop = text("property")
    if prop not in PROPERTIES:
        raise UserError(f"{toml_path} has property {prop!r}; set it to one of {', '.join(PROPERTIES)}")
    return Concept(
        name=directory.name,  # the directory is the source of truth
        token=text("token", default=default_token(directory.name)),
        init=init,
        property=prop,
        description=text("description", default=init),
        created=text("created", default=""),
        path=directory,
    )


def _write_toml(concept: Concept) -> None:
    atomic_write_text(concept.path / TOML_NAME, tomli_w.dumps(concept._toml_fields()))


# --------------------------------------------------------------------------


class Library:
    """All concepts under `home/concepts`."""

    def __init__(self, home: os.PathLike | str):
        self.home = ensure_private_dir(Path(home))
        self.root = ensure_private_dir(self.home / "concepts")

    # ---- reading

    def _dir(self, name: str) -> Path:
        return self.root / name

    def _dir_of_valid(self, name: str) -> Path:
        """The directory for a name given by a user, without letting '../x' escape the library."""
        try:
            name = validate_name(name)
        except UserError:
            raise self._not_found(name) from None
        return self._dir(name)

    @staticmethod
    def _not_found(name: str) -> UserError:
        return UserError(f"no concept named {name!r} (see `tistudio concept list`)")

    def list(self) -> list[Concept]:
        concepts = []
        for entry in self._concept_dirs():
            with contextlib.suppress(UserError, OSError):
                concepts.append(_read_concept(entry))
        return sorted(concepts, key=lambda c: (c.name.casefold(), c.name))

    def _concept_dirs(self) -> list[Path]:
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        return [p for p in entries if not p.name.startswith(".") and p.is_dir()]

    def get(self, name: str) -> Concept:
        directory = self._dir_of_valid(name)
        if not directory.is_dir():
            raise self._not_found(name)
        return _read_concept(directory)

    def exists(self, name: str) -> bool:
        try:
            return self._dir(validate_name(name)).is_dir()
        except UserError:
            return False

    # ---- checks shared by add / rename / update

    def _check_name_free(self, name: str) -> None:
        if self._dir(name).exists():
            raise UserError(f"a concept named {name!r} already exists; pick another name or delete that one first")

    def _check_token_free(self, token: str, *, ignore: str | None = None) -> None:
        # Two concepts with one token would make prompts ambiguous; CLIP
        # lower-cases prompt text, so compare case-insensitively.
        for other in self.list():
            if other.name != ignore and other.token.casefold() == token.casefold():
                raise UserError(f"token {token} is already used by concept {other.name!r}; pick another token")

    def _taken_tokens(self) -> frozenset[str]:
        return frozenset(c.token.casefold() for c in self.list())

    # ---- writing

    def add(
        self,
        name: str,
        images: os.PathLike | str | None,
        init: str,
        *,
        token: str | None = None,
        property: str = "object",  # the concept field's name, though it shadows the builtin
        description: str | None = None,
        tokenizer=None,
        masks: os.PathLike | str | None = None,
        caption_ext: str = _annotations.CAPTION_SUFFIX,
    ) -> Concept:
        """Create a concept; every check (including decoding every image, caption and mask) runs
        before any write.  Captions come from files beside the images (`caption_ext`), masks from
        the folder `masks` or the images' transparency (engine.store.annotations)."""
        name = validate_name(name)
        property = validate_property(property)
        init = validate_init_word(init)
        if tokenizer is not None:
            check_initializer(tokenizer, init)
        token = validate_token(default_token(name) if token is None else token)
        self._check_name_free(name)
        self._check_token_free(token)
        if tokenizer is not None:
            check_new_token(tokenizer, token, self._taken_tokens())
        image_paths = _images.collect_images(images) if images is not None else []
        sources = _annotations.gather(image_paths, caption_ext=caption_ext, masks=masks)
        _annotations.validate(sources)

        final = self._dir(name)
        concept = Concept(name, token, init, property, init if description is None else description, _now_iso(), final)
        self._build_and_move(concept, sources)
        return concept

    def _build_and_move(self, concept: Concept, sources: list[_annotations.ImageSource]) -> None:
        # Built under a dot-name that list() ignores, then renamed: a crash
        # leaves only a hidden .tmp-* directory, never a half-made concept.
        staging = self.root / f".tmp-{concept.name}-{secrets.token_hex(4)}"
        staging.mkdir(mode=0o700)
        try:
            os.chmod(staging, 0o700)
            _annotations.write(sources, staging)
            ensure_private_dir(staging / "images")  # even with no images, so the layout is uniform
            _write_toml(Concept(**{**concept.__dict__, "path": staging}))
            self._check_name_free(concept.name)  # someone may have added it meanwhile
            os.rename(staging, concept.path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def rename(self, old: str, new: str, *, tokenizer=None) -> Concept:
        """Move the concept directory (runs and all); a default token <old> becomes <new>."""
        concept = self.get(old)
        new = validate_name(new)
        if new == concept.name:
            return concept
        target = self._dir(new)
        # On a case-insensitive file system "cat" -> "Cat" finds itself.
        if target.exists() and not _same_file(target, concept.path):
            self._check_name_free(new)
        token = concept.token
        if token == default_token(concept.name):
            token = validate_token(default_token(new))
            self._check_token_free(token, ignore=concept.name)
            if tokenizer is not None:
                check_new_token(tokenizer, token, self._taken_tokens())

        renamed = Concept(**{**concept.__dict__, "name": new, "token": token, "path": target})
        os.rename(concept.path, target)
        try:
            _write_toml(renamed)
        except BaseException:
            os.rename(target, concept.path)
            raise
        return renamed

    def delete(self, name: str) -> None:
        """Remove a concept, its images and its runs.  Works on concepts with a broken toml too."""
        directory = self._dir_of_valid(name)
        if directory.is_symlink():
            directory.unlink()  # a hand-made link: drop the link, never the files it points at
            return
        if not directory.is_dir():
            raise self._not_found(name)
        # Rename first so the concept vanishes atomically; a crash during the
        # slow rmtree leaves only a hidden .trash-* directory.
        trash = self.root / f".trash-{directory.name}-{secrets.token_hex(4)}"
        os.rename(directory, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def add_images(self, name: str, sources: Iterable[os.PathLike | str], *, caption: str | None = None,
                   caption_ext: str = _annotations.CAPTION_SUFFIX,
                   masks: os.PathLike | str | None = None) -> list[Path]:
        """Add training images to a concept (e.g. one imported with none): each source is an image
        file or a folder of them, with its caption (`caption` for all of them, else a caption file
        beside each) and mask (as for `add`).  Every image, caption and mask is checked before the
        first is written, and a failed write removes what this call wrote; returns the stored
        files (NNN.png, after those there)."""
        concept = self.get(name)
        paths: list[Path] = []
        for source in sources:
            path = Path(source).expanduser()
            if path.is_dir():
                paths += _images.collect_images(path)
            elif path.is_file():
                paths.append(path)
            else:
                raise UserError(f"{path} does not exist; give an image file or a folder of images")
        if not paths:
            raise UserError(f"no images given for {concept.name!r}; give image files or a folder of images")
        annotated = _annotations.gather(paths, caption_ext=caption_ext, masks=masks, caption=caption)
        _annotations.validate(annotated)
        return _annotations.write(annotated, concept.path)

    def set_caption(self, name: str, image: str, caption: str | None) -> str | None:
        """Give a stored image (`003.png`) a caption, or remove it (None or blank); returns it."""
        concept = self.get(name)
        found = {p.name: p for p in concept.images}.get(Path(image).name)
        if found is None:
            have = ", ".join(p.name for p in concept.images) or "none"
            raise UserError(f"{concept.name!r} has no training image {str(image)!r} (it has: {have})")
        return _annotations.set_caption(found, caption)

    def remove_images(self, name: str, images: Iterable[os.PathLike | str]) -> list[Path]:
        """Remove training images from a concept, by stored name (`003.png`) or path; all or none
        (each with its caption and mask).

        Each file is first moved to a hidden trash folder beside them (a rename: one step each);
        if one cannot be moved, those already moved go back, so the concept keeps all its images."""
        concept = self.get(name)
        stored = {p.name: p for p in concept.images}
        targets: list[Path] = []
        for image in images:
            found = stored.get(Path(image).name)
            if found is None or (Path(image).name != str(image) and not _same_file(Path(image), found)):
                have = ", ".join(stored) or "none"
                raise UserError(f"{concept.name!r} has no training image {str(image)!r} (it has: {have})")
            if found not in targets:
                targets.append(found)
        if not targets:
            raise UserError(f"no images given to remove from {concept.name!r}")
        trash = concept.path / f".trash-images-{secrets.token_hex(4)}"
        trash.mkdir(mode=0o700)
        moved: list[tuple[Path, Path]] = []  # (where it was, where it is in the trash)
        try:
            for target in targets:
                # the image last: a crash midway leaves it whole, at worst without its caption or mask
                for number, path in enumerate([*_annotations.companions(target), target]):
                    aside = trash / f"{number}-{path.name}"
                    os.rename(path, aside)
                    moved.append((path, aside))
        except BaseException:
            for path, aside in reversed(moved):
                with contextlib.suppress(OSError):
                    os.rename(aside, path)
            with contextlib.suppress(OSError):
                trash.rmdir()  # only when everything went back
            raise
        shutil.rmtree(trash, ignore_errors=True)
        return targets

    def update(self, name: str, /, *, tokenizer=None, **fields: Any) -> Concept:
        """Change editable fields (description, init, property, token) and rewrite concept.toml."""
        concept = self.get(name)
        unknown = sorted(set(fields) - set(EDITABLE_FIELDS))
        if unknown:
            raise UserError(
                f"cannot change {', '.join(unknown)} with update; you can change {', '.join(EDITABLE_FIELDS)}"
                + (" (use rename for the name)" if "name" in unknown else "")
            )
        changes = self._validated_changes(concept, fields, tokenizer)
        updated = Concept(**{**concept.__dict__, **changes})
        _write_toml(updated)
        return updated

    def _validated_changes(self, concept: Concept, fields: dict[str, Any], tokenizer) -> dict[str, str]:
        changes: dict[str, str] = {}
        if "description" in fields:
            changes["description"] = "" if fields["description"] is None else str(fields["description"])
        if "property" in fields:
            changes["property"] = validate_property(fields["property"])
        if "init" in fields:
            changes["init"] = validate_init_word(fields["init"])
            if tokenizer is not None:
                check_initializer(tokenizer, changes["init"])
        if "token" in fields and fields["token"] != concept.token:
            changes["token"] = validate_token(fields["token"])
            self._check_token_free(changes["token"], ignore=concept.name)
            if tokenizer is not None:
                check_new_token(tokenizer, changes["token"], self._taken_tokens())
        return changes


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
