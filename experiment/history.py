"""``train_log.jsonl``: one JSON line per logged interval of a run (rank 0 only)."""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Optional

from experiment.errors import UserError
from utils.io import atomic_write_text

log = logging.getLogger("experiment")


class History:
    """Appended across resumes.  A run resumed at iteration ``start`` first drops the lines after
    ``start`` that an interrupted run wrote past its last checkpoint, so each iteration appears
    once, and a last line that a kill cut in half (said in the log); a damaged line elsewhere is
    an error."""

    def __init__(self, path: str, enabled: bool, start: Optional[int] = None):
        self.path, self.enabled = path, enabled
        if enabled and start is not None and os.path.exists(path):  # start None: append as it is
            self._trim(start)

    def _trim(self, start: int) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.strip()]
        records, torn = [], False
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number < len(lines):
                    raise UserError(f"{self.path}, line {number}: not a JSON record ({exc}); repair or remove "
                                    "the line, or start a new run in another --output_dir") from exc
                log.warning("%s: dropping its torn last line (cut by an interrupted write): %r",
                            self.path, line.rstrip("\n")[:80])
                torn = True
        kept = [line if line.endswith("\n") else line + "\n"
                for line, record in zip(lines, records) if record.get("iteration", 0) <= start]
        if torn or len(kept) != len(records):
            atomic_write_text(self.path, "".join(kept))

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(dict(record)) + "\n")
