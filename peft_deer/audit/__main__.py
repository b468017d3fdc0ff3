"""`python -m peft_deer.audit`: the same as `deer-audit` (its extra checked first: one line when missing)."""

import sys

from ..extras import deer_audit

sys.exit(deer_audit())
