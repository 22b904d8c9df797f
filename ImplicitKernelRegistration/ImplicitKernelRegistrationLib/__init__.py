"""ImplicitKernelRegistration: deformable CT registration with a learned kernel (core library, no Slicer)."""

__version__ = "0.1.0"
