// norm kernels
