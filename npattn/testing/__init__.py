"""npattn.testing: verification of other people's code against npattn's float64 truth.

- ``reference`` (testing/reference.py): the float64 answer of one attention call, with gradients.
- ``check_attention``, ``cases`` (testing/attention_check.py): a battery that finds the bugs in
  someone's attention kernel (conventions, tile loops, variants) and names them. Guide:
  docs/kernel-authors.md.
- ``write_golden``, ``load_golden`` (testing/golden.py): float64 cases for a kernel's own CI.
"""

from .attention_check import (DIAGNOSES, VARIANTS, AttentionCase, Case, CaseResult, CheckReport, CheckRow, cases,
                              check_attention, default_cases, variant_cases)
from .golden import golden_cases, load_golden, write_golden
from .reference import Reference, reference

__all__ = ["Reference", "reference", "check_attention", "cases", "Case", "CaseResult", "CheckReport", "CheckRow",
           "AttentionCase", "default_cases", "variant_cases", "DIAGNOSES", "VARIANTS", "write_golden", "load_golden",
           "golden_cases"]

# checking your own derivation (testing/backward_check.py, testing/grade.py): a hand-written backward
# against npattn's, the classic wrong form it follows named with its derivation section; npattn grade
from .backward_check import WRONG_FORMS, BackwardReport, BackwardRow, check_backward  # noqa: E402
from .grade import grade_file  # noqa: E402

__all__ += ["check_backward", "BackwardReport", "BackwardRow", "WRONG_FORMS", "grade_file"]
