"""The error a missing GPU stack raises (TensorRT, or cuda-python under it): one line naming what to
install. Its own module so that the TensorRT backend and the CUDA runtime wrapper, which uses it as
the base of ``CudaNotAvailable``, need not import each other."""


class TensorRTNotInstalled(RuntimeError):
    """The ``tensorrt`` package (or cuda-python, which running engines needs) cannot be imported; the
    message says how to install it."""
