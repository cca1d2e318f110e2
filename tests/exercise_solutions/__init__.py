"""Reference solutions of exercises/ (kept in tests/, not shipped with the stubs): each file is the
exercise as shipped, taken from exercises/ by ``exercise``, with the learner's part written out;
tests/test_grade.py grades each one clean."""

from pathlib import Path

EXERCISES = Path(__file__).resolve().parents[2] / "exercises"


def exercise(name: str) -> dict:
    """The names exercise ``name`` defines (its forwards, helpers and imports), run from the shipped
    file, so a solution writes only the learner's part and cannot drift from what the learner got."""
    path = EXERCISES / name
    namespace = {"__name__": f"exercise_{path.stem}"}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return {key: value for key, value in namespace.items() if not key.startswith("__")}
