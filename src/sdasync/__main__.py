from __future__ import annotations

import sys

from sdasync.cli import main

sys.exit(main())
