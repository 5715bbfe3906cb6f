// Declares the msplora op schemas once; each device registers its kernels in
// its own file (csrc/cpu/, csrc/cuda/). Importing msplora_kernels._C runs
// these static registrations; the module itself is empty.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// Shapes: x (M, K), weight (N, K), bias (N,), a (K, R) with the level scales
// folded in, b (R, N), t (M, R), dy (M, N). `seed` is an int64 tensor of one
// element; it is read only when p > 0.
TORCH_LIBRARY(msplora, m) {
  // T = dropout(x) @ a
  m.def("shrink(Tensor x, Tensor a, float p, Tensor seed) -> Tensor");
  // y = x @ weight^T + bias + t @ b
  m.def("expand_linear(Tensor x, Tensor weight, Tensor? bias, Tensor t, Tensor b) -> Tensor");
  // (dT, dB) = (dy @ b^T, t^T @ dy), one pass over dy
  m.def("grad_t_b(Tensor dy, Tensor t, Tensor b) -> (Tensor, Tensor)");
  // dx = dy @ weight + dropout_mask * (dt @ a^T)
  m.def("grad_x(Tensor dy, Tensor weight, Tensor dt, Tensor a, float p, Tensor seed) -> Tensor");
  // dA = dropout(x)^T @ dt
  m.def("grad_a(Tensor x, Tensor dt, float p, Tensor seed) -> Tensor");
  // The inverted-dropout multiplier the kernels use for x, as a tensor like x.
  m.def("dropout_mask(Tensor x, float p, Tensor seed) -> Tensor");
  // dropout(x) itself, the input shrink would compute T from: for a backward that keeps it to
  // reuse for dA (p = 0 there) instead of regenerating the mask. A copy even when p = 0.
  m.def("dropout(Tensor x, float p, Tensor seed) -> Tensor");
  // Optional ops (CPU kernels only): one mask pass. The forward packs the mask it draws, as
  // (M, ceil(K / 32)) int32 words, bit k % 32 of word k / 32 set where element k of a row is kept,
  // and the backward reads those bits instead of hashing again.
  // (dropout(x), its mask packed)
  m.def("dropout_keep_mask(Tensor x, float p, Tensor seed) -> (Tensor, Tensor)");
  // (T = dropout(x) @ a, the mask packed)
  m.def("shrink_keep_mask(Tensor x, Tensor a, float p, Tensor seed) -> (Tensor, Tensor)");
  // dx = dy @ weight + mask(bits) * (dt @ a^T)
  m.def("grad_x_bits(Tensor dy, Tensor weight, Tensor dt, Tensor a, Tensor bits, float p) -> Tensor");
  // dA = (mask(bits) * x)^T @ dt
  m.def("grad_a_bits(Tensor x, Tensor dt, Tensor bits, float p) -> Tensor");
}
