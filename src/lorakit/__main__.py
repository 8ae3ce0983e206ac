"""`python -m lorakit ...` is `lorakit ...` (what torchrun starts: ``torchrun ... -m lorakit train``)."""

import sys

from lorakit.cli import main

sys.exit(main())
