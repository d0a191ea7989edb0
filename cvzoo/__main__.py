import sys

from cvzoo.cli import main

sys.exit(main())
