"""The Cython core, built from engine/*.pyx: key directory, lock table, vector clocks, WAL."""
