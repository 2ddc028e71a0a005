"""PEFT's module matching, in time linear in the name: no user regex can hang lora-ref.

PEFT 0.21.2 (``check_target_module_exists``, ``get_pattern_key``) decides:

- ``target_modules`` / ``exclude_modules`` given as a string: ``re.fullmatch(pattern, name)``;
- given as a list: ``name in targets or any(name.endswith("." + t) for t in targets)``;
- ``rank_pattern`` / ``alpha_pattern``: the first key k (dict order) with
  ``re.match(rf"(.*\\.)?({k})$", name)``.

Python's ``re`` backtracks: ``(a|aa)*b`` or ``(x+x+)+y`` take time exponential in the name, so a
hostile adapter_config.json could hang ``inspect`` or ``merge``. Here the pattern is parsed by
Python's own regex parser (so the syntax, escapes and classes are exactly ``re``'s) and run as a
Thompson NFA, simulated as a lazily built DFA: time O(len(name) x states), never exponential.
Whether a match *exists* does not depend on greedy or lazy repetition, so the answers equal
``re``'s. Constructs whose meaning is not regular (backreferences, lookarounds, conditionals,
atomic groups, possessive repeats) and flags we do not model (IGNORECASE, MULTILINE, LOCALE) are
refused with a ConfigError naming them, as are patterns whose NFA would exceed
:data:`MAX_STATES` (``x{1000}{1000}``). Why not a regex engine dependency (RE2): it would be a
compiled wheel for every platform, and RE2's syntax differs from Python's in places (``\\Z``,
Unicode classes); why not a worker with a timeout: a time bound refuses valid slow configs
nondeterministically and costs a process per config.

List targets are matched by set lookup: the suffixes of a name after each ``.`` are its
candidates, so n names against m targets take O(n x len(name)) instead of O(n x m).
``rank_pattern`` keys that are plain literals use the same lookup (a dict from literal to the
key's position); only regex keys ordered before the best literal hit are run.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

try:  # Python 3.11+
    from re import _constants as C, _parser as P  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as C  # type: ignore[no-redef]
    import sre_parse as P  # type: ignore[no-redef]

import re

from .errors import ConfigError

#: Largest NFA a pattern may compile to (states); far above any real target pattern.
MAX_STATES = 20_000
#: Cached DFA transitions per pattern before the cache is dropped (bounds memory, not time).
MAX_CACHE = 200_000

#: Before Python 3.14, ``\B`` never matches the empty string (re's documented exception).
_NO_B_ON_EMPTY = sys.version_info < (3, 14)
_UNSUPPORTED_FLAGS = {re.IGNORECASE: "IGNORECASE (?i)", re.MULTILINE: "MULTILINE (?m)", re.LOCALE: "LOCALE (?L)"}


def _word(ch: str, ascii_only: bool) -> bool:
    return (ch.isalnum() or ch == "_") and (not ascii_only or ch.isascii())


def _category(name: Any, ascii_only: bool):
    def ascii_ok(ch: str) -> bool:
        return not ascii_only or ch.isascii()

    table = {
        C.CATEGORY_DIGIT: lambda ch: ch.isdecimal() and ascii_ok(ch),
        C.CATEGORY_NOT_DIGIT: lambda ch: not (ch.isdecimal() and ascii_ok(ch)),
        C.CATEGORY_SPACE: lambda ch: (ch in " \t\n\r\f\v") if ascii_only else ch.isspace(),
        C.CATEGORY_NOT_SPACE: lambda ch: not ((ch in " \t\n\r\f\v") if ascii_only else ch.isspace()),
        C.CATEGORY_WORD: lambda ch: _word(ch, ascii_only),
        C.CATEGORY_NOT_WORD: lambda ch: not _word(ch, ascii_only),
    }
    if name not in table:
        raise _refuse(f"the class {name}")
    return table[name]


class _Refused(Exception):
    pass


def _refuse(what: str) -> _Refused:
    return _Refused(what)


class _NFA:
    """Thompson NFA. State i: ``kind[i]`` is "char" (``pred[i]``, ``out[i]``), "split" (``outs[i]``),
    "assert" (``at[i]``, ``out[i]``) or "accept"."""

    def __init__(self) -> None:
        self.kind: list[str] = []
        self.pred: list[Any] = []
        self.out: list[Any] = []
        self.at: list[Any] = []

    def add(self, kind: str, pred: Any = None, at: Any = None) -> int:
        if len(self.kind) >= MAX_STATES:
            raise _refuse(f"a pattern that compiles to more than {MAX_STATES} states (repeat counts too large)")
        self.kind.append(kind)
        self.pred.append(pred)
        self.out.append([] if kind == "split" else None)
        self.at.append(at)
        return len(self.kind) - 1


# A fragment is (start state, list of dangling (state, slot) to patch); slot None = out, int = outs index.
def _patch(nfa: _NFA, dangling: list[int], target: int) -> None:
    for state in dangling:
        if nfa.kind[state] == "split":
            nfa.out[state].append(target)
        else:
            nfa.out[state] = target


class _Compiler:
    def __init__(self, flags: int) -> None:
        self.nfa = _NFA()
        self.flags = flags

    def seq(self, items: Iterable[tuple[Any, Any]], flags: int) -> tuple[int, list[int]]:
        """Compile a sequence; returns (entry, dangling exits). An empty sequence is a split with no outs."""
        entry = self.nfa.add("split")
        dangling = [entry]
        for op, av in items:
            start, exits = self.item(op, av, flags)
            _patch(self.nfa, dangling, start)
            dangling = exits
        return entry, dangling

    def char(self, pred: Any) -> tuple[int, list[int]]:
        state = self.nfa.add("char", pred)
        return state, [state]

    def item(self, op: Any, av: Any, flags: int) -> tuple[int, list[int]]:
        ascii_only = bool(flags & re.ASCII)
        if op is C.LITERAL:
            ch = chr(av)
            return self.char(lambda c, ch=ch: c == ch)
        if op is C.NOT_LITERAL:
            ch = chr(av)
            return self.char(lambda c, ch=ch: c != ch)
        if op is C.ANY:
            dotall = bool(flags & re.DOTALL)
            return self.char((lambda c: True) if dotall else (lambda c: c != "\n"))
        if op is C.IN:
            return self.char(self.charset(av, ascii_only))
        if op is C.BRANCH:
            entry = self.nfa.add("split")
            exits: list[int] = []
            for alternative in av[1]:
                start, ends = self.seq(alternative, flags)
                self.nfa.out[entry].append(start)
                exits += ends
            return entry, exits
        if op is C.SUBPATTERN:
            _, add_flags, del_flags, pattern = av
            inner = (flags | add_flags) & ~del_flags
            _check_flags(inner)
            return self.seq(pattern, inner)
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            low, high, pattern = av
            return self.repeat(low, high, pattern, flags)
        if op is C.AT:
            if av not in (C.AT_BEGINNING, C.AT_BEGINNING_STRING, C.AT_END, C.AT_END_STRING,
                          C.AT_BOUNDARY, C.AT_NON_BOUNDARY):
                raise _refuse(f"the anchor {av}")
            state = self.nfa.add("assert", at=(av, ascii_only))
            return state, [state]
        names = {"GROUPREF": "backreferences", "GROUPREF_EXISTS": "conditional groups", "ASSERT": "lookahead/lookbehind",
                 "ASSERT_NOT": "negative lookahead/lookbehind", "ATOMIC_GROUP": "atomic groups (?>...)",
                 "POSSESSIVE_REPEAT": "possessive repeats (*+, ++, ?+)"}
        raise _refuse(names.get(str(op), f"the construct {op}"))

    def charset(self, items: Sequence[tuple[Any, Any]], ascii_only: bool):
        negate = False
        tests = []
        for op, av in items:
            if op is C.NEGATE:
                negate = True
            elif op is C.LITERAL:
                tests.append(lambda c, ch=chr(av): c == ch)
            elif op is C.RANGE:
                tests.append(lambda c, lo=av[0], hi=av[1]: lo <= ord(c) <= hi)
            elif op is C.CATEGORY:
                tests.append(_category(av, ascii_only))
            else:
                raise _refuse(f"the class item {op}")

        def pred(c: str) -> bool:
            return any(test(c) for test in tests) != negate

        return pred

    def repeat(self, low: int, high: int, pattern: Any, flags: int) -> tuple[int, list[int]]:
        entry = self.nfa.add("split")
        dangling = [entry]
        for _ in range(low):
            start, exits = self.seq(pattern, flags)
            _patch(self.nfa, dangling, start)
            dangling = exits
        if high == C.MAXREPEAT:
            loop = self.nfa.add("split")
            _patch(self.nfa, dangling, loop)
            start, exits = self.seq(pattern, flags)
            self.nfa.out[loop].append(start)
            _patch(self.nfa, exits, loop)
            return entry, [loop]
        optional_exits: list[int] = []
        for _ in range(high - low):
            gate = self.nfa.add("split")
            _patch(self.nfa, dangling, gate)
            start, exits = self.seq(pattern, flags)
            self.nfa.out[gate].append(start)
            optional_exits.append(gate)
            dangling = exits
        return entry, dangling + optional_exits


def _check_flags(flags: int) -> None:
    for flag, name in _UNSUPPORTED_FLAGS.items():
        if flags & flag:
            raise _refuse(f"the flag {name}")


class Matcher:
    """A compiled pattern: ``fullmatch(name)`` and ``match(name)`` (anchored at the start), as ``re``."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        try:
            parsed = P.parse(pattern)
        except (re.error, RecursionError, OverflowError) as exc:
            raise ConfigError(f"{pattern[:120]!r} is not a valid regex: {type(exc).__name__}: {str(exc)[:120]}") from None
        try:
            flags = parsed.state.flags
            _check_flags(flags)
            compiler = _Compiler(flags)
            start, exits = compiler.seq(list(parsed), flags)
        except _Refused as exc:
            raise ConfigError(f"regex {pattern[:120]!r} uses {exc.args[0]}, which lora-ref does not run (it could take "
                              "exponential time or has no linear-time meaning); write it without, or list the modules")
        except RecursionError:
            raise ConfigError(f"regex {pattern[:120]!r} is nested too deeply") from None
        self._nfa = compiler.nfa
        accept = self._nfa.add("accept")
        _patch(self._nfa, exits, accept)
        self._start = start
        self._accept = accept
        self._boundaries = any(at is not None and at[0] in (C.AT_BOUNDARY, C.AT_NON_BOUNDARY) for at in self._nfa.at)
        self._ascii = bool(flags & re.ASCII)
        self._steps: dict[tuple, frozenset[int]] = {}
        self._closures: dict[tuple, frozenset[int]] = {}

    # context of position i in s: (at start, at end, just before a final newline, word before, word after, s empty)
    def _context(self, s: str, i: int) -> tuple:
        n = len(s)
        if self._boundaries:
            before = i > 0 and _word(s[i - 1], self._ascii)
            after = i < n and _word(s[i], self._ascii)
        else:
            before = after = False
        return (i == 0, i == n, i == n - 1 and s[i] == "\n", before, after, n == 0)

    def _holds(self, at: tuple, ctx: tuple) -> bool:
        kind = at[0]
        start, end, before_final_newline, before, after, empty = ctx
        if kind in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
            return start
        if kind is C.AT_END:
            return end or before_final_newline
        if kind is C.AT_END_STRING:
            return end
        if kind is C.AT_BOUNDARY:
            return before != after
        return before == after and not (empty and _NO_B_ON_EMPTY)  # AT_NON_BOUNDARY

    def _closure(self, states: Iterable[int], ctx: tuple) -> frozenset[int]:
        nfa = self._nfa
        seen: set[int] = set()
        stack = list(states)
        result = set()
        while stack:
            state = stack.pop()
            if state in seen:
                continue
            seen.add(state)
            kind = nfa.kind[state]
            if kind == "split":
                stack.extend(nfa.out[state])
            elif kind == "assert":
                if self._holds(nfa.at[state], ctx) and nfa.out[state] is not None:
                    stack.append(nfa.out[state])
            else:
                result.add(state)
        return frozenset(result)

    def _run(self, s: str, full: bool) -> bool:
        if len(self._steps) > MAX_CACHE:
            self._steps.clear()
            self._closures.clear()
        ctx = self._context(s, 0)
        current = self._closures.get((None, ctx))
        if current is None:
            current = self._closures[(None, ctx)] = self._closure([self._start], ctx)
        nfa = self._nfa
        for i, ch in enumerate(s):
            if not full and self._accept in current:
                return True
            ctx = self._context(s, i + 1)
            key = (current, ch, ctx)
            following = self._steps.get(key)
            if following is None:
                moved = [nfa.out[state] for state in current if nfa.kind[state] == "char" and nfa.pred[state](ch)]
                following = self._steps[key] = self._closure(moved, ctx)
            current = following
            if not current:
                return False
        return self._accept in current

    def fullmatch(self, s: str) -> bool:
        """Whether ``re.fullmatch(pattern, s)`` would match."""
        return self._run(s, full=True)

    def match(self, s: str) -> bool:
        """Whether ``re.match(pattern, s)`` would match (anchored at the start, any end)."""
        return self._run(s, full=False)


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> Matcher:
    """The bounded matcher of ``pattern`` (ConfigError if invalid or not supported); cached."""
    return Matcher(pattern)


def check_pattern(name: str, pattern: str, *, pattern_key: bool = False) -> None:
    """Raise ConfigError (naming ``name``) unless ``pattern`` compiles for the bounded matcher."""
    try:
        compile_pattern(_pattern_key_regex(pattern) if pattern_key else pattern)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _pattern_key_regex(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _suffixes(name: str) -> Iterable[str]:
    """``name`` and every part of it after a ``.``: t is one iff name == t or name.endswith("." + t)."""
    yield name
    start = name.find(".")
    while start >= 0:
        yield name[start + 1:]
        start = name.find(".", start + 1)


class TargetSpec:
    """``target_modules`` or ``exclude_modules`` as PEFT reads it: a regex string or a list of names."""

    def __init__(self, spec: str | Sequence[str] | None) -> None:
        self._regex = compile_pattern(spec) if isinstance(spec, str) else None
        self._names = frozenset(spec) if spec is not None and not isinstance(spec, str) else frozenset()

    def __call__(self, module: str) -> bool:
        if self._regex is not None:
            return self._regex.fullmatch(module)
        return any(suffix in self._names for suffix in _suffixes(module))


def _literal(key: str) -> str | None:
    """The string a regex key matches if it is a plain literal (``q_proj``, ``layers\\.0``), else None."""
    try:
        parsed = P.parse(key)
    except (re.error, RecursionError, OverflowError):
        return None
    if parsed.state.flags & ~(re.UNICODE) or not all(op is C.LITERAL for op, _ in parsed):
        return None
    return "".join(chr(av) for _, av in parsed)


class PatternTable:
    """``rank_pattern`` / ``alpha_pattern``: the value of the first key (dict order) matching a module."""

    def __init__(self, patterns: Mapping[str, Any]) -> None:
        self._keys = list(patterns)
        self._values = list(patterns.values())
        self._literals: dict[str, int] = {}
        self._regexes: list[tuple[int, Matcher]] = []
        for position, key in enumerate(self._keys):
            literal = _literal(key)
            if literal is not None and "\n" not in literal:
                self._literals.setdefault(literal, position)
            else:
                self._regexes.append((position, compile_pattern(_pattern_key_regex(key))))
        self._every: list[tuple[int, Matcher]] | None = None

    def position(self, module: str) -> int | None:
        """The index of the first matching key, or None."""
        if not self._keys:
            return None
        if "\n" in module:  # '$' and '.' treat a newline specially: run every key as a regex
            if self._every is None:
                self._every = [(p, Matcher(_pattern_key_regex(k))) for p, k in enumerate(self._keys)]
            return next((p for p, m in self._every if m.match(module)), None)
        best = min((self._literals[s] for s in _suffixes(module) if s in self._literals), default=None)
        for position, matcher in self._regexes:
            if best is not None and position > best:
                break
            if matcher.match(module):
                return position
        return best

    def value(self, module: str) -> Any | None:
        position = self.position(module)
        return None if position is None else self._values[position]
