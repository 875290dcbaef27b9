import sys

from sorterd.cli import main

sys.exit(main())
