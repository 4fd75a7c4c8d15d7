"""How a client's failure is told: its exception on one line, with a hint for the common data mistakes.

The runner records every failed client as ``"ExceptionType: message"``; when too few clients
succeed, :func:`describe_failures` lists them one per line and adds, once each, a specific hint
for the three mistakes users make first with their own data (labels outside ``num_classes``,
images of another size than the backbone's, samples that are not ``(image, label)``).

Example:
    >>> print(describe_failures({2: "IndexError: Target 12 is out of bounds."}))
      client 2: IndexError: Target 12 is out of bounds.
      hint: a label is outside [0, num_classes): set model.num_classes to the number of classes (labels 0..K-1)
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["HINTS", "describe_failures", "failure_text", "hint_for"]

#: (pattern in the failure text, hint)
HINTS: tuple[tuple[str, str], ...] = (
    (r"Target -?\d+ is out of bounds|device-side assert|n_classes|num_classes",
     "a label is outside [0, num_classes): set model.num_classes to the number of classes (labels 0..K-1)"),
    (r"Input (image )?height|Input (image )?width|doesn't match model|img_size",
     "the images' size differs from the backbone's: resize them in the data set's transform, or set "
     "model.backbone_kwargs.img_size to their size"),
    (r"to have \d+ channels",
     "the images have another number of channels than the backbone (3 for RGB): convert them (PIL .convert('RGB'))"),
    (r"SampleFormatError|KeyError: 0\b|KeyError: 1\b",
     "the samples are not (image, label) tuples: dict samples need their keys named (loader.image_key / "
     "loader.label_key, or SampleKeys), and images must be tensors"),
)


def failure_text(exc: BaseException) -> str:
    """``"ExceptionType: message"`` on one line (the form a round records)."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def hint_for(text: str) -> str | None:
    """The hint for a failure text, if it is one of the common data mistakes."""
    return next((hint for pattern, hint in HINTS if re.search(pattern, text)), None)


def describe_failures(failed: Mapping[int, str], limit: int = 20) -> str:
    """Each failed client's exception on its own line (at most ``limit``), then the hints that apply."""
    items = sorted(failed.items())
    lines = [f"  client {cid}: {text}" for cid, text in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    hints: list[str] = []
    for _, text in items:
        hint = hint_for(text)
        if hint is not None and hint not in hints:
            hints.append(hint)
    lines += [f"  hint: {h}" for h in hints]
    return "\n".join(lines)
