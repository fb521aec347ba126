"""One-line reasons for torch pickle files that are refused (read with ``weights_only=True`` only).

Such a file is never executed: ``torch.load(weights_only=True)`` stops at the first global it does
not allow. The loaders that read it (ours, diffusers', transformers') raise that stop wrapped in
tracebacks of their own; this module turns it into the one line a user can act on.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

__all__ = ["HINT", "pickle_refusal", "unpickling_error"]

HINT = "re-save its state_dict (e.g. as .safetensors) where you trust the file"


def unpickling_error(error: BaseException) -> pickle.UnpicklingError | None:
    """The `pickle.UnpicklingError` behind `error` (itself, its cause or its context), if any."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, pickle.UnpicklingError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def pickle_refusal(path: Path | str, error: pickle.UnpicklingError) -> str:
    """Why `path` was refused, in one line: the global its pickle asked for, or the operand."""
    # torch's wording changed over versions: "Unsupported global: GLOBAL m.f" / "unsupported GLOBAL m.f whose ..."
    found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(error))
    if found:
        return (f"{path}: refused: this checkpoint needs {found.group(1)} unpickled, and only tensors and plain "
                f"containers are read (weights_only); {HINT}")
    found = re.search(r"Unsupported operand[^\n]*", str(error))
    what = found.group(0).strip() if found else (str(error).splitlines() or ["unreadable pickle"])[0]
    return f"{path}: refused: not a tensors-only torch checkpoint ({what}); {HINT}"
