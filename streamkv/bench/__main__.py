import sys

from streamkv.bench.run import main

sys.exit(main())
