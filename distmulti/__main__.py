import sys

from distmulti.cli import main

sys.exit(main())
