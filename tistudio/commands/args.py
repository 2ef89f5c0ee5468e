"""Argument types shared by the commands: each rejects bad input with a message naming the fix."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not 0 or a positive whole number")
    return value


def float_arg(text: str) -> float:
    """A finite number: nan and inf are refused here, not deep inside a run."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one number")
    return values


def word_list(text: str) -> list[str]:
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError("give at least one word")
    return words


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def regularizer_list(text: str) -> list[str]:
    """One or more regularisers, each METHOD or METHOD:WEIGHT (several: a sweep, one run each)."""
    from engine.errors import UserError
    from engine.settings.train import parse_method

    methods = word_list(text)
    for method in methods:
        try:
            parse_method(method)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return list(dict.fromkeys(methods))


def float_list(text: str) -> list[float]:
    """Comma-separated finite numbers, e.g. 0.7,0.3."""
    return [float_arg(v.strip()) for v in text.split(",") if v.strip()] or _none_given()


def _none_given():
    raise argparse.ArgumentTypeError("give at least one number")


def saved_step(text: str) -> int | str:
    """--step: a saved step's number, or `best` (the run's best probed step)."""
    from engine.errors import UserError
    from engine.store.words import parse_step

    try:
        return parse_step(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix(f"--step {text!r}: ")) from None


def stop_rules(text: str) -> str:
    """--stop-when: checked by the engine's own parser (engine.settings.stopping)."""
    from engine.errors import UserError
    from engine.settings.stopping import parse_stop_when

    try:
        parse_stop_when(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
