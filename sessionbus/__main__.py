import sys

from sessionbus.cli import main

sys.exit(main())
