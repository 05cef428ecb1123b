"""Stage results saved as JSON and read back typed: one `from_dict` / `from_json` for all of them.

The stages hand each other typed values (`ValidationResult`, `TrainingPlan`, `EvalReport`); the CLI's
stage commands, run one at a time, read the same values back from the JSON the previous command
wrote. Reading back goes through here, so a wrong or stale file fails the same way everywhere: the
class's own error, naming the file and the command that writes a good one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Self


class JsonDataclass:
    """Mixin for a dataclass whose `to_dict()` is its JSON: `from_dict` and `from_json` undo it."""

    READ_ERROR: ClassVar[type[Exception]] = ValueError  # raised for a file that is not one of these
    WRITTEN_BY: ClassVar[str] = ""  # the command that writes a good file, named in that error

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """The value `to_dict()` wrote, typed again; unknown or missing keys raise TypeError."""
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> Self:
        """The value saved in `path`; a file that is not one raises READ_ERROR naming it and the fix."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise cls.READ_ERROR(f"{path} is not a saved {cls.__name__} ({exc}); write one with "
                                 f"`{cls.WRITTEN_BY}`") from exc
