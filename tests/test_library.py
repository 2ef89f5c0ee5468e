"""engine.store.library: concept names, tokenizer checks and the on-disk library."""

from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib
from PIL import Image

from engine.errors import UserError
from engine.store import images as images_mod
from engine.store import library as library_mod
from engine.store.library import (
    Concept,
    Library,
    check_initializer,
    check_new_token,
    default_token,
    validate_name,
)

# ---------------------------------------------------------------- fixtures


class FakeTokenizer:
    """The duck-typed interface library.py relies on, with a tiny CLIP-like vocab."""

    unk_token_id = 0

    def __init__(self):
        words = ["cat", "dog", "toy", "painting", "style", "object", "teddy", "bear"]
        self.vocab = {"<|endoftext|>": 0, "teddy": 100}
        self.vocab.update({f"{w}</w>": i for i, w in enumerate(words, 1)})
        self.inverse = {i: t for t, i in self.vocab.items()}

    def get_vocab(self):
        return dict(self.vocab)

    def __call__(self, text, add_special_tokens=False):
        ids = []
        for word in text.lower().split():
            if f"{word}</w>" in self.vocab:
                ids.append(self.vocab[f"{word}</w>"])
            elif word == "teddybear":
                ids += [self.vocab["teddy"], self.vocab["bear</w>"]]
            else:  # unknown words fall apart into one (unknown) id per character
                ids += [0] * len(word)
        return SimpleNamespace(input_ids=ids)

    def convert_ids_to_tokens(self, ids):
        return [self.inverse.get(i, "<|endoftext|>") for i in ids]


@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    """The real SD tokenizer when engine.sd.tokenizer and open_clip are available, else None."""
    try:
        from engine.sd import tokenizer as tok_mod
    except ImportError:
        return None
    old = os.environ.get("TISTUDIO_CACHE")
    os.environ["TISTUDIO_CACHE"] = str(tmp_path_factory.mktemp("tok-cache"))
    try:
        return tok_mod.load_clip_tokenizer()
    except Exception:  # noqa: BLE001 - e.g. open_clip not installed yet
        return None
    finally:
        if old is None:
            os.environ.pop("TISTUDIO_CACHE", None)
        else:
            os.environ["TISTUDIO_CACHE"] = old


@pytest.fixture(params=["fake", "clip"])
def tokenizer(request, clip_tokenizer):
    if request.param == "fake":
        return FakeTokenizer()
    if clip_tokenizer is None:
        pytest.skip("real CLIP tokenizer not available")
    return clip_tokenizer


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def lib(home) -> Library:
    return Library(home)


def make_image(path: Path, size=(96, 96), color=(10, 120, 200)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def pics(tmp_path) -> Path:
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, name in enumerate(["b.jpg", "a.png", "c.webp"]):
        make_image(folder / name, color=(i * 80, 100, 100))
    return folder


def tree(root: Path) -> list[tuple[str, bool, int]]:
    """Everything under root (path, is-dir, size) so 'nothing changed' can be asserted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out.append((str(p.relative_to(root)), p.is_dir(), 0 if p.is_dir() else p.stat().st_size))
    return sorted(out)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------- names


BAD_NAMES = [
    "a/b", "a\\b", "..", ".", ".hidden", "a..b", "a\x00b", "a\x07b", "tab\there",
    "x" * 1000, "x" * 65, "", "  ", " pad",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_refused_and_nothing_written(lib, home, pics, name):
    before = tree(home)
    with pytest.raises(UserError) as err:
        lib.add(name, pics, "cat")
    assert "\n" not in str(err.value) and len(str(err.value)) < 200
    assert "\x00" not in str(err.value) and "\x07" not in str(err.value)
    assert tree(home) == before
    assert lib.list() == []


@pytest.mark.parametrize("name", ["猫", "café", "Ünïcode-テスト", "my cat", "x" * 64, "a.b", "über_2"])
def test_good_names(lib, pics, name):
    concept = lib.add(name, pics, "cat")
    assert concept.name == name
    assert lib.get(name).name == name
    assert [c.name for c in lib.list()] == [name]
    assert lib.exists(name)


def test_name_is_nfc_normalised(lib):
    nfd = unicodedata.normalize("NFD", "café")
    assert validate_name(nfd) == "café"
    lib.add(nfd, None, "cat")
    assert lib.exists("café") and lib.get(nfd).name == "café"


def test_default_token_has_no_spaces():
    assert default_token("my  cat") == "<my-cat>"


# ---------------------------------------------------------------- tokenizer checks


def test_initializer_single_token(tokenizer):
    word_id = check_initializer(tokenizer, "cat")
    assert tokenizer("cat", add_special_tokens=False).input_ids == [word_id]


def test_initializer_that_splits_is_refused(tokenizer):
    with pytest.raises(UserError) as err:
        check_initializer(tokenizer, "teddybear")
    msg = str(err.value)
    assert "splits into 2 tokens" in msg and "teddy" in msg and "bear" in msg
    assert "single word" in msg


@pytest.mark.parametrize("word", ["", "   ", "two words"])
def test_initializer_must_be_one_word(tokenizer, word):
    with pytest.raises(UserError):
        check_initializer(tokenizer, word)


def test_new_token_ok(tokenizer):
    check_new_token(tokenizer, "<my-cat>")


@pytest.mark.parametrize("token", ["cat", "Cat"])
def test_existing_token_refused_with_suggestion(tokenizer, token):
    with pytest.raises(UserError, match=r"already in the tokenizer's vocabulary; pick another, e\.g\. <"):
        check_new_token(tokenizer, token)


def test_special_token_refused(tokenizer):
    with pytest.raises(UserError, match="special token"):
        check_new_token(tokenizer, "<|endoftext|>")


def test_suggestion_is_actually_free(tokenizer):
    with pytest.raises(UserError) as err:
        check_new_token(tokenizer, "cat")
    suggestion = str(err.value).rsplit("e.g. ", 1)[1]
    assert suggestion == "<cat-1>"
    check_new_token(tokenizer, suggestion)


# ---------------------------------------------------------------- add


def test_add_writes_concept(lib, home, pics):
    concept = lib.add("kitty", pics, "cat", description="my cat Tom")
    assert concept == lib.get("kitty")
    assert concept.token == "<kitty>"
    assert concept.property == "object"
    assert concept.path == home / "concepts" / "kitty"
    assert [p.name for p in concept.images] == ["000.png", "001.png", "002.png"]
    assert concept.runs_dir == concept.path / "runs"
    data = tomllib.loads((concept.path / "concept.toml").read_text())
    assert data == {
        "name": "kitty",
        "token": "<kitty>",
        "init": "cat",
        "property": "object",
        "description": "my cat Tom",
        "created": concept.created,
    }
    assert concept.created.endswith("+00:00")
    assert concept.to_dict() == {**data, "images": 3, "path": str(concept.path)}


def test_add_everything_private(lib, home, pics):
    lib.add("kitty", pics, "cat")
    for dirpath, _dirnames, filenames in os.walk(home / "concepts"):
        assert mode(Path(dirpath)) == 0o700
        for name in filenames:
            assert mode(Path(dirpath) / name) == 0o600, name
    assert mode(home) == 0o700


def test_add_defaults_and_options(lib, pics):
    c = lib.add("vangogh", pics, "painting", token="<vg>", property="style")
    assert (c.token, c.property, c.description) == ("<vg>", "style", "painting")


def test_add_without_images(lib):
    c = lib.add("imported", None, "dog")
    assert c.images == []
    assert (c.path / "images").is_dir()
    assert lib.get("imported").to_dict()["images"] == 0


def test_add_leaves_no_staging_dirs(lib, home, pics):
    lib.add("kitty", pics, "cat")
    assert [p.name for p in (home / "concepts").iterdir()] == ["kitty"]


def test_add_with_tokenizer(lib, pics, tokenizer):
    c = lib.add("kitty", pics, "cat", tokenizer=tokenizer)
    assert c.token == "<kitty>"


def refusal_cases():
    """Ways `add` must fail without touching the library (set up in the test below)."""
    return [
        "bad_property",
        "empty_init",
        "two_word_init",
        "init_splits",
        "token_in_vocab",
        "token_with_space",
        "special_token",
        "duplicate_name",
        "duplicate_token",
        "duplicate_token_case",
        "missing_folder",
        "empty_folder",
        "not_a_folder",
        "tiny_1px",
        "small_40px",
        "truncated",
        "text_as_png",
        "bomb",
        "symlink_outside",
    ]


@pytest.mark.parametrize("case", refusal_cases())
def test_every_refusal_leaves_library_unchanged(lib, home, tmp_path, pics, monkeypatch, case):
    lib.add("existing", None, "dog", token="<taken>")
    bad = tmp_path / "bad"
    bad.mkdir()
    make_image(bad / "good.png")
    kwargs = dict(name="kitty", images=pics, init="cat")

    if case == "bad_property":
        kwargs["property"] = "person"
    elif case == "empty_init":
        kwargs["init"] = ""
    elif case == "two_word_init":
        kwargs["init"] = "black cat"
    elif case == "init_splits":
        kwargs.update(init="teddybear", tokenizer=FakeTokenizer())
    elif case == "token_in_vocab":
        kwargs.update(token="dog", tokenizer=FakeTokenizer())
    elif case == "token_with_space":
        kwargs["token"] = "<my cat>"
    elif case == "special_token":
        kwargs["token"] = "<|endoftext|>"
    elif case == "duplicate_name":
        kwargs["name"] = "existing"
    elif case == "duplicate_token":
        kwargs["token"] = "<taken>"
    elif case == "duplicate_token_case":
        kwargs["token"] = "<TAKEN>"
    elif case == "missing_folder":
        kwargs["images"] = tmp_path / "nope"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        kwargs["images"] = tmp_path / "empty"
    elif case == "not_a_folder":
        kwargs["images"] = bad / "good.png"
    elif case == "tiny_1px":
        make_image(bad / "z.png", size=(1, 1))
        kwargs["images"] = bad
    elif case == "small_40px":
        make_image(bad / "z.png", size=(40, 40))
        kwargs["images"] = bad
    elif case == "truncated":
        data = (pics / "a.png").read_bytes()
        (bad / "z.png").write_bytes(data[: len(data) // 2])
        kwargs["images"] = bad
    elif case == "text_as_png":
        (bad / "x.png").write_text("hello")
        kwargs["images"] = bad
    elif case == "bomb":
        monkeypatch.setattr(images_mod, "MAX_PIXELS", 90 * 90)
        kwargs["images"] = bad
    elif case == "symlink_outside":
        (bad / "z.png").symlink_to(make_image(tmp_path / "outside.png"))
        kwargs["images"] = bad

    before = tree(home)
    with pytest.raises(UserError) as err:
        lib.add(**kwargs)
    assert "\n" not in str(err.value)
    assert tree(home) == before
    assert [c.name for c in lib.list()] == ["existing"]


def test_crash_while_building_leaves_nothing(lib, home, pics, monkeypatch):
    def boom(concept):
        raise RuntimeError("killed")

    before = tree(home)
    monkeypatch.setattr(library_mod, "_write_toml", boom)
    with pytest.raises(RuntimeError):
        lib.add("kitty", pics, "cat")
    assert tree(home) == before


# ---------------------------------------------------------------- list / get / exists


def test_list_sorted(lib):
    for name in ["zeta", "Alpha", "beta"]:
        lib.add(name, None, "dog")
    assert [c.name for c in lib.list()] == ["Alpha", "beta", "zeta"]


def test_list_skips_broken(lib, home):
    lib.add("good", None, "dog")
    concepts = home / "concepts"
    (concepts / "corrupt").mkdir()
    (concepts / "corrupt" / "concept.toml").write_text("name = [unterminated\n")
    (concepts / "no-toml").mkdir()
    (concepts / "bad-prop").mkdir()
    (concepts / "bad-prop" / "concept.toml").write_text('init = "dog"\nproperty = "person"\n')
    (concepts / "no-init").mkdir()
    (concepts / "no-init" / "concept.toml").write_text('property = "object"\n')
    (concepts / "binary").mkdir()
    (concepts / "binary" / "concept.toml").write_bytes(b"\xff\xfe\x00")
    (concepts / ".tmp-half-made").mkdir()
    (concepts / ".tmp-half-made" / "concept.toml").write_text('init = "dog"\nproperty = "object"\n')
    (concepts / "stray-file").write_text("x")
    assert [c.name for c in lib.list()] == ["good"]


def test_get_corrupt_names_the_file(lib, home):
    folder = home / "concepts" / "corrupt"
    folder.mkdir()
    (folder / "concept.toml").write_text("name = [unterminated\n")
    with pytest.raises(UserError) as err:
        lib.get("corrupt")
    assert str(folder / "concept.toml") in str(err.value)
    assert "\n" not in str(err.value)


def test_get_missing(lib):
    with pytest.raises(UserError, match=r"no concept named 'ghost' \(see `tistudio concept list`\)"):
        lib.get("ghost")


@pytest.mark.parametrize("name", ["../home", "..", "", "a/b"])
def test_get_cannot_escape(lib, name):
    with pytest.raises(UserError, match="no concept named"):
        lib.get(name)
    assert not lib.exists(name)


def test_toml_name_is_informational(lib):
    c = lib.add("kitty", None, "cat")
    text = (c.path / "concept.toml").read_text().replace('name = "kitty"', 'name = "other"')
    (c.path / "concept.toml").write_text(text)
    assert lib.get("kitty").name == "kitty"


def test_hand_edited_datetime(lib):
    c = lib.add("kitty", None, "cat")
    text = (c.path / "concept.toml").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("created"))
    (c.path / "concept.toml").write_text(text + "\ncreated = 2024-05-01T10:00:00Z\n")
    assert lib.get("kitty").created.startswith("2024-05-01T10:00:00")


# ---------------------------------------------------------------- rename


def add_run(concept: Concept) -> Path:
    run = concept.runs_dir / "20240101-0001"
    run.mkdir(parents=True)
    (run / "learned_embeds.safetensors").write_bytes(b"weights")
    return run


def test_rename_moves_runs_and_default_token(lib, home, pics):
    old = lib.add("kitty", pics, "cat")
    add_run(old)
    new = lib.rename("kitty", "tom")
    assert new.name == "tom" and new.token == "<tom>"
    assert new.path == home / "concepts" / "tom" and not old.path.exists()
    assert (new.runs_dir / "20240101-0001" / "learned_embeds.safetensors").read_bytes() == b"weights"
    assert len(new.images) == 3
    assert lib.get("tom") == new
    assert tomllib.loads((new.path / "concept.toml").read_text())["name"] == "tom"
    assert not lib.exists("kitty")
    assert [c.name for c in lib.list()] == ["tom"]


def test_rename_keeps_custom_token(lib):
    lib.add("kitty", None, "cat", token="<sks>")
    assert lib.rename("kitty", "tom").token == "<sks>"


def test_rename_to_same_name(lib):
    c = lib.add("kitty", None, "cat")
    assert lib.rename("kitty", "kitty") == c


@pytest.mark.parametrize("new", ["other", "../x", ".hidden", ""])
def test_rename_refusals_leave_library_unchanged(lib, home, new):
    lib.add("kitty", None, "cat")
    lib.add("other", None, "dog")
    before = tree(home)
    with pytest.raises(UserError):
        lib.rename("kitty", new)
    assert tree(home) == before


def test_rename_default_token_clash(lib, home):
    lib.add("kitty", None, "cat")
    lib.add("other", None, "dog", token="<tom>")
    before = tree(home)
    with pytest.raises(UserError, match="already used by concept 'other'"):
        lib.rename("kitty", "tom")
    assert tree(home) == before


def test_rename_missing(lib):
    with pytest.raises(UserError, match="no concept named"):
        lib.rename("ghost", "tom")


# ---------------------------------------------------------------- delete


def test_delete_removes_everything(lib, home, pics):
    c = lib.add("kitty", pics, "cat")
    add_run(c)
    lib.add("keep", None, "dog")
    lib.delete("kitty")
    assert not c.path.exists()
    assert [p.name for p in (home / "concepts").iterdir()] == ["keep"]  # no trash left behind
    assert not lib.exists("kitty")


def test_delete_missing(lib):
    with pytest.raises(UserError, match="no concept named"):
        lib.delete("ghost")


def test_delete_broken_concept(lib, home):
    folder = home / "concepts" / "corrupt"
    folder.mkdir()
    (folder / "concept.toml").write_text("name = [")
    lib.delete("corrupt")
    assert not folder.exists()


def test_delete_cannot_escape(lib, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    with pytest.raises(UserError):
        lib.delete("../../precious")
    assert precious.exists()


def test_delete_symlinked_concept_keeps_target(lib, home, tmp_path):
    Library(tmp_path / "other-home").add("kitty", None, "cat")
    target = tmp_path / "other-home" / "concepts" / "kitty"
    (home / "concepts" / "kitty").symlink_to(target)
    lib.delete("kitty")
    assert (target / "concept.toml").exists() and not (home / "concepts" / "kitty").exists()


# ---------------------------------------------------------------- update


def test_update_description(lib):
    lib.add("kitty", None, "cat")
    c = lib.update("kitty", description="the grey one")
    assert c.description == "the grey one"
    assert lib.get("kitty").description == "the grey one"


def test_update_fields(lib, tokenizer):
    lib.add("kitty", None, "cat")
    c = lib.update("kitty", init="dog", property="style", token="<grey>", tokenizer=tokenizer)
    assert (c.init, c.property, c.token) == ("dog", "style", "<grey>")
    assert lib.get("kitty") == c


@pytest.mark.parametrize(
    "fields",
    [{"property": "person"}, {"init": "two words"}, {"token": "<taken>"}, {"name": "x"}, {"created": "now"}],
)
def test_update_refusals(lib, home, fields):
    lib.add("kitty", None, "cat")
    lib.add("other", None, "dog", token="<taken>")
    before = tree(home)
    with pytest.raises(UserError):
        lib.update("kitty", **fields)
    assert tree(home) == before


def test_update_init_checked_by_tokenizer(lib, tokenizer):
    lib.add("kitty", None, "cat")
    with pytest.raises(UserError, match="splits into"):
        lib.update("kitty", init="teddybear", tokenizer=tokenizer)


# ---------------------------------------------------------------- images of a concept


def test_add_images_to_an_imported_concept_from_files_and_folders(lib, home, pics, tmp_path):
    lib.add("imp", None, "cat")  # an imported embedding arrives with no images
    assert lib.get("imp").images == []
    extra = make_image(tmp_path / "extra.png", color=(1, 2, 3))
    written = lib.add_images("imp", [pics, extra])
    assert [p.name for p in written] == ["000.png", "001.png", "002.png", "003.png"]
    assert lib.get("imp").images == written
    assert all(mode(p) == 0o600 for p in written)
    with Image.open(written[-1]) as img:  # re-decoded and stored as PNG, in the order given
        assert img.format == "PNG" and img.getpixel((0, 0)) == (1, 2, 3)
    assert [p.name for p in lib.add_images("imp", [str(extra)])] == ["004.png"]  # numbering goes on


def test_add_images_checks_every_image_before_writing_any(lib, home, pics, tmp_path):
    lib.add("cat", pics, "cat")
    before = tree(home)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = make_image(tmp_path / "good.png")
    for sources, problem in (([good, broken], "broken.png"), ([tmp_path / "missing.png"], "does not exist"),
                             ([], "no images given"), ([tmp_path / "empty"], "does not exist")):
        with pytest.raises(UserError, match=problem):
            lib.add_images("cat", sources)
        assert tree(home) == before
    with pytest.raises(UserError, match="no concept named"):
        lib.add_images("dog", [good])


def test_add_images_removes_what_it_wrote_when_a_write_fails(lib, home, pics, tmp_path, monkeypatch):
    lib.add("cat", None, "cat")
    before = tree(home)
    real_save = Image.Image.save
    calls = []

    def failing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError):
        lib.add_images("cat", [pics])
    assert tree(home) == before


def test_remove_images_by_name_or_path_all_or_none(lib, home, pics, monkeypatch):
    concept = lib.add("cat", pics, "cat")
    first, second, third = concept.images
    assert lib.remove_images("cat", ["001.png", str(third)]) == [second, third]
    assert lib.get("cat").images == [first]
    assert not [p for p in concept.path.iterdir() if p.name.startswith(".")]  # no trash left behind

    before = tree(home)
    with pytest.raises(UserError, match="no training image '009.png'"):
        lib.remove_images("cat", ["000.png", "009.png"])
    with pytest.raises(UserError, match="no images given"):
        lib.remove_images("cat", [])
    assert tree(home) == before

    lib.add_images("cat", [pics])
    before = tree(home)
    real_rename = os.rename
    moves = []

    def failing_rename(src, dst):
        moves.append(src)
        if len(moves) == 2:
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(library_mod.os, "rename", failing_rename)
    with pytest.raises(OSError):
        lib.remove_images("cat", ["000.png", "001.png"])
    monkeypatch.undo()
    assert tree(home) == before  # the one moved came back, and the trash folder is gone


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"], ids=["sd1-pad", "sd2-pad"])
def test_a_cloned_tokenizer_is_the_deep_copy_it_replaces_and_leaves_the_original_alone(pad):
    """engine.sd.tokenizer.clone_tokenizer shares the BPE model instead of rebuilding it: every
    prompt tokenizes as a deep copy's does, before and after adding words, and the words added to
    one copy reach neither the original nor another copy."""
    import copy

    from engine.sd.tokenizer import _cached_tokenizer, clone_tokenizer

    original = _cached_tokenizer(pad)
    clone, other, reference = clone_tokenizer(original), clone_tokenizer(original), copy.deepcopy(original)
    prompts = ["a photo of a cat", "A <sks> on the beach!!", "héllo wörld 123, <sks>_1", "x " * 90]

    def ids(tok):
        return [tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in prompts]

    assert ids(clone) == ids(reference)
    for tok in (clone, reference):
        tok.add_tokens(["<sks>", "<sks>_1"])
    assert ids(clone) == ids(reference) and clone.convert_tokens_to_ids("<sks>_1") == 49409
    assert clone.decode(clone("a <sks>_1").input_ids) == reference.decode(reference("a <sks>_1").input_ids)
    assert len(original) == len(other) == 49408 and "<sks>" not in original.get_vocab()
    assert ids(other) == ids(copy.deepcopy(original))
