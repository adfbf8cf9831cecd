// vae kernels
