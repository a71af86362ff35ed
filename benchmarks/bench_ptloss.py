"""PTLoss forward+backward against eager PyTorch, ``torch.compile`` and the memory roofline.

The cases live in ``tgtfast/bench/ptloss.py`` and run through ``tgtfast bench``; this script is the stem's entry
point in benchmarks/, with the issue's shape by default::

    python benchmarks/bench_ptloss.py                        # N=1024 K=32000 M=5 float32
    python benchmarks/bench_ptloss.py --shape N=64 K=4096 --repeats 3 --no-memory
"""

import sys

from tgtfast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", "ptloss", *sys.argv[1:]]))
