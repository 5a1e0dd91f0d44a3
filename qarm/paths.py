"""Where artifacts go: checks on output folders that every command runs before it writes or deletes."""

from __future__ import annotations

from pathlib import Path

from qarm.errors import ConfigError


def check_output_folder(out: str | Path, inputs: dict[str, str | Path | None], *, flag: str = "--out",
                        allow_inside: bool = False) -> None:
    """Refuse an output folder that overlaps an input: the same folder, a folder that contains an input
    (replacing it would delete the input) or, unless ``allow_inside``, a folder inside an input (its files
    would mix with the input's). Checked before anything is written or deleted.

    ``inputs``: a name for the message (e.g. ``"dataset folder"``) -> the input path (None: not given)."""
    target = Path(out).resolve()
    for name, given in inputs.items():
        if given is None:
            continue
        source = Path(given).resolve()
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents and not allow_inside:
            relation = "lies inside"
        else:
            continue
        raise ConfigError(f"{flag} {out} {relation} the {name} {given}: an output folder must not overlap an input "
                          f"(the input could be replaced or mixed with the output); choose another {flag}")
