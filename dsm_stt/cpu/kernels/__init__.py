"""This package's compiled CPU kernels: the C++ sources (one per kernel, after ``kernels.cpp``), its loader
(``build``) and the Python signatures of its functions (``ops``)."""
