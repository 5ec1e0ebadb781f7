import sys

from .fronts.cli import main

sys.exit(main())
