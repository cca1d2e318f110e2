"""npattn.testing: verification of other people's code against npattn's float64 truth.

- ``reference`` (testing/reference.py): the float64 answer of one attention call, with gradients.
- ``check_attention`` (testing/attention_check.py): a battery that finds the bugs in someone's
  attention kernel and names them. Guide: docs/kernel-authors.md.
- ``write_golden``, ``load_golden`` (testing/golden.py): float64 cases for a kernel's own CI.
"""

from .attention_check import DIAGNOSES, AttentionCase, CheckReport, CheckRow, check_attention, default_cases
from .golden import load_golden, write_golden
from .reference import Reference, reference

__all__ = ["Reference", "reference", "check_attention", "CheckReport", "CheckRow", "AttentionCase", "default_cases",
           "DIAGNOSES", "write_golden", "load_golden"]
