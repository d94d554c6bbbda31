"""A small renderer for the subset of Go's text/template that our Ollama TEMPLATEs use.

Ollama renders a Modelfile's TEMPLATE with Go's text/template. To prove that the TEMPLATE we
emit produces exactly what the model's Hugging Face chat template produces, we render it here
and compare the strings (before writing the Modelfile, and in the tests). Supported: text with
``{{-``/``-}}`` whitespace trimming; ``if``/``else if``/``else``/``end``; ``range $i, $m := X``
and ``range X``; ``$v := X`` and ``$v = X``; fields (``.Role``, ``$.Messages``, ``$m.Content``,
``(index .Messages 0).Role``); string/number/bool literals; the functions ``eq ne and or not len
index slice``. Anything else raises ``GoTemplateError``, so an unsupported construct can never
silently render differently from Ollama.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class GoTemplateError(ValueError):
    pass


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(
    r"""(?P<ws>\s+)|(?P<lp>\()|(?P<rp>\))|(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+)"""
    r"""|(?P<decl>:=)|(?P<assign>=)|(?P<comma>,)"""
    r"""|(?P<var>\$[A-Za-z0-9_]*)|(?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)|(?P<dot>\.)"""
    r"""|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)"""
)


@dataclass
class Tok:
    kind: str
    text: str
    glued: bool  # no whitespace before it (for `(expr).Field`)


def _tokenize(src: str) -> list[Tok]:
    out: list[Tok] = []
    pos = 0
    glued = True
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m:
            raise GoTemplateError(f"cannot parse template action near {src[pos : pos + 20]!r}")
        kind = m.lastgroup or ""
        if kind == "ws":
            glued = False
        else:
            out.append(Tok(kind, m.group(), glued))
            glued = True
        pos = m.end()
    return out


# ----- expressions -----


@dataclass
class Expr:
    kind: str  # "lit", "var", "field", "dot", "call", "sub"
    value: Any = None
    args: list[Expr] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)


def _parse_operand(toks: list[Tok], i: int) -> tuple[Expr, int]:
    t = toks[i]
    if t.kind == "lp":
        inner, j = _parse_command(toks, i + 1)
        if j >= len(toks) or toks[j].kind != "rp":
            raise GoTemplateError("missing ')'")
        e = Expr("sub", args=[inner])
        j += 1
    elif t.kind == "str":
        e, j = Expr("lit", bytes(t.text[1:-1], "utf-8").decode("unicode_escape")), i + 1
    elif t.kind == "raw":
        e, j = Expr("lit", t.text[1:-1]), i + 1
    elif t.kind == "num":
        e, j = Expr("lit", int(t.text)), i + 1
    elif t.kind == "ident" and t.text in ("true", "false"):
        e, j = Expr("lit", t.text == "true"), i + 1
    elif t.kind == "ident" and t.text == "nil":
        e, j = Expr("lit", None), i + 1
    elif t.kind == "var":
        e, j = Expr("var", t.text), i + 1
    elif t.kind == "field":
        return Expr("field", fields=t.text.split(".")[1:]), i + 1
    elif t.kind == "dot":
        return Expr("dot"), i + 1
    else:
        raise GoTemplateError(f"unexpected {t.text!r} in template expression")
    while j < len(toks) and toks[j].kind == "field" and toks[j].glued:
        e = Expr("sub", args=[e], fields=toks[j].text.split(".")[1:])
        j += 1
    return e, j


_FUNCS = {"eq", "ne", "and", "or", "not", "len", "index", "slice"}


def _parse_command(toks: list[Tok], i: int) -> tuple[Expr, int]:
    if i < len(toks) and toks[i].kind == "ident" and toks[i].text not in ("true", "false", "nil"):
        name = toks[i].text
        if name not in _FUNCS:
            raise GoTemplateError(f"function {name!r} is not supported by this renderer")
        args: list[Expr] = []
        j = i + 1
        while j < len(toks) and toks[j].kind != "rp":
            a, j = _parse_operand(toks, j)
            args.append(a)
        return Expr("call", name, args=args), j
    return _parse_operand(toks, i)


def _parse_expr(src: str) -> Expr:
    toks = _tokenize(src)
    if not toks:
        raise GoTemplateError("empty action")
    e, j = _parse_command(toks, 0)
    if j != len(toks):
        raise GoTemplateError(f"unexpected {toks[j].text!r} in {src!r}")
    return e


# ----- template structure -----


@dataclass
class Node:
    kind: str  # "text", "out", "if", "range", "set"
    text: str = ""
    expr: Expr | None = None
    branches: list[tuple[Expr, list[Node]]] = field(default_factory=list)
    else_body: list[Node] = field(default_factory=list)
    body: list[Node] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    declare: bool = False


def _lex(template: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", s) items with trim markers applied."""
    items: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            items.append(("text", text))
        items.append(("action", m.group(2).strip()))
        trim_next = bool(m.group(3))
        pos = m.end()
    tail = template[pos:]
    if trim_next:
        tail = tail.lstrip()
    if tail:
        items.append(("text", tail))
    return items


_RANGE = re.compile(r"^range\s+(?:(\$\w+)\s*(?:,\s*(\$\w+))?\s*:=\s*)?(.+)$", re.DOTALL)
_SET = re.compile(r"^(\$\w+)\s*(:=|=)\s*(.+)$", re.DOTALL)


def _parse_block(items: list[tuple[str, str]], i: int, stop: tuple[str, ...]) -> tuple[list[Node], int, str]:
    nodes: list[Node] = []
    while i < len(items):
        kind, s = items[i]
        if kind == "text":
            nodes.append(Node("text", text=s))
            i += 1
            continue
        word = s.split(None, 1)[0] if s else ""
        if word in ("end", "else") and word in stop:
            return nodes, i, s
        if s.startswith("/*"):
            i += 1
            continue
        if word == "if":
            node = Node("if")
            cond = _parse_expr(s[2:])
            body, i, ender = _parse_block(items, i + 1, ("end", "else"))
            node.branches.append((cond, body))
            while ender.startswith("else"):
                rest = ender[4:].strip()
                if rest.startswith("if "):
                    cond = _parse_expr(rest[3:])
                    body, i, ender = _parse_block(items, i + 1, ("end", "else"))
                    node.branches.append((cond, body))
                else:
                    node.else_body, i, ender = _parse_block(items, i + 1, ("end",))
            nodes.append(node)
            i += 1
        elif word == "range":
            m = _RANGE.match(s)
            if not m:
                raise GoTemplateError(f"cannot parse {s!r}")
            names = [n for n in (m.group(1), m.group(2)) if n]
            node = Node("range", expr=_parse_expr(m.group(3)), names=names)
            node.body, i, ender = _parse_block(items, i + 1, ("end", "else"))
            if ender == "else":
                node.else_body, i, ender = _parse_block(items, i + 1, ("end",))
            nodes.append(node)
            i += 1
        elif _SET.match(s):
            m = _SET.match(s)
            assert m is not None
            nodes.append(
                Node("set", names=[m.group(1)], declare=m.group(2) == ":=", expr=_parse_expr(m.group(3)))
            )
            i += 1
        elif word in ("with", "define", "template", "block", "break", "continue", "end", "else"):
            raise GoTemplateError(f"{word!r} is not supported by this renderer (or is misplaced)")
        else:
            nodes.append(Node("out", expr=_parse_expr(s)))
            i += 1
    if stop:
        raise GoTemplateError("missing {{ end }}")
    return nodes, i, ""


def parse(template: str) -> list[Node]:
    nodes, _, _ = _parse_block(_lex(template), 0, ())
    return nodes


# ----- evaluation -----


def _get_field(v: Any, name: str) -> Any:
    return v.get(name) if isinstance(v, dict) else getattr(v, name, None)


class _Scope:
    def __init__(self, root: Any):
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def get(self, name: str) -> Any:
        for f in reversed(self.frames):
            if name in f:
                return f[name]
        raise GoTemplateError(f"undefined variable {name}")

    def set(self, name: str, value: Any, declare: bool) -> None:
        if declare:
            self.frames[-1][name] = value
            return
        for f in reversed(self.frames):
            if name in f:
                f[name] = value
                return
        raise GoTemplateError(f"assignment to undeclared variable {name}")


def _eval(e: Expr, dot: Any, scope: _Scope) -> Any:
    if e.kind == "lit":
        return e.value
    if e.kind == "dot":
        return dot
    if e.kind in ("var", "field", "sub"):  # a value, then its fields
        if e.kind == "sub":
            v = _eval(e.args[0], dot, scope)
        else:
            v = scope.get(e.value) if e.kind == "var" else dot
        for f in e.fields:
            v = _get_field(v, f)
        return v
    args = e.args
    name = e.value
    if name in ("and", "or"):  # as Go's: the first false (and) or true (or) argument, else the last
        v = None
        for a in args:
            v = _eval(a, dot, scope)
            if bool(v) != (name == "and"):
                return v
        return v
    vals = [_eval(a, dot, scope) for a in args]
    if name == "eq":
        return any(vals[0] == v for v in vals[1:])
    if name == "ne":
        return vals[0] != vals[1]
    if name == "not":
        return not vals[0]
    if name == "len":
        return len(vals[0]) if vals[0] is not None else 0
    if name == "index":
        v = vals[0]
        for k in vals[1:]:
            v = v[k]
        return v
    if name == "slice":
        return vals[0][vals[1] : vals[2] if len(vals) > 2 else None]
    raise GoTemplateError(f"unknown function {name}")


def _fmt(v: Any) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _run(nodes: list[Node], dot: Any, scope: _Scope, out: list[str]) -> None:
    for n in nodes:
        if n.kind == "text":
            out.append(n.text)
        elif n.kind == "out":
            assert n.expr is not None
            out.append(_fmt(_eval(n.expr, dot, scope)))
        elif n.kind == "set":
            assert n.expr is not None
            scope.set(n.names[0], _eval(n.expr, dot, scope), n.declare)
        elif n.kind == "if":  # the first branch whose condition holds, else the else branch
            body = next((b for cond, b in n.branches if _eval(cond, dot, scope)), n.else_body)
            scope.frames.append({})
            _run(body, dot, scope, out)
            scope.frames.pop()
        elif n.kind == "range":
            assert n.expr is not None
            seq = _eval(n.expr, dot, scope) or []
            if not seq:
                _run(n.else_body, dot, scope, out)
                continue
            for i, item in enumerate(seq):
                frame: dict[str, Any] = {}
                if len(n.names) == 1:
                    frame[n.names[0]] = item
                elif len(n.names) == 2:
                    frame[n.names[0]], frame[n.names[1]] = i, item
                scope.frames.append(frame)
                _run(n.body, item, scope, out)
                scope.frames.pop()


def render(template: str, data: dict[str, Any]) -> str:
    """Render ``template`` with ``data`` as the dot (Ollama passes Messages, System, Prompt, ...)."""
    out: list[str] = []
    _run(parse(template), data, _Scope(data), out)
    return "".join(out)


def ollama_data(messages: list[dict[str, str]], system: str = "") -> dict[str, Any]:
    """The template data Ollama builds for a chat request (fields named as in Ollama's templates)."""
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    return {"Messages": msgs, "System": system, "Prompt": "", "Response": "", "Tools": None}
