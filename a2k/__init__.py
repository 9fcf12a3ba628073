"""a2k's command line: `a2k classify | train | demo | models | compress`. Nothing imports this package."""

__version__ = "0.1.0"
