import sys

from inverseform_seg.cli import main

sys.exit(main())
