"""Layer 1, the market: candle sources (MT5, files, demo), the store and its validation, then features, labels,
splits and the dataset built from them. Imports only :mod:`core`."""
