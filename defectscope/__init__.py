"""defectscope: live defect classification of Bragg coherent diffraction patterns.

The distribution installs the repository's root folders as sub-packages of this one
(``defectscope.server``, ``defectscope.model``, ``defectscope.preprocessing``, ...);
this package itself holds only what every part shares: the version and the error tree.
"""

__version__ = "0.1.0"
PROTOCOL = "defectscope/1"
