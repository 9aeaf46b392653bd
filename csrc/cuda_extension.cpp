// The Python module ``fastdet._C_cuda``: importing it registers the CUDA kernels of every op with the dispatcher. It
// links torch's CUDA libraries, so fastdet imports it only where torch has CUDA; fastdet._C (CPU kernels and the
// public ops) never depends on it.
#include <Python.h>

namespace {

PyModuleDef fastdet_cuda_module = {
    PyModuleDef_HEAD_INIT,
    "_C_cuda",
    "fastdet native CUDA kernels (registered with the dispatcher on import)",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C_cuda(void) {
  return PyModule_Create(&fastdet_cuda_module);
}
