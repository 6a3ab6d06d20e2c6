"""`python -m dalle_lightning.shapes --out data/shapes --num-samples 20000`: render the Shapes shards."""

import sys

from dalle_lightning.shapes.dataset import main

sys.exit(main())
