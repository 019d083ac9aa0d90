"""A safe evaluator for the arithmetic a model writes in a Countdown answer.

Model output is untrusted, so it is never handed to ``eval``: a small recursive-descent parser accepts
only integers, ``+ - * /``, parentheses and spaces, and computes with Python's own int and float
operations in the same order Python would, so results match what the paper's ``eval`` produced.  That
includes the operators Python reads in those characters: power ``**`` and floor division ``//`` (written
without a space inside).  A power whose result would exceed ``MAX_POWER_BITS`` bits is refused, where
Python would run out of time or memory.

Grammar (as in Python: ``**`` binds tighter than a unary sign on its left and is right-associative)::

    expr   := term   (("+" | "-") term)*
    term   := factor (("*" | "/" | "//") factor)*
    factor := ("+" | "-") factor | power
    power  := atom ["**" factor]
    atom   := NUMBER | "(" expr ")"
"""

from __future__ import annotations

import math
import re
from typing import Union

Number = Union[int, float]

_ALLOWED = frozenset("0123456789+-*/() ")
MAX_POWER_BITS = 100_000  # 99 ** 99 ** 1 is 656 bits; 99 ** (99 ** 99) would never finish
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
        elif ch in "*/" and expr[i:i + 2] in ("**", "//"):  # Python's two-character operators
            tokens.append(expr[i:i + 2])
            i += 2
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
        while self.peek() in ("*", "/", "//"):
            op = self.take()
            rhs = self.factor()
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise ValueError("division by zero")
            else:
                value = value / rhs if op == "/" else value // rhs
        return value

    def factor(self) -> Number:
        if self.peek() == "+":
            self.take()
            return +self.factor()
        if self.peek() == "-":
            self.take()
            return -self.factor()
        return self.power()

    def power(self) -> Number:
        base = self.atom()
        if self.peek() != "**":
            return base
        self.take()
        exponent = self.factor()  # right-associative, and 2 ** -1 is allowed
        if base == 0 and exponent < 0:
            raise ValueError("zero to a negative power")
        if abs(base) > 1 and exponent > 0 and exponent * math.log2(abs(base)) > MAX_POWER_BITS:
            raise ValueError(f"power result beyond {MAX_POWER_BITS} bits")
        value = base ** exponent
        if isinstance(value, complex):  # a negative base to a fractional power
            raise ValueError("complex result")
        return value

    def atom(self) -> Number:
        tok = self.take()
        if tok == "(":
            value = self.expr()
            if self.take() != ")":
                raise ValueError("expected ')'")
            return value
        if tok.isdigit():
            return int(tok)
        raise ValueError(f"unexpected {tok!r}")


def evaluate(expr: str) -> float:
    """Value of an arithmetic expression over integers with + - * / (and ** //) and parentheses.

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
