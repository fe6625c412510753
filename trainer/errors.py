"""Errors meant for the user: printed as one clear message, never as a stack trace."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (a path, a key, a value) with the fix spelled out.

    The CLI prints `str(error)` and exits with status 2; no traceback is shown.
    """


class ConfigError(UserError):
    """One or more problems in the arguments or TOML files; the message lists all of them."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(f"- {p}" for p in self.problems) if len(self.problems) > 1 else self.problems[0])


class DatasetError(UserError):
    """The images, captions or dataset TOML cannot be used as given."""


class ModelLoadError(UserError):
    """The base model (or VAE) cannot be loaded from what was given."""


def did_you_mean(name: str, candidates) -> str:
    """' (did you mean "x"?)' for the closest candidate, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
