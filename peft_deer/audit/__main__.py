"""`python -m peft_deer.audit`: the same as `deer-audit`."""

import sys

from .cli import main

sys.exit(main())
