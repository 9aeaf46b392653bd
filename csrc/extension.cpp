// The Python module ``fastdet._C``: importing it runs the static STABLE_TORCH_LIBRARY registrations of every CPU and
// composite op file linked into this library. It uses only CPython's limited API (3.10) and torch's stable ABI, so the
// same build imports on every CPython >= 3.10 and every torch >= FASTDET_MIN_TORCH. The module carries the oldest
// torch it supports and the torch it was compiled with, so ``fastdet`` can refuse an older torch with a clear message.
#include <Python.h>
#include <torch/headeronly/version.h>

namespace {

PyModuleDef fastdet_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "fastdet native CPU kernels (ops are reached through torch.ops.fastdet)",
    -1,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastdet_module);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddStringConstant(module, "min_torch_version", FASTDET_MIN_TORCH) < 0 ||
      PyModule_AddStringConstant(module, "built_with_torch", TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
