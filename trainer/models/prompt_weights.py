"""`--weighted_captions`: the AUTOMATIC1111 attention syntax in captions, as sd-scripts reads it.

    (word)       weight x1.1 (nesting multiplies: ((word)) = x1.21)
    [word]       weight /1.1
    (word:1.5)   weight x1.5
    \\( \\) \\[ \\] \\\\  a literal bracket or backslash

A bracket that is never closed applies to the rest of the caption; a closing bracket without an opening one,
or `:1.5)` outside round brackets, is plain text. The result is a list of (text, weight) runs; neighbouring
runs of equal weight are joined. Pure string handling: no tokenizer, no torch."""

from __future__ import annotations

import re

ROUND, SQUARE = 1.1, 1 / 1.1

# One piece of a caption: an escape, a bracket, an explicit ":weight)" close, a lone ":", or plain text.
_PIECE = re.compile(r"\\[()\[\]\\]?|[()\[\]]|:([+-]?(?:\d+\.?\d*|\.\d+))\)|:|[^\\()\[\]:]+")


def parse_weighted_caption(caption: str) -> list[tuple[str, float]]:
    """`a (red:1.5) [hat]` -> [("a ", 1.0), ("red", 1.5), (" ", 1.0), ("hat", 0.909...)]."""
    runs: list[list] = []  # [text, weight]; mutable while brackets close
    open_round: list[int] = []   # index into runs where each open "(" starts
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _PIECE.finditer(caption):
        piece, explicit = match.group(0), match.group(1)
        if piece.startswith("\\"):
            runs.append([piece[1:], 1.0])  # "\(" -> "(" ; any other backslash is dropped
        elif piece == "(":
            open_round.append(len(runs))
        elif piece == "[":
            open_square.append(len(runs))
        elif explicit is not None and open_round:
            scale(open_round.pop(), float(explicit))
        elif piece == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif piece == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            runs.append([piece, 1.0])
    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)
    # Join first, then drop empty runs: each run is tokenized on its own, so where runs meet matters.
    return [run for run in _join_equal([(t, w) for t, w in runs]) if run[0]] or [("", 1.0)]


def _join_equal(runs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    joined: list[tuple[str, float]] = []
    for text, weight in runs:
        if joined and joined[-1][1] == weight:
            joined[-1] = (joined[-1][0] + text, weight)
        else:
            joined.append((text, weight))
    return joined


def strip_weights(caption: str) -> str:
    """The caption's text without the attention syntax (what the text encoder reads)."""
    return "".join(text for text, _ in parse_weighted_caption(caption))
