import sys

from rblguard.cli import main

sys.exit(main())
