"""downpour: a distributed parameter-server training system.

One import namespace. The library below the application:

    downpour.common   what both sides share: the NumPy core, data, settings, protocol, client
    downpour.ps       the shard server and the scheduler        (imports downpour.common only)
    downpour.worker   the worker replica, the single-process trainer, Hogwild!  (likewise)

and the application above them, in this package: the command line (`downpour.cli`), the
local launcher, experiment sweeps, plots, the MNIST download and the benchmarks
(`downpour.bench`). Only the application imports all three.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("downpour-ps")
except _metadata.PackageNotFoundError:          # run from a checkout that is not installed
    __version__ = "0+unknown"
