"""The one compiled part: the scanner's prefilter (rblguard/matching/_prefilter.c).

Everything else is in pyproject.toml.  The extension is optional: where no C compiler
or Python headers are there, the build goes on without it and the scanner searches
whole windows instead (rblguard.matching.prefilter says how much slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("rblguard.matching._prefilter",
                             ["rblguard/matching/_prefilter.c"], optional=True)])
