"""Reference solutions of exercises/ (kept in tests/, not shipped with the stubs): each file is the
exercise with its backward written out; tests/test_grade.py grades each one clean."""
