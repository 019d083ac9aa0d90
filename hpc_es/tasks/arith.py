"""A safe evaluator for the arithmetic a model writes in a Countdown answer.

Model output is untrusted, so it is never handed to ``eval``: a small recursive-descent parser accepts
only integers, ``+ - * /``, parentheses and spaces, and computes with Python's own int and float
operations in the same order Python would, so results match what the paper's ``eval`` produced for
every expression both accept. Power (``**``) and floor division (``//``) are rejected.

Grammar (unary signs bind tighter than ``*`` and ``/``, as in Python)::

    expr   := term   (("+" | "-") term)*
    term   := factor (("*" | "/") factor)*
    factor := ("+" | "-") factor | NUMBER | "(" expr ")"
"""

from __future__ import annotations

import math
import re
from typing import Union

Number = Union[int, float]

_ALLOWED = frozenset("0123456789+-*/() ")
_INT_RE = re.compile(r"\d+")


def integers_in(expr: str) -> list[int]:
    """The unsigned integer literals of ``expr`` in order (what the reward compares with the given numbers)."""
    return [int(tok) for tok in _INT_RE.findall(expr)]


def _tokenize(expr: str) -> list[str]:
    tokens: list[str] = []
    i, n = 0, len(expr)
    while i < n:
        ch = expr[i]
        if ch == " ":
            i += 1
        elif ch.isdigit() and ch in _ALLOWED:  # isdigit alone also accepts e.g. superscripts
            j = i
            while j < n and expr[j] in "0123456789":
                j += 1
            lit = expr[i:j]
            # Python rejects "07" but accepts "00"; keep that so results match the paper's eval.
            if len(lit) > 1 and lit[0] == "0" and lit.strip("0"):
                raise ValueError(f"leading zero in integer literal {lit!r}")
            tokens.append(lit)
            i = j
        elif ch in "+-*/()":
            tokens.append(ch)
            i += 1
        else:
            raise ValueError(f"character {ch!r} is not allowed in an arithmetic expression")
    return tokens


class _Parser:
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ValueError("unexpected end of expression")
        self.pos += 1
        return tok

    def expr(self) -> Number:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> Number:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = self.take()
            rhs = self.factor()
            if op == "*":
                value = value * rhs
            else:
                if rhs == 0:
                    raise ValueError("division by zero")
                value = value / rhs
        return value

    def factor(self) -> Number:
        tok = self.take()
        if tok == "+":
            return +self.factor()
        if tok == "-":
            return -self.factor()
        if tok == "(":
            value = self.expr()
            if self.take() != ")":
                raise ValueError("expected ')'")
            return value
        if tok.isdigit():
            return int(tok)
        raise ValueError(f"unexpected {tok!r}")


def evaluate(expr: str) -> float:
    """Value of an arithmetic expression over integers with + - * / and parentheses.

    Raises ValueError for anything else: other characters, syntax errors, division by zero, overflow.
    """
    if not isinstance(expr, str):
        raise ValueError(f"expected a string, got {type(expr).__name__}")
    try:
        parser = _Parser(_tokenize(expr))
        if not parser.tokens:
            raise ValueError("empty expression")
        value = parser.expr()
        if parser.peek() is not None:
            raise ValueError(f"unexpected {parser.peek()!r} after a complete expression")
        result = float(value)
    except (ArithmeticError, RecursionError) as e:  # overflow, deep nesting
        raise ValueError(f"cannot evaluate: {type(e).__name__}: {e}") from None
    if not math.isfinite(result):
        raise ValueError("result is not finite")
    return result
