// The Python module ``fastdet._C``. Importing it runs the static TORCH_LIBRARY registrations of every op file linked
// into this shared object; the module itself only carries the torch version it was compiled against, so that
// ``fastdet`` can refuse a stale build with a clear message instead of failing inside the dispatcher.
#include <Python.h>
#include <torch/version.h>

namespace {

PyModuleDef fastdet_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "fastdet native kernels (ops are reached through torch.ops.fastdet)",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastdet_module);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddStringConstant(module, "torch_version", TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
#ifdef FASTDET_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "with_cuda", with_cuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
