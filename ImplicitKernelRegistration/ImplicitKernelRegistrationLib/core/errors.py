"""The one error type the library raises for bad input; the CLI prints it as one line."""

from __future__ import annotations


class IkrError(Exception):
    """A user-facing error: the message names the file (when there is one) and the problem."""

    def __init__(self, problem: str, path: object | None = None) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
