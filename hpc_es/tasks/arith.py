"""A safe evaluator for the arithmetic a model writes in a Countdown answer.

Model output is untrusted, so it is never handed to ``eval``: a small operator-precedence parser accepts
only integers, ``+ - * /``, parentheses and spaces, and computes with Python's own int and float
operations in the same order Python would, so results match what the paper's ``eval`` produced.  That
includes the operators Python reads in those characters: power ``**`` and floor division ``//`` (written
without a space inside).  A power whose result would exceed ``MAX_POWER_BITS`` bits is refused, where
Python would run out of time or memory.  Like Python, more than ``MAX_PAREN_DEPTH`` nested parentheses
are refused; the parser itself keeps explicit stacks, so no nesting depth can exhaust the call stack.

Precedence, as in Python: ``**`` binds tighter than a unary sign on its left and is right-associative;
then unary ``+``/``-``; then ``* / //``; then ``+ -`` (both left-associative)::

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
MAX_PAREN_DEPTH = 200  # Python's tokenizer refuses the 201st nested parenthesis
_INT_RE = re.compile(r"\d+")

# binding power of each operator on the stack; unary signs are "u+" / "u-"
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "u+": 3, "u-": 3, "**": 4}


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


def _power(base: Number, exponent: Number) -> Number:
    if base == 0 and exponent < 0:
        raise ValueError("zero to a negative power")
    if abs(base) > 1 and exponent > 0 and exponent * math.log2(abs(base)) > MAX_POWER_BITS:
        raise ValueError(f"power result beyond {MAX_POWER_BITS} bits")
    value = base ** exponent
    if isinstance(value, complex):  # a negative base to a fractional power
        raise ValueError("complex result")
    return value


def _apply(op: str, values: list[Number]) -> None:
    """Pop an operator's operands from ``values`` and push its result (Python's own int/float arithmetic)."""
    if op == "u-":
        values.append(-values.pop())
        return
    if op == "u+":
        values.append(+values.pop())
        return
    rhs, lhs = values.pop(), values.pop()
    if op == "+":
        values.append(lhs + rhs)
    elif op == "-":
        values.append(lhs - rhs)
    elif op == "*":
        values.append(lhs * rhs)
    elif op == "**":
        values.append(_power(lhs, rhs))
    elif rhs == 0:
        raise ValueError("division by zero")
    else:
        values.append(lhs / rhs if op == "/" else lhs // rhs)


def _reduce(tokens: list[str]) -> Number:
    """Shunting-yard over ``tokens``, applying each operator as soon as its operands are complete."""
    values: list[Number] = []
    ops: list[str] = []
    want_operand = True  # the grammar alternates operand / binary operator; signs and "(" keep wanting one
    depth = 0
    for tok in tokens:
        if want_operand:
            if tok.isdigit():
                values.append(int(tok))
                want_operand = False
            elif tok == "(":
                depth += 1
                if depth > MAX_PAREN_DEPTH:
                    raise ValueError(f"more than {MAX_PAREN_DEPTH} nested parentheses")
                ops.append(tok)
            elif tok in ("+", "-"):
                ops.append("u" + tok)  # a prefix operator: nothing on the stack is complete yet
            else:
                raise ValueError(f"unexpected {tok!r} where a number was expected")
        elif tok == ")":
            while ops and ops[-1] != "(":
                _apply(ops.pop(), values)
            if not ops:
                raise ValueError("unbalanced ')'")
            ops.pop()
            depth -= 1
        elif tok in _PREC:
            prec = _PREC[tok]
            # left-associative: apply stacked operators that bind at least as tightly; "**" (right-assoc)
            # only strictly tighter ones, and a unary sign below it waits (-2 ** 2 == -(2 ** 2))
            while ops and ops[-1] != "(" and (_PREC[ops[-1]] > prec or (_PREC[ops[-1]] == prec and tok != "**")):
                _apply(ops.pop(), values)
            ops.append(tok)
            want_operand = True
        else:
            raise ValueError(f"unexpected {tok!r} after a complete operand")
    if want_operand:
        raise ValueError("unexpected end of expression")
    while ops:
        op = ops.pop()
        if op == "(":
            raise ValueError("unbalanced '('")
        _apply(op, values)
    return values[0]


def compute(expr: str) -> float:
    """Value of an arithmetic expression over integers with + - * / (and ** //) and parentheses.

    Raises ValueError for anything else: other characters, syntax errors, division by zero, overflow.
    """
    if not isinstance(expr, str):
        raise ValueError(f"expected a string, got {type(expr).__name__}")
    try:
        tokens = _tokenize(expr)
        if not tokens:
            raise ValueError("empty expression")
        result = float(_reduce(tokens))
    except ArithmeticError as e:  # overflow
        raise ValueError(f"cannot compute: {type(e).__name__}: {e}") from None
    if not math.isfinite(result):
        raise ValueError("result is not finite")
    return result
