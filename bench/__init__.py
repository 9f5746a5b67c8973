"""doublenat's benchmark: a NAT-PMP load generator, the processes it measures, one table.

    make bench            (= .venv/bin/python -m bench.run)

See bench/run.py for what is measured and how; results go to bench/results/.
"""
