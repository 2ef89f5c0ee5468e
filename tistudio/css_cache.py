"""Parse each piece of Textual CSS once per process, not on every reparse.

Textual (8.2) builds a fresh Stylesheet and parses every source again whenever a screen with
CSS of its own first shows (`App._load_screen_css` -> `Stylesheet.reparse`), and its own parse
cache holds 64 sources where the studio's widgets bring more, so each parse misses it.  The
studio has five screens and several dialogs: without this, each first visit re-tokenises every
widget's DEFAULT_CSS (~0.1-0.3 s on a slow box, on the event loop).

`install()` wraps `textual.css.stylesheet.parse` in a cache keyed on everything the result
depends on: the CSS text, where it was read from, its scope, defaults flag and tie-breaker, and
the theme's variables.  Parsed RuleSets are only read after parsing (Textual's own cache
already hands the same ones to every parse of a stylesheet), so sharing them is safe.  If a
newer Textual changes that function's shape, `install()` leaves it alone.
"""

from __future__ import annotations

import inspect

EXPECTED_PARAMETERS = ["scope", "css", "read_from", "variables", "variable_tokens", "is_default_rules",
                       "tie_breaker"]
_cache: dict[tuple, list] = {}


def _variables_key(variable_tokens: dict | None) -> tuple:
    """The theme's variables as the parser sees them (a name and its tokens' values)."""
    if not variable_tokens:
        return ()
    return tuple((name, tuple(token.value for token in tokens)) for name, tokens in sorted(variable_tokens.items()))


def install() -> bool:
    """Cache Textual's CSS parser for this process; True if it is (now or already) cached."""
    from textual.css import stylesheet

    parse = stylesheet.parse
    if getattr(parse, "tistudio_cached", False):
        return True
    try:
        if list(inspect.signature(parse).parameters) != EXPECTED_PARAMETERS:
            return False
    except (TypeError, ValueError):
        return False

    def cached_parse(scope, css, read_from, variables=None, variable_tokens=None, is_default_rules=False,
                     tie_breaker=0):
        if variables is not None:  # not how Stylesheet calls it: no key for that form
            return parse(scope, css, read_from, variables, variable_tokens, is_default_rules, tie_breaker)
        key = (scope, css, read_from, is_default_rules, tie_breaker, _variables_key(variable_tokens))
        rules = _cache.get(key)
        if rules is None:  # a syntax error raises here, every time, and is never cached
            rules = _cache[key] = list(parse(scope, css, read_from, variable_tokens=variable_tokens,
                                             is_default_rules=is_default_rules, tie_breaker=tie_breaker))
        return list(rules)

    cached_parse.tistudio_cached = True
    stylesheet.parse = cached_parse
    return True
