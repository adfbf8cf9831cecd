// text kernels
