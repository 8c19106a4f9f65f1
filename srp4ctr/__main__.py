import sys

from srp4ctr.cli import main

sys.exit(main())
