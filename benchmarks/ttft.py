"""Time to first token of REFRAG against the fastest plain decoder: see :mod:`refrag.bench.ttft`.

python benchmarks/ttft.py --device cpu --contexts 2048 --k 8,16,32 --repeats 5
"""

from refrag.bench.ttft import main

if __name__ == "__main__":
    main()
