"""Entry points (thin: compose config, call a regime, print where the results are)."""
