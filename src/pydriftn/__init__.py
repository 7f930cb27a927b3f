"""pydriftn: drift-scan photometry for sub-second light curves.

Sub-packages follow the data flow: ``io`` → ``catalogue`` → ``astrometry`` →
``sky`` → ``extract`` → ``detrend`` → ``classify`` → ``events`` →
``pipeline``/``cli``; ``simulate`` makes test data with known truth.
"""

__version__ = "0.2.0.dev0"

__all__ = ["__version__"]
