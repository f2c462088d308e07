import sys

from rblguard.commands.cli import main

sys.exit(main())
