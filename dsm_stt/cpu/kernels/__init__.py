"""This package's compiled CPU kernels: the C++ source (``kernels.cpp``), its loader
(``build``) and the Python signatures of its functions (``ops``)."""
